"""AsyncSaver: staged and durable completions, snapshot isolation, errors."""

from __future__ import annotations

import pytest
import torch
import uring_ckpt


def test_changes_after_staged_do_not_reach_the_file(tmp_path):
    w = torch.zeros(1 << 20)
    state = {"w": w, "nested": [w[:10]], "step": 1}
    with uring_ckpt.AsyncSaver() as saver:
        future = saver.save(state, tmp_path / "c")
        assert future.staged(timeout=0)  # staged when save() returns
        w.fill_(7.0)  # training goes on
        state["step"] = 2
        report = future.durable(timeout=60)
    assert report["tensors"] == 2 and future.done() and future.exception() is None
    back = uring_ckpt.load(tmp_path / "c")
    assert back["step"] == 1
    assert torch.count_nonzero(back["w"]) == 0 and torch.count_nonzero(back["nested"][0]) == 0
    assert future.stall_seconds >= 0


def test_several_saves_in_order_with_backpressure(tmp_path):
    t = torch.arange(1000.0)
    with uring_ckpt.AsyncSaver(max_in_flight=2) as saver:
        futures = []
        for step in range(5):
            t.add_(1)
            futures.append(saver.save({"t": t, "step": step}, tmp_path / f"s{step}"))
        saver.wait()
        assert not saver.pending()
    for step, f in enumerate(futures):
        assert f.durable()["tensors"] == 1
        back = uring_ckpt.load(tmp_path / f"s{step}")
        assert back["step"] == step and back["t"][0] == step + 1


def test_background_error_surfaces(tmp_path):
    uring_ckpt.save({"x": torch.ones(1)}, tmp_path / "exists")
    saver = uring_ckpt.AsyncSaver()
    future = saver.save({"x": torch.ones(1)}, tmp_path / "exists")
    with pytest.raises(uring_ckpt.CheckpointExistsError):
        future.durable(timeout=60)
    assert isinstance(future.exception(), uring_ckpt.CheckpointExistsError)
    with pytest.raises(uring_ckpt.CheckpointExistsError):
        saver.wait()
    saver.wait()  # raised once
    saver.close()
    with pytest.raises(RuntimeError):
        saver.save({}, tmp_path / "late")


def test_unpicklable_state_fails_in_the_caller(tmp_path):
    import threading

    with uring_ckpt.AsyncSaver() as saver, pytest.raises(TypeError):
        saver.save({"lock": threading.Lock()}, tmp_path / "c")


def test_a_failed_save_is_raised_by_wait_even_after_later_saves(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    saver = uring_ckpt.AsyncSaver()
    failing = saver.save({"w": torch.ones(4)}, tmp_path / "file" / "c")  # parent is a file
    assert failing.exception() is not None
    saver.save({"w": torch.ones(4)}, tmp_path / "ok").durable()
    with pytest.raises(OSError):
        saver.wait()
    saver.wait()  # raised once, then forgotten
    saver.close()
