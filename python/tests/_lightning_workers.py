"""The rank side of test_lightning_dist.py: each spawned process is one rank of a Lightning
job launched from outside (``LOCAL_RANK``, ``WORLD_SIZE``, ... in the environment, as
torchrun does), training a tiny model on the CPU with gloo, and writing what it saw to
``<out>/<phase>-<rank>.json``.

Kept out of the test module so that a spawned rank imports only this (torch, lightning,
uring_ckpt), not pytest's collection of the tests."""

from __future__ import annotations

import json
import os
import traceback
from datetime import timedelta
from typing import Any, Callable

GLOO_TIMEOUT = timedelta(seconds=20)
"""Every collective of a rank gives up after this long (a dead peer never answers)."""


def _report(out: str, phase: str, rank: int, result: dict[str, Any]) -> None:
    tmp = os.path.join(out, f".{phase}-{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, os.path.join(out, f"{phase}-{rank}.json"))


def main(rank: int, world: int, port: int, scenario: str, root: str, out: str) -> None:
    """Entry point of every spawned rank."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    try:
        import torch

        torch.set_num_threads(1)
        SCENARIOS[scenario](rank, world, root, out)
    except BaseException as e:  # report it, then fail the process
        _report(out, "error", rank, {"error": repr(e), "trace": traceback.format_exc()})
        os._exit(1)
    os._exit(0)  # no teardown of process groups a dead peer may have broken


def _modules() -> Any:
    """The LightningModule classes, defined once lightning is imported in the rank."""
    import torch
    from lightning.pytorch import LightningModule

    class Tiny(LightningModule):
        def __init__(self, shard: str | None = None) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.body = torch.nn.Linear(4, 16)
            self.head = torch.nn.Linear(16, 1)

        def configure_model(self) -> None:
            if self.hparams.shard == "fsdp2":
                from torch.distributed.fsdp import fully_shard

                mesh = self.device_mesh["data_parallel"]
                fully_shard(self.body, mesh=mesh)
                fully_shard(self.head, mesh=mesh)
                fully_shard(self, mesh=mesh)

        def forward(self, x: Any) -> Any:
            return self.head(torch.relu(self.body(x)))

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    return Tiny


def _loader() -> Any:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    # 16 samples per rank, 4 steps an epoch: the step-4 checkpoint ends epoch 0, so the
    # resumed run starts epoch 1 from its first batch, as the uninterrupted run does.
    x = torch.randn(32, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def _full_weights(model: Any) -> dict[str, list[float]]:
    """The model's whole weights (gathered from the shards) on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    state = get_model_state_dict(model, options=options)
    return {k: v.detach().float().reshape(-1).tolist() for k, v in sorted(state.items())}


def _plain_weights(model: Any) -> dict[str, list[float]]:
    return {k: v.detach().float().reshape(-1).tolist() for k, v in sorted(model.state_dict().items())}


def _fit_and_resume(
    rank: int,
    root: str,
    out: str,
    make_strategy: Callable[[], Any],
    plugins: list[Any],
    shard: str | None,
    weights: Callable[[Any], Any],
    accelerator: str = "cpu",
) -> None:
    """Run A: 6 steps, checkpoints at steps 2, 4, 6 (save_top_k=-1) and last. Run B: a new
    Trainer and model resumed from A's step-4 checkpoint, to step 6. Reports A's and B's
    final weights, the global step and weights B started from, and the listing."""
    import torch
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    Tiny = _modules()
    ckpts = os.path.join(root, "ckpts")

    def trainer(max_steps: int, callbacks: list[Any]) -> Trainer:
        return Trainer(
            default_root_dir=root,
            max_steps=max_steps,
            accelerator=accelerator,
            devices=2,
            strategy=make_strategy(),
            plugins=list(plugins),
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=True,
            callbacks=callbacks,
        )

    seen: dict[str, Any] = {}

    class Probe(Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            seen["start_step"] = trainer.global_step
            seen["start_weights"] = weights(pl_module)

    class AtStep(Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if trainer.global_step == 4:
                seen["weights_at_4"] = weights(pl_module)

    torch.manual_seed(0)
    every_2 = ModelCheckpoint(dirpath=ckpts, every_n_train_steps=2, save_top_k=-1, save_last=True)
    # save_top_k=1 without a monitor keeps the latest: the step-6 save removes step 3's.
    latest = ModelCheckpoint(dirpath=os.path.join(root, "top1"), every_n_train_steps=3, save_top_k=1)
    a = trainer(6, [every_2, latest, AtStep()])
    a.fit(Tiny(shard), _loader())
    final_a = weights(a.lightning_module)
    a.strategy.barrier()
    listing = sorted(os.listdir(ckpts))
    top1 = sorted(os.listdir(os.path.join(root, "top1")))
    torch.manual_seed(1)  # a different initialization: the checkpoint must overwrite it
    b = trainer(6, [Probe()])
    b.fit(Tiny(shard), _loader(), ckpt_path=os.path.join(ckpts, "epoch=0-step=4.ckpt"))
    _report(
        out,
        "resume",
        rank,
        {
            "listing": listing,
            "top1": top1,
            "weights_at_4": seen["weights_at_4"],
            "start_step": seen["start_step"],
            "start_weights": seen["start_weights"],
            "final_a": final_a,
            "final_b": weights(b.lightning_module),
            "step_b": b.global_step,
        },
    )


def model_parallel(rank: int, world: int, root: str, out: str) -> None:
    from uring_ckpt.lightning import UringModelParallelStrategy

    def make() -> Any:
        return UringModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, timeout=GLOO_TIMEOUT)

    _fit_and_resume(rank, root, out, make, [], "fsdp2", _full_weights)


def ddp(rank: int, world: int, root: str, out: str) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    from uring_ckpt.lightning import UringCheckpointIO

    def make() -> Any:
        return DDPStrategy(timeout=GLOO_TIMEOUT)

    _fit_and_resume(rank, root, out, make, [UringCheckpointIO()], None, _plain_weights)


def fsdp1(rank: int, world: int, root: str, out: str) -> None:
    from uring_ckpt.lightning import UringFSDPStrategy

    def make() -> Any:
        return UringFSDPStrategy(state_dict_type="sharded", timeout=GLOO_TIMEOUT)

    # FSDP1 refuses the CPU ("FSDP needs a non-CPU accelerator device"): 2 GPUs, NCCL.
    _fit_and_resume(rank, root, out, make, [], None, _full_weights, accelerator="gpu")


SCENARIOS: dict[str, Callable[[int, int, str, str], None]] = {
    "model_parallel": model_parallel,
    "ddp": ddp,
    "fsdp1": fsdp1,
}
