"""A flat state dict saved by uring_ckpt.save is also a Hugging Face checkpoint:
``model.safetensors.index.json`` beside the manifest, ``"format": "pt"`` in every shard
header, tensor names equal to the keys; small extra files (``config.json``) are committed
with it. With ``transformers`` installed, ``from_pretrained`` loads it."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

import uring_ckpt

torch = pytest.importorskip("torch")
safetensors = pytest.importorskip("safetensors")

INDEX = "model.safetensors.index.json"


def small_config() -> dict[str, Any]:
    # Small shards, so that the index maps tensors to several files.
    return {"max_shard_size": "1MiB"}


def test_flat_state_dict_gets_an_index_format_pt_and_extra_files(tmp_path: Any) -> None:
    path = tmp_path / "flat"
    emb = torch.randn(1000, 128)  # 512 KiB
    sd = {"emb.weight": emb, "head.weight": emb, "ln.bias": torch.randn(64), "w": torch.randn(3000, 64)}
    config = json.dumps({"model_type": "test"}).encode()
    uring_ckpt.save(sd, path, config=small_config(), extra_files={"config.json": config, "README.md": b"hi"})
    assert (path / "config.json").read_bytes() == config
    index = json.loads((path / INDEX).read_text())
    # Tied tensors are stored once, under the first key.
    assert sorted(index["weight_map"]) == ["emb.weight", "ln.bias", "w"]
    assert index["metadata"]["total_size"] == (1000 * 128 + 64 + 3000 * 64) * 4
    assert len(set(index["weight_map"].values())) > 1, "several shards"
    manifest = json.loads((path / "manifest.json").read_text())
    assert {INDEX, "config.json", "README.md", "extras.pkl"} <= {f["file"] for f in manifest["extra_files"]}
    assert index["weight_map"] == manifest["weight_map"]
    for shard in {s["file"] for s in manifest["shards"]}:
        with safetensors.safe_open(str(path / shard), framework="pt") as f:
            assert f.metadata()["format"] == "pt", shard
            for key in f.keys():
                assert index["weight_map"][key] == shard
    uring_ckpt.verify(path)
    loaded = uring_ckpt.load(path)
    assert loaded["head.weight"] is loaded["emb.weight"] and torch.equal(loaded["w"], sd["w"])
    # Through the Hugging Face index, as any safetensors directory.
    weights = uring_ckpt.load_safetensors(path / INDEX)
    assert sorted(weights) == ["emb.weight", "ln.bias", "w"]


def test_nested_states_get_no_index_and_extra_file_names_are_checked(tmp_path: Any) -> None:
    nested = {"model": {"w": torch.ones(4)}, "step": 3}
    uring_ckpt.save(nested, tmp_path / "nested", extra_files={INDEX: b"{}"})  # no index of ours: theirs is fine
    assert (tmp_path / "nested" / INDEX).read_bytes() == b"{}"
    uring_ckpt.save(nested, tmp_path / "nested2")
    assert not (tmp_path / "nested2" / INDEX).exists()
    flat = {"w": torch.ones(4)}
    with pytest.raises(uring_ckpt.InvalidCheckpointError):
        uring_ckpt.save(flat, tmp_path / "a", extra_files={INDEX: b"{}"})
    with pytest.raises(ValueError, match="sidecar"):
        uring_ckpt.save(flat, tmp_path / "b", extra_files={"extras.pkl": b""})
    for bad in ("../x", "x.safetensors", "manifest.json", ".hidden"):
        with pytest.raises(uring_ckpt.InvalidCheckpointError):
            uring_ckpt.save(flat, tmp_path / "c", extra_files={bad: b""})
    assert sorted(os.listdir(tmp_path)) == ["nested", "nested2"], "nothing left by the refused saves"


def test_async_saver_writes_the_index_and_extra_files(tmp_path: Any) -> None:
    with uring_ckpt.AsyncSaver() as saver:
        saver.save({"w": torch.arange(10.0)}, tmp_path / "a", extra_files={"config.json": b"{}"}).result()
    assert json.loads((tmp_path / "a" / INDEX).read_text())["weight_map"] == {"w": "shard-r00000-00000.safetensors"}
    assert (tmp_path / "a" / "config.json").read_bytes() == b"{}"


def test_transformers_from_pretrained_loads_a_uring_ckpt_save(tmp_path: Any) -> None:
    try:
        import transformers
    except ImportError:
        pytest.skip("transformers is not installed (pip install transformers to run this test)")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path / "gpt2"
    sd = model.state_dict()
    uring_ckpt.save(sd, path, extra_files={"config.json": config.to_json_string().encode()})
    weight_map = json.loads((path / INDEX).read_text())["weight_map"]
    assert "lm_head.weight" not in weight_map and "transformer.wte.weight" in weight_map, "tied: stored once"
    loaded = transformers.GPT2LMHeadModel.from_pretrained(str(path)).eval()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr(), "re-tied"
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
