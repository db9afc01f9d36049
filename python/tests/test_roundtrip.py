"""save/load round trips: Lightning-like checkpoint dicts, every dtype, layouts, tying,
numpy, interop with the upstream safetensors reader, zero-copy paths."""

from __future__ import annotations

import collections
import json
import os
import threading
import time
import warnings

import numpy as np
import pytest
import torch
import uring_ckpt
from safetensors.torch import load_file
from uring_ckpt import _pytree


def assert_same(a, b, path="state"):
    """Deep equality: same container types, same tensor dtypes, shapes and values."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, path
        assert a.requires_grad == b.requires_grad, path
        assert torch.equal(a.detach().cpu(), b.detach().cpu()), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16).to(torch.bfloat16)
        self.proj = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16).to(torch.bfloat16)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).float()
        return self.norm(self.proj(h).to(torch.bfloat16)).float()


def lightning_like_checkpoint() -> dict:
    """What Lightning's ``dump_checkpoint`` produces for a model with bf16 and f32 params
    after an Adam step."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = model(torch.randint(0, 50, (4, 8))).square().mean()
    loss.backward()
    opt.step()
    return {
        "epoch": 2,
        "global_step": 120,
        "pytorch-lightning_version": "2.6.6",
        "state_dict": model.state_dict(),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 3, "completed": 2}}}},
        "callbacks": {
            "ModelCheckpoint{'monitor': None}": {
                "best_model_score": None,
                "kth_value": torch.tensor(float("inf")),
            }
        },
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": {"lr": 1e-3, "layers": [16, 16], "name": "tiny"},
    }


def test_lightning_checkpoint_dict_round_trips(tmp_path):
    ckpt = lightning_like_checkpoint()
    dtypes = {t.dtype for t in ckpt["state_dict"].values()}
    assert {torch.bfloat16, torch.float32, torch.int64} <= dtypes
    assert ckpt["optimizer_states"][0]["state"][0]["exp_avg"].dtype == torch.bfloat16
    report = uring_ckpt.save(ckpt, tmp_path / "c.ckpt")
    assert report["tensors"] > 10
    loaded = uring_ckpt.load(tmp_path / "c.ckpt")
    assert_same(ckpt, loaded)
    assert_same(ckpt, uring_ckpt.load(tmp_path / "c.ckpt", mmap=True))
    # The optimizer and model accept what was loaded.
    model = Net()
    model.load_state_dict(loaded["state_dict"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt.load_state_dict(loaded["optimizer_states"][0])


def test_tensor_names_are_paths_and_shards_load_with_safetensors(tmp_path):
    ckpt = lightning_like_checkpoint()
    uring_ckpt.save(ckpt, tmp_path / "c")
    names = [t["name"] for t in uring_ckpt.inspect(tmp_path / "c")["tensors"]]
    assert "state_dict/proj.weight" in names
    assert "optimizer_states/0/state/0/exp_avg" in names
    assert "callbacks/ModelCheckpoint{'monitor': None}/kth_value" in names
    shards = sorted(p for p in os.listdir(tmp_path / "c") if p.endswith(".safetensors"))
    upstream = {}
    for shard in shards:
        upstream.update(load_file(str(tmp_path / "c" / shard)))
    assert torch.equal(upstream["state_dict/proj.weight"], ckpt["state_dict"]["proj.weight"])
    assert upstream["state_dict/embed.weight"].dtype == torch.bfloat16
    assert torch.equal(upstream["state_dict/embed.weight"], ckpt["state_dict"]["embed.weight"])
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["extra_files"][0]["file"] == "extras.pkl"
    assert manifest["metadata"]["uring_ckpt.python.format"] == "1"


@pytest.mark.parametrize("dtype", sorted(_pytree.torch_dtype_map(), key=str))
def test_every_torch_dtype(tmp_path, dtype):
    torch.manual_seed(1)
    raw = torch.randint(0, 256, (3, 5 * torch.empty((), dtype=dtype).element_size()), dtype=torch.uint8)
    if dtype == torch.bool:
        t = raw.view(torch.bool) if False else (raw % 2).bool()
    else:
        t = raw.view(dtype)
    uring_ckpt.save({"t": t, "scalar": t.flatten()[0].clone()}, tmp_path / "c")
    back = uring_ckpt.load(tmp_path / "c")
    assert back["t"].dtype == dtype and back["t"].shape == t.shape
    assert torch.equal(back["t"].view(torch.uint8), t.view(torch.uint8))
    assert back["scalar"].shape == () and back["scalar"].dtype == dtype


def test_layouts_tying_and_odd_values(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    shared = torch.randn(7, 3)
    param = torch.nn.Parameter(torch.randn(2, 2))
    state = collections.OrderedDict(
        transposed=base.t(),
        sliced=base[1:3, ::2],
        expanded=torch.ones(3).expand(4, 3),
        conj=torch.randn(3, dtype=torch.complex64).conj(),
        empty=torch.empty(0, 4, dtype=torch.float16),
        scalar=torch.tensor(7, dtype=torch.int32),
        a=shared,
        b=shared.view(7, 3),  # same storage, offset, shape, strides: tied
        c=[shared, (shared, {"deep": shared})],
        param=param,
        grad_leaf=torch.ones(2, requires_grad=True),
        complex128=torch.randn(3, dtype=torch.complex128),  # no safetensors dtype: pickled
        nothing=None,
        text="hello",
        numbers={1: 2.5, "x": (1, 2)},
        a_set={1, 2, 3},
    )
    uring_ckpt.save(state, tmp_path / "c")
    # The complex128 tensor is pickled by torch's own reducer (torch._utils rebuild
    # functions and a storage unpickled with torch.load): only a trusted load rebuilds it.
    with pytest.raises(uring_ckpt.UnsafeCheckpointError, match="weights_only=False"):
        uring_ckpt.load(tmp_path / "c")
    back = uring_ckpt.load(tmp_path / "c", weights_only=False)
    assert type(back) is collections.OrderedDict
    for key in ("transposed", "sliced", "expanded", "conj", "empty", "scalar", "complex128"):
        assert torch.equal(back[key], state[key].resolve_conj()), key
        assert back[key].dtype == state[key].dtype
    assert back["a"] is back["b"] and back["c"][0] is back["a"] and back["c"][1][1]["deep"] is back["a"]
    assert torch.equal(back["a"], shared)
    back["a"][0, 0] = 123.0  # restored tied: one change shows everywhere
    assert back["c"][1][0][0, 0] == 123.0
    assert isinstance(back["param"], torch.nn.Parameter) and back["param"].requires_grad
    assert back["grad_leaf"].requires_grad and not isinstance(back["grad_leaf"], torch.nn.Parameter)
    assert back["nothing"] is None and back["text"] == "hello" and back["a_set"] == {1, 2, 3}
    assert back["numbers"] == {1: 2.5, "x": (1, 2)}
    stored = {t["name"] for t in uring_ckpt.inspect(tmp_path / "c")["tensors"]}
    assert "a" in stored and "b" not in stored and "c/0" not in stored  # stored once
    assert "complex128" not in stored


def test_numpy_arrays_stay_numpy(tmp_path):
    arrays = {
        "f32": np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32),
        "fortran": np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4)),
        "big_endian": np.arange(5, dtype=">i4"),
        "bool": np.array([True, False, True]),
        "u16": np.arange(4, dtype=np.uint16),
        "c64": np.array([1 + 2j], dtype=np.complex64),
        "empty": np.zeros((0, 3), dtype=np.float64),
        "scalar": np.array(3.5),
        "strings": np.array(["a", "bc"]),  # not a tensor dtype: pickled
        "np_scalar": np.float32(1.5),
    }
    uring_ckpt.save(arrays, tmp_path / "c")
    # The string array is pickled by numpy's reducer (numpy._core.numeric._frombuffer): only
    # a trusted load rebuilds it; the rest loads with the default weights_only=True.
    with pytest.raises(uring_ckpt.UnsafeCheckpointError, match="numpy"):
        uring_ckpt.load(tmp_path / "c")
    back = uring_ckpt.load(tmp_path / "c", weights_only=False)
    for key, a in arrays.items():
        assert type(back[key]) is type(a), key
        np.testing.assert_array_equal(back[key], a)
    assert back["big_endian"].dtype == np.dtype("=i4")
    assert back["fortran"].flags.c_contiguous and back["f32"].flags.writeable


def test_contiguous_cpu_tensors_are_not_copied(tmp_path):
    state = {"w": torch.randn(256, 1024), "v": np.ones(4096, dtype=np.float32)}
    report = uring_ckpt.save(state, tmp_path / "c")
    assert report["python_copied_bytes"] == 0
    assert report["data_bytes"] == 256 * 1024 * 4 + 4096 * 4
    flat = _pytree.flatten(state)
    assert flat.tensors[0].obj.data_ptr() == state["w"].data_ptr()
    assert flat.tensors[1].obj.__array_interface__["data"][0] == state["v"].__array_interface__["data"][0]


@pytest.mark.parametrize("engine", ["uring", "pwrite", "buffered"])
def test_torch_allocations_past_a_page_go_to_disk_without_a_copy(tmp_path, engine):
    # torch puts a large tensor 64 bytes past a page (40 MiB: above glibc's largest mmap
    # threshold, so it is mapped whatever ran before); the shard's data region takes that
    # phase, so address and file offset agree and O_DIRECT writes it from its memory.
    w = torch.randn(2560, 4096)
    state = {"w": w, "b": torch.randn(1000), "e": torch.empty(0), "u": torch.arange(300_001).to(torch.uint8)}
    phase = w.data_ptr() % 4096
    assert phase % 8 == 0
    report = uring_ckpt.save(state, tmp_path / "c", config={"engine": engine})
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    (shard,) = manifest["shards"]
    assert shard["header_len"] % 4096 == phase, (shard, phase)
    with open(tmp_path / "c" / shard["file"], "rb") as f:
        raw = f.read(shard["header_len"])
    assert raw[8:].rstrip(b" ").endswith(b"}")  # the JSON, then spaces up to the data
    if report["engine"]["direct_io"]:
        align = max(report["engine"]["align"], 4096)  # writes are cut at 4096-byte offsets
        assert w.nbytes - align <= report["zero_copy_bytes"] <= w.nbytes, report
    loaded = load_file(str(tmp_path / "c" / shard["file"]))
    for key, t in state.items():
        assert torch.equal(loaded[key], t), key
    assert_same(uring_ckpt.load(tmp_path / "c"), state)
    assert uring_ckpt.verify(tmp_path / "c")["tensors"] == len(state)


def test_loaded_tensors_are_writable_views_without_warnings(tmp_path):
    uring_ckpt.save({"w": torch.arange(10, dtype=torch.float32)}, tmp_path / "c")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = uring_ckpt.load(tmp_path / "c")
    back["w"].mul_(2)
    assert back["w"][3] == 6.0


def test_load_names_device_and_verify_flag(tmp_path):
    ckpt = lightning_like_checkpoint()
    uring_ckpt.save(ckpt, tmp_path / "c")
    some = uring_ckpt.load(tmp_path / "c", names=["state_dict/proj.bias"], verify=False)
    assert list(some) == ["state_dict/proj.bias"]
    assert torch.equal(some["state_dict/proj.bias"], ckpt["state_dict"]["proj.bias"])
    meta = uring_ckpt.load(tmp_path / "c", device="meta")
    assert meta["state_dict"]["proj.bias"].device.type == "meta"
    with pytest.raises(uring_ckpt.TensorNotFoundError, match="nope"):
        uring_ckpt.load(tmp_path / "c", names=["nope"])


def test_weights_only_refuses_arbitrary_globals(tmp_path):
    uring_ckpt.save(
        {"w": torch.ones(2), "od": collections.OrderedDict(a=1), "dev": torch.device("cpu")}, tmp_path / "ok"
    )
    assert uring_ckpt.load(tmp_path / "ok", weights_only=True)["od"] == {"a": 1}
    uring_ckpt.save({"w": torch.ones(2), "f": threading.Event}, tmp_path / "bad")
    import pickle

    for kwargs in ({}, {"weights_only": True}):  # safe by default
        with pytest.raises(pickle.UnpicklingError, match="threading.Event") as info:
            uring_ckpt.load(tmp_path / "bad", **kwargs)
        assert isinstance(info.value, uring_ckpt.UnsafeCheckpointError)
        assert isinstance(info.value, uring_ckpt.CorruptCheckpointError)
        assert "weights_only=False" in str(info.value) and "add_safe_globals" in str(info.value)
    assert uring_ckpt.load(tmp_path / "bad", weights_only=False)["f"] is threading.Event


def test_replace_and_remove(tmp_path):
    path = tmp_path / "c"
    uring_ckpt.save({"x": torch.zeros(3)}, path)
    with pytest.raises(uring_ckpt.CheckpointExistsError) as info:
        uring_ckpt.save({"x": torch.ones(3)}, path)
    assert isinstance(info.value, FileExistsError)
    uring_ckpt.save({"x": torch.ones(3)}, path, replace=True)
    assert torch.equal(uring_ckpt.load(path)["x"], torch.ones(3))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dirs left
    uring_ckpt.remove(path)
    assert not path.exists()
    uring_ckpt.remove(path)  # missing: fine
    (tmp_path / "plain").mkdir()
    with pytest.raises(uring_ckpt.NotACheckpointError):
        uring_ckpt.remove(tmp_path / "plain")
    assert (tmp_path / "plain").exists()


def test_rust_written_checkpoint_loads_as_flat_dict(tmp_path):
    # No sidecar: the shape of a checkpoint the Rust API or the CLI wrote.
    w = uring_ckpt.Writer(uring_ckpt.Config())
    data = np.arange(6, dtype=np.float32)
    w.save(str(tmp_path / "c"), [("a.b", "F32", [2, 3], "buffer", data.view(np.uint8))], [], {})
    back = uring_ckpt.load(tmp_path / "c")
    assert list(back) == ["a.b"] and torch.equal(back["a.b"], torch.arange(6.0).reshape(2, 3))


def test_config_objects_and_dicts(tmp_path):
    cfg = uring_ckpt.Config(engine="pwrite", chunk_size="1MiB", staging_pool_size="4MiB", io_threads=2)
    assert "pwrite" in repr(cfg) and not cfg.replace_existing
    assert cfg.replace(replace_existing=True).replace_existing
    for config in (cfg, {"engine": "buffered"}, {"engine": "uring", "direct_io": False}):
        path = tmp_path / f"c{abs(hash(str(config)))}"
        uring_ckpt.save({"x": torch.randn(1000)}, path, config=config)
        assert uring_ckpt.verify(path)["tensors"] == 1
    with pytest.raises(uring_ckpt.ConfigError, match="queue_depth"):
        uring_ckpt.Config(queue_depth=0)
    with pytest.raises(uring_ckpt.ConfigError):
        uring_ckpt.Config(no_such_key=1)
    with pytest.raises(TypeError):
        uring_ckpt.save({}, tmp_path / "x", config=42)


def test_gil_is_released_during_io(tmp_path):
    big = {"w": torch.randn((64 << 20) // 4)}  # 64 MiB
    ticks = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    thread = threading.Thread(target=tick)
    thread.start()
    try:
        time.sleep(0.01)
        before = len(ticks)
        uring_ckpt.save(big, tmp_path / "c", config={"engine": "buffered"})
        during_save = len(ticks) - before
        before = len(ticks)
        uring_ckpt.load(tmp_path / "c")
        during_load = len(ticks) - before
    finally:
        stop.set()
        thread.join()
    assert during_save > 3 and during_load > 0, (during_save, during_load)
