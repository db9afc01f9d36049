"""Careless paths and hostile directories through the Python API: nothing that is not a
checkpoint of ours is removed or replaced; no file of a checkpoint is read through a link or
unless it is a regular file; reserved and over-long names are refused before anything is
written (RELIABILITY.md, "Security")."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch
import uring_ckpt
from uring_ckpt.lightning import UringCheckpointIO


def snapshot(root):
    """Every file and link under ``root`` with its content (or link target)."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = (
                "link:" + os.readlink(p) if os.path.islink(p) else open(p, "rb").read()
            )
    return out


@pytest.fixture
def foreign(tmp_path):
    """Directories that hold a ``manifest.json`` but are not checkpoints of ours."""
    web = tmp_path / "web-project"
    (web / "src").mkdir(parents=True)
    (web / "manifest.json").write_text(json.dumps({"name": "my-app", "version": "1.0.0"}))
    (web / "src" / "index.js").write_text("console.log('hi')")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "manifest.json").write_bytes(b"\x00\x01 not json")
    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink("/etc/hostname", linked / "manifest.json")
    return [web, garbage, linked]


def test_remove_and_replace_refuse_directories_that_are_not_ours(foreign, tmp_path):
    plugin = UringCheckpointIO()
    for d in foreign:
        before = snapshot(d)
        with pytest.raises(uring_ckpt.NotACheckpointError, match="refusing to delete"):
            uring_ckpt.remove(d)
        with pytest.raises(uring_ckpt.NotACheckpointError, match="refusing to delete"):
            plugin.remove_checkpoint(d)
        with pytest.raises(uring_ckpt.NotACheckpointError, match="refusing to replace"):
            uring_ckpt.save({"w": torch.ones(4)}, d, replace=True)
        with pytest.raises(uring_ckpt.NotACheckpointError, match="refusing to replace"):
            plugin.save_checkpoint({"w": torch.ones(4)}, d)
        assert snapshot(d) == before, d
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "no leftovers beside them"


def test_our_checkpoint_is_replaced_and_removed_with_what_a_user_added(tmp_path):
    path = tmp_path / "ck"
    uring_ckpt.save({"w": torch.ones(4)}, path)
    (path / "notes.txt").write_text("added by hand")
    uring_ckpt.save({"w": torch.zeros(4)}, path, replace=True)
    assert not (path / "notes.txt").exists()
    assert torch.equal(uring_ckpt.load(path)["w"], torch.zeros(4))
    uring_ckpt.remove(path)
    assert not path.exists()


def _shard(path):
    return next(n for n in os.listdir(path) if n.endswith(".safetensors"))


@pytest.mark.parametrize("member", ["manifest.json", "shard", "extras.pkl"])
@pytest.mark.parametrize("kind", ["link-outside", "link-devzero", "fifo", "directory"])
def test_no_member_is_read_through_a_link_or_unless_regular(tmp_path, member, kind):
    path = tmp_path / "ck"
    uring_ckpt.save({"w": torch.arange(100, dtype=torch.float32), "step": 3}, path)
    name = _shard(path) if member == "shard" else member
    target = path / name
    outside = tmp_path / f"outside-{name}"
    outside.write_bytes(target.read_bytes())
    target.unlink()
    if kind == "link-outside":
        os.symlink(outside, target)
    elif kind == "link-devzero":
        os.symlink("/dev/zero", target)
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.mkdir()
    results = {}

    def attempt():
        for op in (uring_ckpt.load, uring_ckpt.verify):
            try:
                op(path)
            except Exception as e:  # noqa: BLE001 - the type is checked below
                results[op.__name__] = e
            else:
                results[op.__name__] = None

    t = threading.Thread(target=attempt, daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), f"{member} as {kind}: a load or verify hangs"
    for op, err in results.items():
        assert isinstance(err, uring_ckpt.CorruptCheckpointError), f"{op}: {err!r}"
        assert "not a regular file" in str(err), f"{op}: {err}"
        assert str(outside) not in str(err)


@pytest.mark.parametrize("name", [".ck.tmp-1-ab-0", ".ck.tmp-removing-7", ".ck.lock", "n" * 186])
def test_reserved_and_over_long_names_are_refused_before_anything_is_written(tmp_path, name):
    parent = tmp_path / "p"
    parent.mkdir()
    with pytest.raises(uring_ckpt.InvalidCheckpointError):
        uring_ckpt.save({"w": torch.ones(4)}, parent / name)
    assert os.listdir(parent) == []


def test_the_reserved_tensor_name_is_an_input_error_before_anything_is_written(tmp_path):
    with pytest.raises(uring_ckpt.InvalidCheckpointError, match="__metadata__"):
        uring_ckpt.save({"__metadata__": torch.ones(4)}, tmp_path / "ck")
    assert os.listdir(tmp_path) == []


def test_a_planted_lock_link_is_refused_and_its_target_not_created(tmp_path):
    victim = tmp_path / "victim"
    os.symlink(victim, tmp_path / ".ck.lock")
    with pytest.raises(OSError, match="refusing"):
        uring_ckpt.save({"w": torch.ones(4)}, tmp_path / "ck")
    assert not victim.exists() and not (tmp_path / "ck").exists()
