"""Lightning with 2 ranks on the CPU (gloo), launched from outside as torchrun would
(tests/_lightning_workers.py): UringModelParallelStrategy (FSDP2 shards through
uring_ckpt.dcp) and DDP through UringCheckpointIO. Each scenario trains 6 steps with
checkpoints, then resumes a new Trainer from step 4 and must end with the same weights."""

from __future__ import annotations

import os
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("lightning")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

import uring_ckpt  # noqa: E402
from uring_ckpt import lightning as ul  # noqa: E402

from _ranks import errors, free_ports, read, spawn_ranks  # noqa: E402

JOB_DEADLINE = 100.0
"""Seconds a whole spawned job may take before its ranks are killed and the test fails."""


def run_job(scenario: str, world: int, root: str, out: str) -> list[int | None]:
    """Runs ``scenario`` on ``world`` spawned ranks; returns their exit codes (None: still
    running at the deadline, then killed)."""
    import _lightning_workers

    os.makedirs(out, exist_ok=True)
    args = (free_ports(1)[0], scenario, root, out)
    return spawn_ranks(_lightning_workers.main, world, args, JOB_DEADLINE)


def check_resumed(out: str) -> list[dict[str, Any]]:
    results = [read(out, "resume", r) for r in range(2)]
    for r in results:
        assert r["start_step"] == 4, r["start_step"]
        assert r["start_weights"] == r["weights_at_4"], "resumed from step 4's weights"
        assert r["step_b"] == 6
        assert r["final_b"] == r["final_a"], "the resumed run ends where the uninterrupted one did"
    assert results[0]["final_a"] == results[1]["final_a"], "both ranks see the same whole weights"
    assert results[0]["top1"] == ["epoch=1-step=6.ckpt"], ("save_top_k=1 removed the older ones", results[0]["top1"])
    return results


@pytest.mark.parametrize("scenario", ["model_parallel", "fsdp1"])
def test_sharded_strategy_saves_through_uring_and_resumes(tmp_path: Any, scenario: str) -> None:
    """UringModelParallelStrategy (FSDP2 ``fully_shard`` on the data-parallel mesh) and
    UringFSDPStrategy(state_dict_type="sharded") (FSDP1)."""
    if scenario == "fsdp1" and torch.cuda.device_count() < 2:
        pytest.skip("FSDP1 refuses the CPU (FSDP needs a non-CPU accelerator device): needs 2 CUDA devices")
    root, out = str(tmp_path / "run"), str(tmp_path / "out")
    codes = run_job(scenario, 2, root, out)
    assert codes == [0, 0], errors(out, 2)
    results = check_resumed(out)
    names = {"epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=1-step=6.ckpt", "last.ckpt"}
    assert set(results[0]["listing"]) == names, results[0]["listing"]
    ckpts = tmp_path / "run" / "ckpts"
    assert sorted(os.listdir(ckpts)) == sorted(names), "no temporary directory left"
    for name in names:
        path = ckpts / name
        files = set(os.listdir(path))
        # Lightning's layout (meta.pt beside the shards), committed as one of ours.
        assert {"manifest.json", "dcp.metadata", "meta.pt"} <= files, files
        assert ".metadata" not in files, "not written by DCP's FileSystemWriter"
        assert {f.split("-")[1] for f in files if f.startswith("shard-")} == {"r00000", "r00001"}, files
        uring_ckpt.verify(path)
    meta = torch.load(ckpts / "epoch=0-step=4.ckpt" / "meta.pt", weights_only=False)
    assert meta["global_step"] == 4 and "state_dict" not in meta and "optimizer_states" not in meta


def test_ddp_with_uring_checkpoint_io_saves_on_rank_0_and_resumes_on_both(tmp_path: Any) -> None:
    root, out = str(tmp_path / "run"), str(tmp_path / "out")
    codes = run_job("ddp", 2, root, out)
    assert codes == [0, 0], errors(out, 2)
    results = check_resumed(out)
    ckpts = tmp_path / "run" / "ckpts"
    names = {"epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt", "epoch=1-step=6.ckpt", "last.ckpt"}
    assert set(results[0]["listing"]) == names, results[0]["listing"]
    saved = uring_ckpt.load(ckpts / "epoch=0-step=4.ckpt")
    assert saved["global_step"] == 4
    assert {f"{k}" for k in saved["state_dict"]} == {"body.weight", "body.bias", "head.weight", "head.bias"}


def test_strategies_are_exported() -> None:
    assert ul.UringModelParallelStrategy.__mro__[2].__name__ == "ModelParallelStrategy"
    assert "UringFSDPStrategy" in ul.__all__
