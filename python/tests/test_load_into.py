"""``load_into``: a checkpoint loaded in place into a model or a state dict (the restore
path: staging pool, copy threads, CRCs in the same pass), with every mismatch raised at
once; and loads straight into CUDA memory (GPU tests in test_cuda.py)."""

from __future__ import annotations

import pytest
import uring_ckpt

torch = pytest.importorskip("torch")

CONFIG = {"chunk_size": "64KiB", "staging_pool_size": "256KiB", "max_shard_size": "1MiB"}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.uint8, torch.bool]


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, dtype in enumerate(DTYPES):
        t = torch.randint(0, 100, (97 + 13 * i,), generator=g).to(dtype)
        state[f"t.{i}"] = t
    state["big"] = torch.randn(700, 513, generator=g)  # spans staging buffers and a shard
    state["empty"] = torch.empty(0, 3)
    state["scalar"] = torch.tensor(3.5, dtype=torch.float64)
    return state


def _zeros_like(state: dict) -> dict:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def test_a_state_dict_loads_in_place_equal(tmp_path) -> None:
    state = _state()
    uring_ckpt.save(state, tmp_path / "ck", config=CONFIG)
    target = _zeros_like(state)
    pointers = {k: v.data_ptr() for k, v in target.items()}
    result = uring_ckpt.load_into(target, tmp_path / "ck", config=CONFIG)
    for key, value in state.items():
        assert torch.equal(target[key], value), key
        assert target[key].data_ptr() == pointers[key], f"{key} was replaced, not filled"
    assert result.missing == [] and result.unexpected == []
    assert result.report["data_bytes"] == sum(v.numel() * v.element_size() for v in state.values())
    assert result.report["verified"] is True


@pytest.mark.parametrize("engine", ["uring", "pwrite", "buffered"])
def test_large_tensors_are_read_straight_into_their_memory(tmp_path, engine) -> None:
    # With zero_copy_loads: 40 MiB tensors (above glibc's largest mmap threshold, so mapped whatever ran before)
    # sit 64 bytes past a page when saved and when allocated again for the load: the data
    # region takes that phase, so the aligned interior of a tensor whose memory and file
    # offset agree modulo the memory alignment is read into the tensor directly.
    g = torch.Generator().manual_seed(5)
    state = {"w": torch.randn(2560, 4096, generator=g), "b": torch.randn(1001, generator=g)}
    state["v"] = torch.randn(10_485_761, generator=g)  # after "b": at another phase in the file
    uring_ckpt.save(state, tmp_path / "ck", config={"engine": engine})
    staged = _zeros_like(state)
    assert uring_ckpt.load_into(staged, tmp_path / "ck").report["zero_copy_bytes"] == 0, "off by default"
    target = _zeros_like(state)
    config = {"engine": engine, "zero_copy_loads": True}
    result = uring_ckpt.load_into(target, tmp_path / "ck", config=config)
    for key, value in state.items():
        assert torch.equal(target[key], value), key
    report = result.report
    eng = report["engine"]
    align, mem_align = (eng["align"], eng["mem_align"]) if eng["direct_io"] else (1, 1)
    offsets = {t["name"]: t["offset"] for t in uring_ckpt.inspect(tmp_path / "ck")["tensors"]}
    direct = [k for k in ("w", "v") if (target[k].data_ptr() - offsets[k]) % mem_align == 0]
    print("read straight into memory:", direct, "alignment", align, mem_align)
    wanted = sum(target[k].nbytes for k in direct)
    # Each one's head and tail (under one block each) go through staging.
    assert wanted - 2 * len(direct) * align <= report["zero_copy_bytes"] <= wanted, report
    if state["w"].data_ptr() % 4096 == target["w"].data_ptr() % 4096:
        assert "w" in direct, "the data region's phase is w's"


def test_a_module_loads_in_place_with_tied_weights_and_buffers(tmp_path) -> None:
    def model() -> torch.nn.Module:
        m = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 50, bias=False))
        m[2].weight = m[0].weight  # tied
        m.register_buffer("steps", torch.zeros(4, dtype=torch.int64))
        return m

    torch.manual_seed(1)
    source = model()
    source.steps += 7
    uring_ckpt.save(source.state_dict(), tmp_path / "ck", config=CONFIG)
    torch.manual_seed(2)
    dest = model()
    result = uring_ckpt.load_into(dest, tmp_path / "ck", config=CONFIG)
    assert result.missing == [] and result.unexpected == []
    for (k, a), (_, b) in zip(source.state_dict().items(), dest.state_dict().items()):
        assert torch.equal(a, b), k
    assert dest[2].weight is dest[0].weight, "the tie survives"


def test_lightning_checkpoints_load_with_a_prefix(tmp_path) -> None:
    state = _state()
    uring_ckpt.save({"state_dict": state, "epoch": 3, "optimizer_states": [{"m": torch.ones(5)}]}, tmp_path / "ck")
    target = _zeros_like(state)
    uring_ckpt.load_into(target, tmp_path / "ck", prefix="state_dict/")
    assert all(torch.equal(target[k], v) for k, v in state.items())


def test_every_mismatch_is_raised_together_before_anything_is_read(tmp_path) -> None:
    state = _state()
    uring_ckpt.save(state, tmp_path / "ck", config=CONFIG)
    target = _zeros_like(state)
    del target["scalar"]  # unexpected in the checkpoint
    target["extra"] = torch.zeros(2)  # missing from the checkpoint
    target["big"] = torch.zeros(513, 700)  # shape
    target["t.0"] = torch.zeros(97, dtype=torch.float64)  # dtype
    with pytest.raises(uring_ckpt.CheckpointMismatchError) as info:
        uring_ckpt.load_into(target, tmp_path / "ck", config=CONFIG)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.missing == ["extra"] and err.unexpected == ["scalar"]
    assert len(err.mismatched) == 2
    for needle in ["big: F32 [700, 513]", "t.0: F32 [97] in the checkpoint, torch.float64", "extra: not in", "scalar: no destination"]:
        assert needle in str(err), (needle, str(err))
    assert all(not v.any() for v in target.values()), "nothing was written"

    # Not strict: names on either side are returned; shape and dtype still raise.
    target = _zeros_like(state)
    del target["scalar"]
    target["extra"] = torch.zeros(2)
    result = uring_ckpt.load_into(target, tmp_path / "ck", strict=False, config=CONFIG)
    assert result.missing == ["extra"] and result.unexpected == ["scalar"]
    assert torch.equal(target["big"], state["big"])
    target["big"] = torch.zeros(3)
    with pytest.raises(uring_ckpt.CheckpointMismatchError):
        uring_ckpt.load_into(target, tmp_path / "ck", strict=False, config=CONFIG)


def test_non_contiguous_destinations_and_a_subset(tmp_path) -> None:
    state = {"w": torch.randn(64, 32), "v": torch.randn(10)}
    uring_ckpt.save(state, tmp_path / "ck")
    w = torch.zeros(32, 64).t()  # a transposed view: not contiguous
    target = {"w": w}
    result = uring_ckpt.load_into(target, tmp_path / "ck", strict=False)
    assert torch.equal(w, state["w"]) and result.unexpected == ["v"]


def test_a_flipped_byte_is_named_by_tensor_and_file(tmp_path) -> None:
    state = {"a": torch.arange(100_000, dtype=torch.float32)}
    uring_ckpt.save(state, tmp_path / "ck")
    shard = next((tmp_path / "ck").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1000] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(uring_ckpt.CorruptCheckpointError, match=r'"a".*' + shard.name):
        uring_ckpt.load_into({"a": torch.zeros(100_000)}, tmp_path / "ck")
    target = {"a": torch.zeros(100_000)}
    uring_ckpt.load_into(target, tmp_path / "ck", verify=False)
    assert not torch.equal(target["a"], state["a"]) and (target["a"] != state["a"]).sum() == 1


def test_destinations_sharing_memory_or_not_tensors_are_refused(tmp_path) -> None:
    uring_ckpt.save({"a": torch.ones(8)}, tmp_path / "ck")
    with pytest.raises(TypeError, match="not a tensor"):
        uring_ckpt.load_into({"a": [1, 2]}, tmp_path / "ck")
    with pytest.raises(TypeError, match="nn.Module or a dict"):
        uring_ckpt.load_into([torch.ones(8)], tmp_path / "ck")


def test_device_cpu_loads_stay_on_the_host_path(tmp_path) -> None:
    state = _state()
    uring_ckpt.save(state, tmp_path / "ck")
    loaded = uring_ckpt.load(tmp_path / "ck", device="cpu")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
