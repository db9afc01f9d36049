"""CUDA tensors: saved from device memory with a CUDA build (``--features cuda``) on a machine
with a GPU, copied to the CPU in Python otherwise. The GPU tests skip, saying why, where
torch has no CUDA device or the extension cannot read device memory."""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import pytest
import uring_ckpt
from uring_ckpt import _pytree, _uring_ckpt

torch = pytest.importorskip("torch")


def _libcuda_loads() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if not _uring_ckpt.cuda_available():
        built = "built with" if _uring_ckpt.cuda_built() else "built without"
        return f"the extension was {built} the cuda feature and cuda_available() is False"
    return None


def _require_gpu() -> None:
    reason = _gpu_skip_reason()
    if reason is not None:
        print(f"skipped: {reason}")
        pytest.skip(reason)


def test_cuda_available_is_a_bool_and_false_without_the_feature_or_driver() -> None:
    available = _uring_ckpt.cuda_available()
    assert isinstance(available, bool)
    assert uring_ckpt.cuda_available() is available
    if not _uring_ckpt.cuda_built() or not _libcuda_loads():
        assert available is False
    else:
        assert available is True


def test_cuda_entry_is_refused_cleanly_without_cuda(tmp_path: Any) -> None:
    if _uring_ckpt.cuda_available():
        pytest.skip("this build reads device memory: see the GPU tests")
    writer = _uring_ckpt.Writer(uring_ckpt.Config())
    entry = ("t", "F32", [2], "cuda", torch.zeros(2))
    error = uring_ckpt.UnavailableError if _uring_ckpt.cuda_built() else ValueError
    with pytest.raises(error, match="CUDA"):
        writer.save(str(tmp_path / "c"), [entry], [], {})
    assert not (tmp_path / "c").exists()


def test_cpu_tensor_in_a_cuda_entry_is_refused() -> None:
    if not _uring_ckpt.cuda_available():
        pytest.skip("needs cuda_available() (a CUDA build where libcuda.so.1 loads)")
    writer = _uring_ckpt.Writer(uring_ckpt.Config())
    with pytest.raises(ValueError, match="on a cuda device"):
        writer.save("/nonexistent/c", [("t", "F32", [2], "cuda", torch.zeros(2))], [], {})


def test_fallback_is_logged_once(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    if _uring_ckpt.cuda_available():
        pytest.skip("this build reads device memory: no fallback to log")
    monkeypatch.setattr(_pytree._flatten, "_cuda_direct_state", None)
    with caplog.at_level(logging.INFO, logger="uring_ckpt"):
        assert _pytree.cuda_direct() is False
        assert _pytree.cuda_direct() is False
    messages = [r.getMessage() for r in caplog.records if r.name == "uring_ckpt"]
    assert len(messages) == 1, messages
    assert "copied to the CPU" in messages[0]


def test_cuda_tensor_falls_back_to_a_cpu_copy(tmp_path: Any) -> None:
    if not torch.cuda.is_available():
        reason = "torch sees no CUDA device: no CUDA tensor to fall back with"
        print(f"skipped: {reason}")
        pytest.skip(reason)
    if _uring_ckpt.cuda_available():
        pytest.skip("this build reads device memory: no fallback")
    t = torch.arange(64, dtype=torch.float32, device="cuda")
    report = uring_ckpt.save({"t": t}, tmp_path / "c")
    assert report["cuda_tensors"] == 0
    assert report["python_copied_bytes"] == t.numel() * t.element_size()
    back = uring_ckpt.load(tmp_path / "c", device="cuda")
    assert torch.equal(back["t"], t)


def _state() -> dict[str, Any]:
    g = torch.Generator(device="cuda").manual_seed(7)
    w = torch.randn(1024, 513, device="cuda", generator=g)
    return {
        "model": {
            "w_f32": w,
            "w_bf16": torch.randn(3, 1 << 20, device="cuda", generator=g).to(torch.bfloat16),
            "tied": w,
            "empty": torch.empty(0, 4, device="cuda"),
        },
        "step": 3,
    }


def _device_bytes(state: dict[str, Any]) -> int:
    m = state["model"]
    return sum(m[k].numel() * m[k].element_size() for k in ("w_f32", "w_bf16", "empty"))


def _assert_same(state: dict[str, Any], back: dict[str, Any]) -> None:
    assert back["step"] == 3
    for name, t in state["model"].items():
        b = back["model"][name]
        assert b.device.type == "cuda", name
        assert b.dtype == t.dtype and b.shape == t.shape, name
        assert torch.equal(b, t), name
    assert back["model"]["tied"] is back["model"]["w_f32"]


def test_sync_save_reads_device_memory(tmp_path: Any) -> None:
    _require_gpu()
    state = _state()
    report = uring_ckpt.save(state, tmp_path / "c", config={"chunk_size": "1MiB"})
    assert report["cuda_tensors"] == 3
    assert report["cuda_bytes"] == _device_bytes(state)
    assert report["python_copied_bytes"] == 0
    writer = uring_ckpt._writer({"chunk_size": "1MiB"})
    print(f"page-locked staging buffers: {writer.cuda_staging_buffers}")
    _assert_same(state, uring_ckpt.load(tmp_path / "c", device="cuda"))


def test_noncontiguous_cuda_tensor_is_made_contiguous_on_the_device(tmp_path: Any) -> None:
    _require_gpu()
    t = torch.arange(12 * 7, dtype=torch.float32, device="cuda").reshape(12, 7).t()
    report = uring_ckpt.save({"t": t}, tmp_path / "c")
    assert report["cuda_tensors"] == 1
    assert report["python_copied_bytes"] == t.numel() * t.element_size()
    back = uring_ckpt.load(tmp_path / "c", device="cuda")
    assert torch.equal(back["t"], t)


@pytest.mark.parametrize("mode", ["snapshot", "stream"])
def test_async_save_reads_device_memory_until_staged(tmp_path: Any, mode: str) -> None:
    _require_gpu()
    state = _state()
    expected = {k: v.clone() for k, v in state["model"].items()}
    with uring_ckpt.AsyncSaver({"chunk_size": "1MiB"}, mode=mode) as saver:
        future = saver.save(state, tmp_path / "c")
        assert future.staged(timeout=0)  # save() returns once staged
        for t in state["model"].values():
            t.fill_(-1)  # changes after staged must not reach the checkpoint
        report = future.durable()
        print(f"{mode}: page-locked staging buffers: {saver._writer.cuda_staging_buffers}")
    assert report["cuda_tensors"] == 3
    assert report["cuda_bytes"] == sum(
        expected[k].numel() * expected[k].element_size() for k in ("w_f32", "w_bf16", "empty")
    )
    assert report["python_copied_bytes"] == 0
    back = uring_ckpt.load(tmp_path / "c", device="cuda")
    for name, t in expected.items():
        assert torch.equal(back["model"][name], t), name
