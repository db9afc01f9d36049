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


def test_reserve_faults_the_area_in_before_the_first_save_which_then_trims_it(tmp_path):
    w = torch.arange(3 << 20, dtype=torch.float32)  # 12 MiB
    state = {"w": w, "tied": w, "step": 3, "small": torch.ones(8)}
    assert uring_ckpt.snapshot_bytes(state) == (12 << 20) + 32, "tied tensors count once"
    with uring_ckpt.AsyncSaver(reserve=state) as saver:
        stats = saver.snapshot_stats()
        assert stats["areas"] == 1 and stats["in_use"] == 0, stats
        assert stats["reserved_bytes"] >= (12 << 20) + 32, stats
        saver.wait_reserved()
        stats = saver.snapshot_stats()
        assert not stats["reserving"] and stats["resident_bytes"] == stats["reserved_bytes"], stats
        saver.save(state, tmp_path / "c").durable(timeout=60)
        stats = saver.snapshot_stats()
        assert stats["areas"] == 1 and stats["reserved_bytes"] == (12 << 20) + 4096, "it fit: kept"
    back = uring_ckpt.load(tmp_path / "c")
    assert torch.equal(back["w"], w) and back["tied"] is back["w"] and back["step"] == 3
    with uring_ckpt.AsyncSaver(reserve=64 << 20) as saver:  # a guess too large
        saver.save(state, tmp_path / "d").durable(timeout=60)
        stats = saver.snapshot_stats()
        assert stats["reserved_bytes"] == 14 << 20, "trimmed to the first save's size, to 2 MiB"


def test_a_save_right_after_a_large_reservation_takes_it_over(tmp_path):
    w = torch.randn(5 << 20)  # 20 MiB
    with uring_ckpt.AsyncSaver(reserve=256 << 20) as saver:
        saver.save({"w": w}, tmp_path / "c").durable(timeout=60)
        stats = saver.snapshot_stats()
        assert stats["areas"] == 1 and not stats["reserving"], stats
        assert stats["reserved_bytes"] == 20 << 20, stats
    assert torch.equal(uring_ckpt.load(tmp_path / "c")["w"], w)


def test_snapshot_bytes_and_reserve_arguments():
    m = torch.nn.Linear(10, 20)
    assert uring_ckpt.snapshot_bytes(m) == (200 + 20) * 4, "a module counts its state_dict()"
    assert uring_ckpt.snapshot_bytes(1234) == 1234
    with pytest.raises(ValueError):
        uring_ckpt.snapshot_bytes(-1)
    with pytest.raises(TypeError):
        uring_ckpt.snapshot_bytes(True)
    with uring_ckpt.AsyncSaver(mode="stream") as saver, pytest.raises(ValueError, match="snapshot"):
        saver.reserve(1 << 20)
    with uring_ckpt.AsyncSaver(reserve=m) as saver:
        assert saver.snapshot_stats()["reserved_bytes"] >= 880


def test_background_settings_are_config_keys(tmp_path):
    cfg = uring_ckpt.Config(background_nice=5, background_threads=1)
    assert "background_nice = 5" in cfg.to_toml() and "background_threads = 1" in cfg.to_toml()
    with pytest.raises(uring_ckpt.ConfigError, match="background_nice"):
        uring_ckpt.Config(background_nice=20)
    with pytest.raises(uring_ckpt.ConfigError, match="background_threads"):
        uring_ckpt.Config(background_threads=0)
    with uring_ckpt.AsyncSaver(cfg) as saver:
        saver.save({"x": torch.ones(3)}, tmp_path / "c").durable(timeout=60)
    assert torch.equal(uring_ckpt.load(tmp_path / "c")["x"], torch.ones(3))
