"""torch.distributed.checkpoint through uring_ckpt.dcp: ranks are spawned processes on one
machine (gloo on 127.0.0.1, CPU tensors, DTensors on a CPU DeviceMesh), each bounded in
time (gloo timeout in the ranks, a deadline for the whole job here). What the ranks saw
comes back as JSON files (tests/_dcp_workers.py)."""

from __future__ import annotations

import io
import os
import time
from typing import Any

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)
dcp = pytest.importorskip("torch.distributed.checkpoint")

from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402

import uring_ckpt  # noqa: E402
from uring_ckpt.dcp import METADATA_FILE, UringStorageReader, UringStorageWriter  # noqa: E402

from _ranks import errors, free_ports, read, spawn_ranks  # noqa: E402

STAGES = bool(uring_ckpt.dcp._STAGER_BASES)
"""Whether this torch has what the writer needs to be DCP's AsyncStager (else async_save
stages through DCP's default stager)."""
needs_stager = pytest.mark.skipif(not STAGES, reason="this torch has no DCP StateDictStager (torch < 2.8?)")

JOB_DEADLINE = 90.0
"""Seconds a whole spawned job may take before its ranks are killed and the test fails."""


def run_job(
    scenario: str, world: int, path: str, out: str, ports: int = 1, daemon: bool = True
) -> list[int | None]:
    """Runs ``scenario`` on ``world`` spawned ranks; returns their exit codes (None: still
    running at the deadline, then killed). ``daemon=False`` lets the ranks start processes
    of their own (DCP's checkpoint process); they are killed at the deadline all the same."""
    import _dcp_workers  # noqa: F401 - importable here means importable in the children

    os.makedirs(out, exist_ok=True)
    args = (free_ports(ports), scenario, path, out)
    return spawn_ranks(_dcp_workers.main, world, args, JOB_DEADLINE, daemon=daemon)


def leftovers(path: str) -> list[str]:
    name = os.path.basename(path)
    return sorted(n for n in os.listdir(os.path.dirname(path)) if n != name)


def test_sharded_state_saved_on_4_ranks_loads_on_2_and_on_3(tmp_path: Any) -> None:
    path, out = str(tmp_path / "ckpt" / "step-1"), str(tmp_path / "out")
    codes = run_job("reshard", 4, path, out, ports=3)
    assert codes == [0, 0, 0, 0], errors(out, 4)
    for world in (2, 3):
        counts = []
        for rank in range(world):
            checks = read(out, f"load{world}", rank)
            counts.append(checks.pop("counts"))
            assert all(checks.values()), (world, rank, checks)
        # Whole saved chunks are read in place; a chunk split between two ranks is read,
        # narrowed and copied by each: on 2 ranks, rows 3-5 of `b` (saved 3+3+3+1, loaded
        # 5+5); on 3 ranks, rows 3-5 and 6-8 of `a` (3 each, loaded 4 each) and of `b`.
        assert all(c["in_place"] > 0 for c in counts), counts
        assert all(c["bytes"] == 2 for c in counts), ("step and blob on every rank", counts)
        assert sum(c["copied"] for c in counts) == {2: 2, 3: 8}[world], counts
    assert leftovers(path) == [], "no temporary directory, no lock file"
    # One committed checkpoint of ours: verify checks every shard, CRC and dcp.metadata.
    report = uring_ckpt.verify(path)
    assert report["kind"] == "uring_ckpt", report
    info = uring_ckpt.inspect(path)
    names = {t["name"] for t in info["tensors"]}
    assert {"model.a@0,0", "model.a@3,0", "model.a@6,0", "model.a@9,0", "model.c@0,0", "step"} <= names
    assert info["manifest"]["metadata"]["uring_ckpt.dcp"] == "1"
    assert METADATA_FILE in {f["file"] for f in info["manifest"]["extra_files"]}
    files = {f["file"] for f in info["manifest"]["shards"]}
    assert {f.split("-")[1] for f in files} == {"r00000", "r00001", "r00002", "r00003"}, files


def test_a_rank_raising_in_write_data_commits_nothing_and_the_next_save_cleans_up(tmp_path: Any) -> None:
    path, out = str(tmp_path / "ckpt" / "latest"), str(tmp_path / "out")
    codes = run_job("raising_rank", 4, path, out)
    assert codes == [0, 0, 0, 0], errors(out, 4)
    name = os.path.basename(path)
    for rank in range(4):
        failed = read(out, "failed", rank)
        assert failed["raised"] == "CheckpointException", failed
        assert "injected failure on rank 1" in failed["message"], failed["message"]
        assert all(failed["loaded"].values()), ("the previous checkpoint loads", failed["loaded"])
        listing = failed["listing"]
        assert name in listing and len(listing) == 2, listing
        assert listing[0].startswith(f".{name}.tmp-r-"), ("the failed save's directory, not renamed", listing)
        after = read(out, "after", rank)
        assert after["listing"] == [name], after["listing"]
        assert all(after["loaded"].values()), after["loaded"]
    uring_ckpt.verify(path)


def plain_state(seed: int) -> dict[str, Any]:
    """The whole values of _dcp_workers.full_tensors, as one process holds them."""
    import _dcp_workers

    full = _dcp_workers.full_tensors(seed)
    return {
        "model": {k: full[k] for k in ("a", "b", "c")},
        "plain": full["plain"],
        "z": full["z"],
        "step": 100 + seed,
        "blob": io.BytesIO(b"bytes of step %d" % seed),
    }


def load_plain(path: str) -> dict[str, Any]:
    state = plain_state(0)
    state["model"] = {k: torch.zeros_like(v) for k, v in state["model"].items()}
    state["plain"], state["z"], state["step"] = torch.zeros_like(state["plain"]), torch.zeros_like(state["z"]), 0
    state["blob"] = io.BytesIO()
    dcp.load(state, storage_reader=UringStorageReader(path), no_dist=True)
    return state


def assert_plain_equal(state: dict[str, Any], seed: int) -> None:
    want = plain_state(seed)
    for key in ("a", "b", "c"):
        assert torch.equal(state["model"][key], want["model"][key]), key
    assert torch.equal(state["plain"], want["plain"]) and torch.equal(state["z"], want["z"])
    assert state["step"] == want["step"]
    assert state["blob"].getvalue() == want["blob"].getvalue()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_rank_killed_mid_save_commits_nothing_and_the_survivors_get_an_error(tmp_path: Any) -> None:
    path, out = str(tmp_path / "ckpt" / "latest"), str(tmp_path / "out")
    started = time.monotonic()
    codes = run_job("killed_rank", 4, path, out)
    assert codes[1] == -9, (codes, errors(out, 4))
    assert codes[0] == 0 and codes[2] == 0 and codes[3] == 0, (codes, errors(out, 4))
    for rank in (0, 2, 3):
        result = read(out, "killed", rank)
        assert result["raised"] is not None, result
        assert result["seconds"] < 45, result  # bounded by the gloo timeout (10 s) per collective
    assert time.monotonic() - started < JOB_DEADLINE
    name = os.path.basename(path)
    left = leftovers(path)
    assert any(n.startswith(f".{name}.tmp-r-") for n in left), left
    # The previous checkpoint is intact: loaded whole in this process, resharded from 4 ranks.
    assert_plain_equal(load_plain(path), 1)
    uring_ckpt.verify(path)
    # The next save (this process coordinates; the failed save's coordinator is gone)
    # removes the leftover.
    dcp.save(plain_state(5), storage_writer=UringStorageWriter(path, replace=True), no_dist=True)
    assert leftovers(path) == [], leftovers(path)
    assert_plain_equal(load_plain(path), 5)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_single_process_round_trip_and_errors(tmp_path: Any) -> None:
    path = str(tmp_path / "one")
    dcp.save(plain_state(2), storage_writer=UringStorageWriter(path), no_dist=True)
    assert_plain_equal(load_plain(path), 2)
    # An existing checkpoint is not replaced unless asked.
    with pytest.raises(CheckpointException, match="already exists"):
        dcp.save(plain_state(3), storage_writer=UringStorageWriter(path), no_dist=True)
    assert_plain_equal(load_plain(path), 2)
    assert leftovers(path) == []
    # A uring_ckpt checkpoint that is not a DCP one says so.
    other = str(tmp_path / "flat")
    uring_ckpt.save({"w": torch.ones(3)}, other)
    with pytest.raises(CheckpointException, match="not a torch.distributed.checkpoint checkpoint"):
        load_plain(other)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_hostile_metadata_is_refused_without_running_code(tmp_path: Any) -> None:
    import pickle

    from uring_ckpt import dcp as udcp

    class Boom:
        def __reduce__(self) -> Any:
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with pytest.raises(uring_ckpt.UnsafeCheckpointError):
        udcp._unpickle_metadata(pickle.dumps(Boom()), "dcp.metadata")
    assert not (tmp_path / "pwned").exists()
    # A real metadata object goes through.
    path = str(tmp_path / "m")
    md = dcp.save(plain_state(4), storage_writer=UringStorageWriter(path), no_dist=True)
    back = udcp._unpickle_metadata(pickle.dumps(md, protocol=2), "dcp.metadata")
    assert back.state_dict_metadata.keys() == md.state_dict_metadata.keys()
    assert back.storage_data.keys() == md.storage_data.keys()


def _wait(future: Any) -> None:
    (future.upload_completion if hasattr(future, "upload_completion") else future).result()


@needs_stager
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_async_save_stages_through_the_writer_and_reuses_its_memory(tmp_path: Any) -> None:
    from torch.distributed.checkpoint.staging import AsyncStager

    writer = UringStorageWriter(tmp_path / "s1")
    assert isinstance(writer, AsyncStager)  # so async_save stages through it, not DCP's default
    state = plain_state(6)
    future = dcp.async_save(state, storage_writer=writer, no_dist=True)
    first = writer.staging_stats
    # Training goes on as soon as async_save returns: the save still holds the old values.
    for t in state["model"].values():
        t.add_(1000)
    _wait(future)
    assert_plain_equal(load_plain(str(tmp_path / "s1")), 6)
    assert first["reused"] is False and first["bytes"] > 0
    # The next save with the same writer copies into the memory the first one used.
    state = plain_state(7)
    _wait(dcp.async_save(state, storage_writer=writer, checkpoint_id=str(tmp_path / "s2"), no_dist=True))
    assert writer.staging_stats["reused"] is True, writer.staging_stats
    assert writer.staging_stats["areas"] == 1
    assert_plain_equal(load_plain(str(tmp_path / "s2")), 7)
    assert_plain_equal(load_plain(str(tmp_path / "s1")), 6)
    writer.close()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], os.listdir(tmp_path)


@needs_stager
def test_staging_never_overwrites_a_copy_still_in_use() -> None:
    writer = UringStorageWriter("unused")
    source = {"w": torch.arange(1 << 16, dtype=torch.float32), "n": 3}
    held = writer.stage(source)  # a save in flight holds this copy
    view = held["w"][100:]  # ... or a view DCP made of it
    del held
    source["w"].add_(1)
    again = writer.stage(source)
    assert writer.staging_stats["areas"] == 2 and writer.staging_stats["reused"] is False
    assert float(view[0]) == 100.0 and float(again["w"][100]) == 101.0
    assert again["n"] == 3
    del view, again
    source["w"].add_(1)
    third = writer.stage(source)  # both areas free again: one of them is reused
    assert writer.staging_stats["reused"] is True and writer.staging_stats["areas"] == 2
    assert float(third["w"][100]) == 102.0
    writer.close()
    assert writer.stage({"x": torch.ones(4)})["x"].sum() == 4  # usable again after close


def test_async_save_in_thread_and_process_mode_on_2_ranks(tmp_path: Any) -> None:
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    assert AsyncCheckpointerType.PROCESS  # this torch has process mode
    path, out = str(tmp_path / "ckpt" / "async"), str(tmp_path / "out")
    codes = run_job("async_modes", 2, path, out, daemon=False)
    assert codes == [0, 0], errors(out, 2)
    for rank in range(2):
        result = read(out, "async", rank)
        for mode in ("thread", "process"):
            assert all(result[mode].values()), (rank, mode, result[mode])
            if STAGES:
                assert result[f"{mode}_staging"]["bytes"] > 0, result  # staged by the writer itself
            assert f"async-{mode}" in result[f"{mode}_listing"], result
            assert not [n for n in result[f"{mode}_listing"] if n.startswith(".")], "no temporary directory"
    for mode in ("thread", "process"):
        uring_ckpt.verify(f"{path}-{mode}")


def test_writer_and_reader_pickle_with_their_config(tmp_path: Any) -> None:
    import pickle

    config = uring_ckpt.Config(chunk_size="4MiB", io_threads=2)
    writer = pickle.loads(pickle.dumps(UringStorageWriter(tmp_path / "w", config, replace=True)))
    assert writer.config.to_toml() == config.replace(replace_existing=True).to_toml()
    assert writer.path == str(tmp_path / "w")
    reader = pickle.loads(pickle.dumps(UringStorageReader(tmp_path / "w", config, verify=False)))
    assert reader.config.to_toml() == config.to_toml() and reader.verify is False


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_extra_files_are_committed_with_the_shards(tmp_path: Any) -> None:
    path = str(tmp_path / "x")
    with pytest.raises(ValueError, match="reserved"):
        UringStorageWriter(path, extra_files={METADATA_FILE: b""})
    dcp.save(plain_state(7), storage_writer=UringStorageWriter(path, extra_files={"meta.pt": b"hello"}), no_dist=True)
    with open(os.path.join(path, "meta.pt"), "rb") as f:
        assert f.read() == b"hello"
    uring_ckpt.verify(path)
    assert_plain_equal(load_plain(path), 7)


@needs_stager
def test_staged_tensors_are_page_aligned_so_they_go_to_disk_without_a_copy(tmp_path: Any) -> None:
    writer = UringStorageWriter(tmp_path / "aligned")
    source = {"w": torch.randn(1 << 18), "b": torch.randn(1 << 18).to(torch.bfloat16), "e": torch.empty(0)}
    assert source["w"].data_ptr() % 4096 != 0  # torch's own allocations are not
    staged = writer.stage(source)
    assert staged["w"].data_ptr() % 4096 == 0 and staged["b"].data_ptr() % 4096 == 0
    assert torch.equal(staged["w"], source["w"]) and torch.equal(staged["b"], source["b"])
    assert staged["e"].numel() == 0
    report = uring_ckpt.save(staged, str(tmp_path / "flat"))
    assert report["zero_copy_bytes"] >= staged["w"].nbytes, report
    assert torch.equal(uring_ckpt.load(str(tmp_path / "flat"))["w"], source["w"])


def test_ranks_of_one_machine_share_the_staging_pool() -> None:
    from torch.distributed.checkpoint.planner import SavePlan

    from uring_ckpt.dcp import _machine_id, _rank_share

    config = uring_ckpt.Config(chunk_size="8MiB", staging_pool_size="128MiB")
    assert _rank_share(config, 1) is config
    assert [_rank_share(config, n).staging_pool_size >> 20 for n in (2, 3, 4, 8, 32)] == [64, 40, 32, 16, 16]
    assert _rank_share(config, 4).chunk_size == config.chunk_size  # only the pool is shared
    writer = UringStorageWriter("unused", config)
    here = writer.prepare_local_plan(SavePlan([]))
    assert here.storage_data == {"machine": _machine_id()} and _machine_id()
    other = SavePlan([], storage_data={"machine": "elsewhere"})
    unnamed = SavePlan([])  # a plan that names no machine has one of its own
    plans = [here, here, other, here, unnamed]

    class Begun:  # the coordinator's begin_ranks, without a directory
        def begin_ranks(self, path: str) -> str:
            return "sid"

    original = uring_ckpt.dcp.cached_writer
    uring_ckpt.dcp.cached_writer = lambda config: Begun()
    try:
        planned = writer.prepare_global_plan(plans)
    finally:
        uring_ckpt.dcp.cached_writer = original
    assert [p.storage_data["local_ranks"] for p in planned] == [3, 3, 1, 3, 1]
    assert [p.storage_data["rank"] for p in planned] == [0, 1, 2, 3, 4]
    assert {p.storage_data["save_id"] for p in planned} == {"sid"}
