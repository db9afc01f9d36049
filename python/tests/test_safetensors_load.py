"""Safetensors checkpoints written by others load through uring_ckpt: files written with
``safetensors.torch.save_file`` (one file, a directory of shards, a Hugging Face directory
with ``model.safetensors.index.json``) come back equal to ``safetensors.torch.load_file``."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
import uring_ckpt
from safetensors.torch import load_file, save_file


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(37, 11, generator=g),
        "layer.0.f16": torch.randn(5, 7, 3, generator=g).to(torch.float16),
        "layer.0.bf16": torch.randn(129, generator=g).to(torch.bfloat16),
        "positions": torch.arange(-50, 1001, dtype=torch.int64),
        "mask": torch.rand(3, 17, generator=g) > 0.5,
        "bytes": torch.randint(0, 256, (1001,), dtype=torch.uint8, generator=g),
        "empty": torch.empty(0, 4, dtype=torch.float32),
        "scalar": torch.tensor(3.25, dtype=torch.float32),
        "big": torch.randn(70_001, generator=g),  # crosses read segments, ends unaligned
    }


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, expected in want.items():
        tensor = got[name]
        assert tensor.dtype == expected.dtype, name
        assert tensor.shape == expected.shape, name
        assert tensor.device.type == "cpu", name
        assert torch.equal(tensor, expected), name


def _shard(tensors: dict[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    names = list(tensors)
    return [{n: tensors[n] for n in names[i::parts]} for i in range(parts)]


@pytest.fixture
def hf_dir(tmp_path):
    """A Hugging Face layout: two shards, the index, and files the loader must ignore."""
    path = tmp_path / "hf"
    path.mkdir()
    tensors = _tensors()
    weight_map = {}
    parts = _shard(tensors, 2)
    for i, part in enumerate(parts, start=1):
        name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        save_file(part, path / name, metadata={"format": "pt"})
        weight_map.update({n: name for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text("{}")
    (path / "consolidated.safetensors").write_bytes(b"not in the weight map: never read")
    return path, tensors


def test_a_single_file_loads_like_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), path, metadata={"format": "pt"})
    _assert_same(uring_ckpt.load_safetensors(path), load_file(path))
    _assert_same(uring_ckpt.load_safetensors(str(path), verify=False), load_file(path))
    # load() has no structure to rebuild for a foreign file: the same flat dict.
    _assert_same(uring_ckpt.load(path), load_file(path))
    info = uring_ckpt.inspect(path)
    assert info["kind"] == "safetensors_file"
    assert info["manifest"]["metadata"] == {"format": "pt"}
    report = uring_ckpt.verify(path)
    assert report["kind"] == "safetensors_file"
    assert (report["tensors"], report["tensors_without_crc"]) == (0, len(_tensors()))


def test_loaded_tensors_are_writable_and_independent(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), path)
    first = uring_ckpt.load_safetensors(path)
    first["positions"] += 1
    again = uring_ckpt.load_safetensors(path)
    assert torch.equal(again["positions"], load_file(path)["positions"])


def test_a_directory_of_shards_loads_all_of_them(tmp_path):
    path = tmp_path / "shards"
    path.mkdir()
    tensors = _tensors()
    for i, part in enumerate(_shard(tensors, 3)):
        save_file(part, path / f"part-{i}.safetensors")
    (path / "README.md").write_text("not a shard")
    loaded = uring_ckpt.load_safetensors(path)
    _assert_same(loaded, tensors)
    reference = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            reference.update(load_file(path / name))
    _assert_same(loaded, reference)
    info = uring_ckpt.inspect(path)
    assert info["kind"] == "safetensors_dir"
    assert [s["file"] for s in info["manifest"]["shards"]] == [f"part-{i}.safetensors" for i in range(3)]


def test_a_hugging_face_index_loads_exactly_its_weight_map(hf_dir):
    path, tensors = hf_dir
    reference = {}
    for name in sorted(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())):
        reference.update(load_file(path / name))
    _assert_same(reference, tensors)
    _assert_same(uring_ckpt.load_safetensors(path), reference)
    _assert_same(uring_ckpt.load_safetensors(path / "model.safetensors.index.json"), reference)
    _assert_same(uring_ckpt.load(path), reference)
    assert uring_ckpt.inspect(path)["kind"] == "hugging_face_index"
    report = uring_ckpt.verify(path)
    assert (report["kind"], report["shards"], report["tensors_without_crc"]) == ("hugging_face_index", 2, len(tensors))


def test_names_loads_a_subset(hf_dir):
    path, tensors = hf_dir
    wanted = ["mask", "layer.0.bf16", "empty"]
    got = uring_ckpt.load_safetensors(path, names=wanted)
    assert list(got) == wanted
    _assert_same(got, {n: tensors[n] for n in wanted})
    with pytest.raises(uring_ckpt.TensorNotFoundError, match="nope"):
        uring_ckpt.load_safetensors(path, names=["nope"])


def test_our_own_checkpoints_load_as_flat_tensors(tmp_path):
    tensors = _tensors()
    uring_ckpt.save(tensors, tmp_path / "ours")
    _assert_same(uring_ckpt.load_safetensors(tmp_path / "ours"), tensors)
    assert uring_ckpt.inspect(tmp_path / "ours")["kind"] == "uring_ckpt"


def test_bad_paths_raise_clear_errors(tmp_path, hf_dir):
    with pytest.raises(FileNotFoundError) as info:
        uring_ckpt.load_safetensors(tmp_path / "missing.safetensors")
    assert info.value.errno == errno.ENOENT and "missing.safetensors" in str(info.value)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(uring_ckpt.NotACheckpointError, match=r"\*\.safetensors"):
        uring_ckpt.load_safetensors(tmp_path / "nothing")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(uring_ckpt.CorruptCheckpointError, match="junk.safetensors"):
        uring_ckpt.load_safetensors(tmp_path / "junk.safetensors")

    path, _ = hf_dir
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first, second = sorted(set(index["weight_map"].values()))
    moved = next(n for n, f in index["weight_map"].items() if f == first)
    index["weight_map"][moved] = second
    index_path.write_text(json.dumps(index))
    with pytest.raises(uring_ckpt.CorruptCheckpointError, match=f"{moved}.*{first}.*maps it to {second}"):
        uring_ckpt.load_safetensors(path)
    index["weight_map"][moved] = "../outside.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(uring_ckpt.CorruptCheckpointError, match="unsafe shard file name"):
        uring_ckpt.load_safetensors(path)


def test_a_cache_snapshot_of_links_is_refused_with_advice(tmp_path):
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    tensors = {"w": torch.arange(10, dtype=torch.float32)}
    save_file(tensors, blobs / "0f1e2d")
    os.symlink("../../blobs/0f1e2d", snapshot / "model.safetensors")
    with pytest.raises(uring_ckpt.CorruptCheckpointError, match="symbolic link.*snapshot_download"):
        uring_ckpt.load_safetensors(snapshot)
    # The linked file itself, given as the path, is followed.
    _assert_same(uring_ckpt.load_safetensors(snapshot / "model.safetensors"), tensors)


def test_mmap_loads_the_same_tensors_and_writes_never_reach_the_files(tmp_path, hf_dir):
    path, tensors = hf_dir
    files = {p: p.read_bytes() for p in path.iterdir()}
    got = uring_ckpt.load_safetensors(path, mmap=True)
    _assert_same(got, tensors)
    _assert_same(uring_ckpt.load_safetensors(path, names=["mask", "empty"], mmap=True),
                 {n: tensors[n] for n in ["mask", "empty"]})
    # Writable, copy-on-write: the tensor changes, the file does not.
    got["positions"] += 1
    got["big"].zero_()
    assert torch.equal(got["positions"], tensors["positions"] + 1)
    assert {p: p.read_bytes() for p in path.iterdir()} == files
    _assert_same(uring_ckpt.load_safetensors(path, mmap=True), tensors)

    single = tmp_path / "model.safetensors"
    save_file(_tensors(), single)
    _assert_same(uring_ckpt.load_safetensors(single, mmap=True), load_file(single))


def test_mmap_of_our_checkpoint_survives_its_removal(tmp_path):
    tensors = _tensors()
    path = tmp_path / "ours"
    uring_ckpt.save(tensors, path)
    got = uring_ckpt.load(path, mmap=True)
    uring_ckpt.remove(path)
    assert not path.exists()
    # Unlinked files stay readable while mapped.
    _assert_same(got, tensors)
