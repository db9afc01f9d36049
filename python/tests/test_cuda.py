"""CUDA tensors: saved from device memory with a CUDA build (``--features cuda``) on a machine
with a GPU, copied to the CPU in Python otherwise.

No test here skips on a machine where torch sees a GPU and the extension was built with
``cuda`` (``scripts/gpu-check.sh run`` fails on any skip): a setup that fails there is a test
failure. Where torch sees no GPU the GPU tests skip, saying why; a GPU with a build without
``cuda`` skips them too, unless ``URING_CKPT_REQUIRE_GPU=1`` (then it fails)."""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Any

import pytest
import uring_ckpt
from uring_ckpt import _pytree, _uring_ckpt

torch = pytest.importorskip("torch")

CONFIG = {"chunk_size": "1MiB", "staging_pool_size": "16MiB"}
POOL_BUFFERS = 16
_SAVE_ERRORS = (OSError, uring_ckpt.CheckpointError)


def _libcuda() -> Any:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def _require_gpu() -> None:
    """Skips (no GPU for torch), or fails (a GPU, but the extension cannot read it)."""
    if not torch.cuda.is_available():
        reason = "torch sees no CUDA device"
        print(f"skipped: {reason}")
        pytest.skip(reason)
    if _uring_ckpt.cuda_available():
        return
    if _uring_ckpt.cuda_built():
        pytest.fail("torch sees a GPU and the extension has CUDA, but cuda_available() is False")
    if os.environ.get("URING_CKPT_REQUIRE_GPU") == "1":
        pytest.fail("URING_CKPT_REQUIRE_GPU=1 but the extension was built without the cuda feature")
    reason = "the extension was built without the cuda feature (maturin develop --features cuda)"
    print(f"skipped: {reason}")
    pytest.skip(reason)


def test_cuda_available_is_a_bool_and_false_without_the_feature_or_driver() -> None:
    available = _uring_ckpt.cuda_available()
    assert isinstance(available, bool)
    assert uring_ckpt.cuda_available() is available
    if not _uring_ckpt.cuda_built() or _libcuda() is None:
        assert available is False
    elif torch.cuda.is_available():
        assert available is True, "a CUDA build where torch sees a GPU must read device memory"


def test_cuda_entries_are_checked(tmp_path: Any) -> None:
    writer = _uring_ckpt.Writer(uring_ckpt.Config())
    entry = ("t", "F32", [2], "cuda", torch.zeros(2))
    if _uring_ckpt.cuda_available():
        with pytest.raises(ValueError, match="on a cuda device"):
            writer.save(str(tmp_path / "c"), [entry], [], {})
    else:
        error = uring_ckpt.UnavailableError if _uring_ckpt.cuda_built() else ValueError
        with pytest.raises(error, match="CUDA"):
            writer.save(str(tmp_path / "c"), [entry], [], {})
    assert not (tmp_path / "c").exists()


def test_cuda_direct_says_once_why_not(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pytree._flatten, "_cuda_direct_state", None)
    with caplog.at_level(logging.INFO, logger="uring_ckpt"):
        direct = _pytree.cuda_direct()
        assert _pytree.cuda_direct() is direct
    assert direct is _uring_ckpt.cuda_available()
    messages = [r.getMessage() for r in caplog.records if r.name == "uring_ckpt"]
    if direct:
        assert messages == []
    else:
        assert len(messages) == 1, messages
        assert "copied to the CPU" in messages[0]


def test_cuda_tensor_falls_back_to_a_cpu_copy(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        reason = "torch sees no CUDA device: no CUDA tensor to fall back with"
        print(f"skipped: {reason}")
        pytest.skip(reason)
    monkeypatch.setattr(_pytree._flatten, "_cuda_direct_state", False)  # the fallback, forced
    t = torch.arange(64, dtype=torch.float32, device="cuda")
    report = uring_ckpt.save({"t": t}, tmp_path / "c")
    assert report["cuda_tensors"] == 0
    assert report["python_copied_bytes"] == t.numel() * t.element_size()
    back = uring_ckpt.load(tmp_path / "c", device="cuda")
    assert torch.equal(back["t"], t)


def _state(seed: int = 7) -> dict[str, Any]:
    g = torch.Generator(device="cuda").manual_seed(seed)
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
    report = uring_ckpt.save(state, tmp_path / "c", config=CONFIG)
    assert report["cuda_tensors"] == 3
    assert report["cuda_bytes"] == _device_bytes(state)
    assert report["python_copied_bytes"] == 0
    writer = uring_ckpt._writer(CONFIG)
    assert writer.cuda_staging_buffers == POOL_BUFFERS, "every staging buffer page-locked"
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
    with uring_ckpt.AsyncSaver(CONFIG, mode=mode) as saver:
        future = saver.save(state, tmp_path / "c")
        assert future.staged(timeout=0)  # save() returns once staged
        for t in state["model"].values():
            t.fill_(-1)  # changes after staged must not reach the checkpoint
        report = future.durable()
        assert saver._writer.cuda_staging_buffers == POOL_BUFFERS, mode
    assert report["cuda_tensors"] == 3
    assert report["cuda_bytes"] == sum(
        expected[k].numel() * expected[k].element_size() for k in ("w_f32", "w_bf16", "empty")
    )
    assert report["python_copied_bytes"] == 0
    back = uring_ckpt.load(tmp_path / "c", device="cuda")
    for name, t in expected.items():
        assert torch.equal(back["model"][name], t), name


def _current_context() -> int:
    lib = _libcuda()
    assert lib is not None, "libcuda.so.1 must load where torch sees a GPU"
    ctx = ctypes.c_void_p()
    assert lib.cuCtxGetCurrent(ctypes.byref(ctx)) == 0
    return ctx.value or 0


def test_a_save_leaves_the_current_device_and_context_alone(tmp_path: Any) -> None:
    _require_gpu()
    state = _state()
    lib = _libcuda()
    results: list[Any] = []

    def in_thread(clear: bool) -> None:
        try:
            if clear:
                assert lib.cuCtxSetCurrent(None) == 0
            torch.cuda.current_stream(0)  # whatever torch itself sets up, before the check
            before = (_current_context(), torch.cuda.current_device())
            uring_ckpt.save(state, tmp_path / f"t{clear}", config=CONFIG)
            with uring_ckpt.AsyncSaver(CONFIG, mode="stream") as saver:
                saver.save(state, tmp_path / f"a{clear}").durable()
            results.append((before, (_current_context(), torch.cuda.current_device())))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            results.append(e)

    main_before = (_current_context(), torch.cuda.current_device())
    for clear in (False, True):
        thread = threading.Thread(target=in_thread, args=(clear,))
        thread.start()
        thread.join()
    assert (_current_context(), torch.cuda.current_device()) == main_before
    for r in results:
        if isinstance(r, BaseException):
            raise r
        before, after = r
        assert after == before, "a save changed the thread's current context or device"
    for name in ("tFalse", "aFalse", "tTrue", "aTrue"):
        _assert_same(state, uring_ckpt.load(tmp_path / name, device="cuda"))


@pytest.mark.parametrize("mode", ["sync", "snapshot", "stream"])
def test_many_saves_a_failed_one_and_good_ones_after(tmp_path: Any, mode: str) -> None:
    _require_gpu()
    (tmp_path / "file").write_bytes(b"not a directory")
    saver = None if mode == "sync" else uring_ckpt.AsyncSaver(CONFIG, mode=mode)
    try:
        for i in range(12):
            state = _state(seed=i)
            path = tmp_path / ("file/c" if i == 4 else f"c{i}")
            if saver is None:
                if i == 4:
                    with pytest.raises(_SAVE_ERRORS):
                        uring_ckpt.save(state, path, config=CONFIG)
                    continue
                uring_ckpt.save(state, path, config=CONFIG)
                locked = uring_ckpt._writer(CONFIG).cuda_staging_buffers
            else:
                if i == 4:
                    with pytest.raises(_SAVE_ERRORS):
                        saver.save(state, path).durable()
                    continue
                saver.save(state, path).durable()
                locked = saver._writer.cuda_staging_buffers
            assert locked == POOL_BUFFERS, (mode, i)
            _assert_same(state, uring_ckpt.load(path, device="cuda"))
            uring_ckpt.remove(path)
    finally:
        if saver is not None:
            saver._futures.clear()  # the failed save's error was taken above
            saver.close()


def _busy(stream: Any, t: Any, value: float) -> None:
    """Queues, on ``stream``, a long kernel and then a write of ``value`` into ``t``."""
    with torch.cuda.stream(stream):
        torch.cuda._sleep(int(3e8))  # a few hundred ms of GPU time
        t.fill_(value)


@pytest.mark.parametrize("mode", ["sync", "snapshot", "stream"])
def test_a_save_waits_for_kernels_still_writing_the_tensor(tmp_path: Any, mode: str) -> None:
    _require_gpu()
    t = torch.zeros(16 << 20, device="cuda")  # 64 MiB
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    for case in ("inside", "wait_stream"):
        value = 1.0 if case == "inside" else 2.0
        path = tmp_path / f"{mode}-{case}"
        _busy(side, t, value)
        if case == "inside":
            ctx = torch.cuda.stream(side)  # the save runs with the side stream current
        else:
            torch.cuda.current_stream().wait_stream(side)
            ctx = torch.cuda.stream(torch.cuda.current_stream())
        with ctx:
            if mode == "sync":
                uring_ckpt.save({"t": t}, path, config=CONFIG)
            else:
                with uring_ckpt.AsyncSaver(CONFIG, mode=mode) as saver:
                    saver.save({"t": t}, path).durable()
        back = uring_ckpt.load(path)
        assert bool((back["t"] == value).all()), f"{mode}/{case}: the save read the tensor too early"
    torch.cuda.synchronize()


def test_stream_mode_lets_go_of_temporary_copies_when_staged(tmp_path: Any) -> None:
    _require_gpu()
    base = torch.arange(64 << 20, dtype=torch.float32, device="cuda").reshape(8192, 8192)
    view = base.t()  # not contiguous: flatten makes a 256 MiB copy on the device
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    with uring_ckpt.AsyncSaver(CONFIG, mode="stream") as saver:
        future = saver.save({"v": view}, tmp_path / "c")
        after_staged = torch.cuda.memory_allocated()
        future.durable()
    assert after_staged == baseline, "the contiguous copy is still held after staged"
    assert torch.equal(uring_ckpt.load(tmp_path / "c", device="cuda")["v"], view)


def _host_peak_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def test_load_to_a_cuda_device_fills_device_memory_without_a_host_copy(tmp_path: Any) -> None:
    _require_gpu()
    state = {"w": torch.randn(4096, 4096), "b": torch.arange(1000, dtype=torch.int64), "e": torch.empty(0)}
    uring_ckpt.save({"model": state, "step": 3}, tmp_path / "ck", config=CONFIG)
    del state["w"]  # keep host memory down before measuring
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _host_peak_kib()
    loaded = uring_ckpt.load(tmp_path / "ck", device="cuda:0", config=CONFIG)
    grown_mib = (_host_peak_kib() - before) / 1024
    assert loaded["step"] == 3
    assert loaded["model"]["w"].device.type == "cuda" and loaded["model"]["b"].device.type == "cuda"
    assert torch.equal(loaded["model"]["b"].cpu(), state["b"])
    assert loaded["model"]["e"].shape == (0,)
    # 64 MiB of tensor bytes went through a 16 MiB pool: no full host copy.
    assert grown_mib < 48, f"host peak grew {grown_mib:.0f} MiB"


def test_load_into_a_cuda_model_in_place(tmp_path: Any) -> None:
    _require_gpu()
    torch.manual_seed(0)
    source = torch.nn.Linear(300, 200)
    uring_ckpt.save(source.state_dict(), tmp_path / "ck", config=CONFIG)
    dest = torch.nn.Linear(300, 200).cuda()
    pointer = dest.weight.data_ptr()
    uring_ckpt.load_into(dest, tmp_path / "ck", config=CONFIG)
    assert dest.weight.data_ptr() == pointer
    assert torch.equal(dest.weight.cpu(), source.weight.detach())
    assert torch.equal(dest.bias.cpu(), source.bias.detach())
    mixed = {"weight": torch.zeros(200, 300), "bias": torch.zeros(200, device="cuda")}
    result = uring_ckpt.load_into(mixed, tmp_path / "ck", config=CONFIG)
    assert result.missing == [] and torch.equal(mixed["bias"].cpu(), source.bias.detach())


def test_load_safetensors_to_a_cuda_device(tmp_path: Any) -> None:
    _require_gpu()
    from safetensors.torch import save_file

    state = {"a": torch.randn(1000, 33), "b": torch.arange(7, dtype=torch.int64)}
    save_file(state, str(tmp_path / "m.safetensors"))
    loaded = uring_ckpt.load_safetensors(tmp_path / "m.safetensors", device="cuda:0", config=CONFIG)
    for k, v in state.items():
        assert loaded[k].device.type == "cuda" and torch.equal(loaded[k].cpu(), v), k
