"""Bad paths and damaged checkpoints raise clear Python exceptions, never crash."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
import uring_ckpt


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "c"
    uring_ckpt.save({"w": torch.arange(1000, dtype=torch.float32), "step": 5}, path)
    return path


def shard_of(path):
    return next(path / p for p in os.listdir(path) if p.endswith(".safetensors"))


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        uring_ckpt.load(tmp_path / "missing")
    assert info.value.errno == errno.ENOENT and "missing" in str(info.value)
    with pytest.raises(FileNotFoundError):
        uring_ckpt.verify(tmp_path / "missing")


def test_directory_without_manifest(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "junk.bin").write_bytes(b"x")
    for fn in (uring_ckpt.load, uring_ckpt.verify, uring_ckpt.inspect):
        with pytest.raises(uring_ckpt.NotACheckpointError, match="manifest"):
            fn(tmp_path / "d")
    # With a *.safetensors file it is read as a safetensors directory
    # (test_safetensors_load.py): this one's header is junk, and the error names the file.
    (tmp_path / "d" / "junk.safetensors").write_bytes(b"x")
    for fn in (uring_ckpt.load, uring_ckpt.verify, uring_ckpt.inspect):
        with pytest.raises(uring_ckpt.CorruptCheckpointError, match="junk.safetensors"):
            fn(tmp_path / "d")
    with pytest.raises(uring_ckpt.NotACheckpointError, match="refusing to delete"):
        uring_ckpt.remove(tmp_path / "d")


def test_a_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "f.ckpt").write_bytes(b"not a directory")
    with pytest.raises((uring_ckpt.CheckpointError, OSError)):
        uring_ckpt.load(tmp_path / "f.ckpt")


def test_save_under_a_file_fails_cleanly(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OSError) as info:
        uring_ckpt.save({"w": torch.ones(3)}, tmp_path / "file" / "c")
    assert info.value.errno in (errno.ENOTDIR, errno.EEXIST)


def test_unusable_path_names(tmp_path):
    with pytest.raises(uring_ckpt.InvalidCheckpointError):
        uring_ckpt.save({"w": torch.ones(3)}, tmp_path / "..")
    with pytest.raises((ValueError, OSError)):
        uring_ckpt.save({"w": torch.ones(3)}, tmp_path / "a\0b")


def test_flipped_tensor_byte_is_a_crc_error(ckpt):
    shard = shard_of(ckpt)
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(uring_ckpt.CorruptCheckpointError, match="CRC"):
        uring_ckpt.load(ckpt)
    with pytest.raises(uring_ckpt.CorruptCheckpointError, match="CRC"):
        uring_ckpt.verify(ckpt)
    uring_ckpt.load(ckpt, verify=False)  # asked not to check


def test_truncated_shard(ckpt):
    shard = shard_of(ckpt)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(uring_ckpt.CorruptCheckpointError, match="bytes"):
        uring_ckpt.load(ckpt)


def test_damaged_header(ckpt):
    shard = shard_of(ckpt)
    data = bytearray(shard.read_bytes())
    data[9] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(uring_ckpt.CorruptCheckpointError):
        uring_ckpt.load(ckpt)


def test_damaged_sidecar(ckpt):
    sidecar = ckpt / "extras.pkl"
    data = bytearray(sidecar.read_bytes())
    data[len(data) // 2] ^= 0xFF
    sidecar.write_bytes(bytes(data))
    with pytest.raises(uring_ckpt.CorruptCheckpointError, match="extras.pkl"):
        uring_ckpt.load(ckpt)
    with pytest.raises(uring_ckpt.CorruptCheckpointError, match="extras.pkl"):
        uring_ckpt.verify(ckpt)
    sidecar.unlink()
    with pytest.raises(FileNotFoundError):
        uring_ckpt.load(ckpt)


def test_garbage_manifest(ckpt):
    (ckpt / "manifest.json").write_text("{ not json")
    with pytest.raises(uring_ckpt.CorruptCheckpointError, match="JSON"):
        uring_ckpt.load(ckpt)
    (ckpt / "manifest.json").write_text(json.dumps({"format": "uring-ckpt", "version": 99}))
    with pytest.raises(uring_ckpt.CorruptCheckpointError, match="version 99"):
        uring_ckpt.load(ckpt)


def test_missing_shard(ckpt):
    shard_of(ckpt).unlink()
    with pytest.raises(FileNotFoundError):
        uring_ckpt.load(ckpt)


def test_unsaveable_values_raise_before_anything_is_written(tmp_path):
    import threading

    with pytest.raises(TypeError):
        uring_ckpt.save({"lock": threading.Lock()}, tmp_path / "c")
    assert not os.listdir(tmp_path)


def test_errors_share_a_base_class():
    for cls in (
        uring_ckpt.NotACheckpointError,
        uring_ckpt.CorruptCheckpointError,
        uring_ckpt.CheckpointExistsError,
        uring_ckpt.ConfigError,
        uring_ckpt.InvalidCheckpointError,
        uring_ckpt.TensorNotFoundError,
        uring_ckpt.UnavailableError,
        uring_ckpt.CheckpointLockedError,
    ):
        assert issubclass(cls, uring_ckpt.CheckpointError)
    assert issubclass(uring_ckpt.CheckpointExistsError, FileExistsError)


def test_save_while_another_saver_holds_the_path_lock(tmp_path):
    import fcntl

    target = tmp_path / "c"
    # What a concurrent save of the same path holds: flock on <parent>/.<name>.lock.
    with open(tmp_path / ".c.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(uring_ckpt.CheckpointLockedError) as info:
            uring_ckpt.save({"w": torch.zeros(4)}, target)
        assert ".c.lock" in str(info.value)
        assert not target.exists()
    uring_ckpt.save({"w": torch.zeros(4)}, target)  # free again: the save goes through
    assert uring_ckpt.load(target)["w"].equal(torch.zeros(4))


def test_fallbacks_are_logged_with_what_was_refused_and_why(caplog):
    from uring_ckpt._common import save_report

    report = {
        "path": "/nfs/ckpt/step-1",
        "engine": {
            "engine": "buffered",
            "fallbacks": [
                {"what": "O_DIRECT", "instead": "buffered writes + fdatasync", "reason": "Invalid argument (os error 22)"}
            ],
        },
    }
    with caplog.at_level("WARNING", logger="uring_ckpt"):
        out = save_report(json.dumps(report), 0)
    assert out["engine"]["engine"] == "buffered"
    (record,) = [r for r in caplog.records if r.name == "uring_ckpt"]
    message = record.getMessage()
    assert "/nfs/ckpt/step-1" in message and "O_DIRECT unavailable" in message
    assert "Invalid argument" in message and "buffered writes + fdatasync" in message


def test_a_save_without_fallbacks_logs_nothing(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="uring_ckpt"):
        report = uring_ckpt.save({"w": torch.ones(3)}, tmp_path / "quiet")
    assert report["engine"]["fallbacks"] == []
    assert not [r for r in caplog.records if r.name == "uring_ckpt"]


def test_a_real_fallback_is_logged_by_save_and_by_dcp_ranks(tmp_path, caplog):
    config = uring_ckpt.Config.from_toml("[simulate]\ndirect_io_einval = true\n")  # O_DIRECT refused
    with caplog.at_level("WARNING", logger="uring_ckpt"):
        report = uring_ckpt.save({"w": torch.ones(3)}, tmp_path / "fell-back", config=config)
    assert report["engine"]["engine"] == "buffered"
    messages = [r.getMessage() for r in caplog.records if r.name == "uring_ckpt"]
    assert any("O_DIRECT unavailable" in m and "fell-back" in m for m in messages), messages

    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from uring_ckpt.dcp import UringStorageWriter

    caplog.clear()
    with caplog.at_level("WARNING", logger="uring_ckpt"):
        dcp.save({"w": torch.ones(3)}, storage_writer=UringStorageWriter(tmp_path / "dcp", config), no_dist=True)
    messages = [r.getMessage() for r in caplog.records if r.name == "uring_ckpt"]
    assert any("O_DIRECT unavailable" in m and "dcp" in m for m in messages), messages
