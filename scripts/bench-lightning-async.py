#!/usr/bin/env python3
"""How long a real Lightning ``Trainer.fit`` is blocked by each checkpoint, sync against async,
first save against later ones, with and without the snapshot reservation; and how much the
background writes slow the training steps they run beside.

A ~100 M parameter MLP (6 x Linear(4096, 4096), f32) trained with Adam on the CPU: a
checkpoint holds the weights and both Adam moments, 1.13 GiB. ``ModelCheckpoint`` saves every
``--every`` steps (``save_top_k=1``: each save removes the one before, as in most runs).

Variants (``--variants``, comma-separated; each runs ``--repeat`` times, alternating):

- ``sync``: ``UringCheckpointIO``.
- ``async``: ``AsyncUringCheckpointIO()``, no reservation: the first save faults its fresh
  snapshot area in while training waits.
- ``reserve``: ``AsyncUringCheckpointIO`` with ``reserve_callback()``: the area is made and
  faulted in on a helper thread before the first save.
- ``reserve-nice0``: the same with ``background_nice=0`` and ``background_threads=4``: the
  background writes compete with training at its own priority.

Per save, "stall" is the time ``ModelCheckpoint``'s ``on_train_batch_end`` blocked the loop
(state dicts, the plugin's ``save_checkpoint``, the rotation's ``remove_checkpoint``: the
async plugin removes in the background, the sync one in the loop); "io" is the plugin's
``save_checkpoint`` alone, and the median "io" of ``sync`` is the synchronous save that the
ratios divide by. Step times are measured from ``on_train_batch_start`` to the end of the
step's own work (before the checkpoint hook), and split into steps with a background save in
flight and steps without.

Usage: python scripts/bench-lightning-async.py --dir DIR [--every 5] [--saves 5] [--repeat 2]
       [--variants sync,async,reserve,reserve-nice0] [--json out.json]
Runs with whichever uring_ckpt the interpreter imports; variants this build lacks are skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import statistics
import time
from typing import Any

import torch
import uring_ckpt
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset
from uring_ckpt.lightning import AsyncUringCheckpointIO, UringCheckpointIO

GIB = 1 << 30


class Mlp(LightningModule):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return self.body(x).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-5)


class TimedCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that records how long each of its batch-end hooks blocked the loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stalls: list[float] = []

    def on_train_batch_end(self, trainer: Any, *args: Any, **kwargs: Any) -> None:
        step = trainer.global_step
        started = time.perf_counter()
        super().on_train_batch_end(trainer, *args, **kwargs)
        if step % self._every_n_train_steps == 0:
            self.stalls.append(time.perf_counter() - started)


class StepTimes(Callback):
    """Each step's own duration, and whether a background save was in flight at its start."""

    def __init__(self, plugin: Any) -> None:
        self.plugin = plugin
        self.steps: list[tuple[float, bool]] = []
        self._started = 0.0
        self._busy = False

    def _in_flight(self) -> bool:
        saver = getattr(self.plugin, "_saver", None)
        return bool(saver is not None and saver.pending())

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._busy = self._in_flight()
        self._started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.steps.append((time.perf_counter() - self._started, self._busy))


def timed_plugin(cls: type, **kwargs: Any) -> Any:
    """An instance of plugin class ``cls`` whose ``save_checkpoint`` calls are timed."""

    class Timed(cls):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            super().__init__(**kwargs)
            self.io_seconds: list[float] = []

        def save_checkpoint(self, *args: Any, **kw: Any) -> None:
            started = time.perf_counter()
            super().save_checkpoint(*args, **kw)
            self.io_seconds.append(time.perf_counter() - started)

    return Timed()


def available(variant: str) -> bool:
    if variant.startswith("reserve"):
        return hasattr(AsyncUringCheckpointIO, "reserve_callback")
    return True


def run(variant: str, args: argparse.Namespace, data: DataLoader, run_dir: str) -> dict[str, Any]:
    torch.manual_seed(0)
    model = Mlp(args.width, args.layers)
    config: dict[str, Any] = {}
    if variant == "reserve-nice0":
        config = {"background_nice": 0, "background_threads": 4}
    if variant == "sync":
        plugin = timed_plugin(UringCheckpointIO, config=config or None)
    else:
        plugin = timed_plugin(AsyncUringCheckpointIO, config=config or None)
    checkpoint = TimedCheckpoint(dirpath=run_dir, every_n_train_steps=args.every, save_top_k=1)
    steps = StepTimes(plugin)
    callbacks: list[Any] = [steps, checkpoint]
    if variant.startswith("reserve"):
        callbacks.insert(0, plugin.reserve_callback())
    trainer = Trainer(
        default_root_dir=run_dir,
        max_steps=args.every * args.saves,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[plugin],
        callbacks=callbacks,
    )
    fit_started = time.perf_counter()
    trainer.fit(model, data)
    fit_seconds = time.perf_counter() - fit_started
    ckpt_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) * 3
    idle = [s for s, busy in steps.steps[1:] if not busy]
    busy = [s for s, busy in steps.steps[1:] if busy]
    out = {
        "variant": variant,
        "stalls": checkpoint.stalls,
        "io": plugin.io_seconds,
        "checkpoint_gib": ckpt_bytes / GIB,
        "fit_seconds": fit_seconds,
        "step_idle_median": statistics.median(idle) if idle else None,
        "step_busy_median": statistics.median(busy) if busy else None,
        "steps_idle": len(idle),
        "steps_busy": len(busy),
    }
    del trainer, model, plugin, checkpoint, steps
    gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", required=True)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--saves", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--variants", default="sync,async,reserve,reserve-nice0")
    parser.add_argument("--json")
    args = parser.parse_args()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in ("sync", "async", "reserve", "reserve-nice0"):
            parser.error(f"unknown variant {v}")
    skipped = [v for v in variants if not available(v)]
    variants = [v for v in variants if available(v)]
    if skipped:
        print(f"skipped (this uring_ckpt lacks them): {', '.join(skipped)}")
    os.makedirs(args.dir, exist_ok=True)
    x = torch.randn(args.batch * 4, args.width)
    data = DataLoader(TensorDataset(x), batch_size=args.batch)
    print(
        f"uring_ckpt from {os.path.dirname(uring_ckpt.__file__)}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {os.cpu_count()} CPUs"
    )
    results: list[dict[str, Any]] = []
    for r in range(args.repeat):
        for v in variants:
            run_dir = os.path.join(args.dir, f"{v}-{r}")
            shutil.rmtree(run_dir, ignore_errors=True)
            res = run(v, args, data, run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
            results.append(res)
            print(
                f"{v:<14} run {r}: stalls {' '.join(f'{s:.3f}' for s in res['stalls'])} s; "
                f"io {' '.join(f'{s:.3f}' for s in res['io'])} s; steps idle/busy "
                f"{res['step_idle_median'] or 0:.3f}/{res['step_busy_median'] or 0:.3f} s "
                f"({res['steps_idle']}/{res['steps_busy']}); fit {res['fit_seconds']:.1f} s",
                flush=True,
            )
    gib = results[0]["checkpoint_gib"] if results else 0
    print(f"\ncheckpoint {gib:.2f} GiB; medians over {args.repeat} runs (later: every save but the first)")
    sync_io = [s for r in results if r["variant"] == "sync" for s in r["io"]]
    sync_save = statistics.median(sync_io) if sync_io else float("nan")
    print(f"synchronous save (sync's save_checkpoint, median): {sync_save:.3f} s")
    print(
        "| variant | first save stall | later saves' stall | first / later | worst stall / sync save "
        "| step (no save in flight) | step (save in flight) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        rs = [r for r in results if r["variant"] == v]
        first = statistics.median(r["stalls"][0] for r in rs)
        later = statistics.median(s for r in rs for s in r["stalls"][1:])
        worst = max(s for r in rs for s in r["stalls"])
        idle = [r["step_idle_median"] for r in rs if r["step_idle_median"] is not None]
        busy = [r["step_busy_median"] for r in rs if r["step_busy_median"] is not None]
        print(
            f"| {v} | {first:.3f} s | {later:.3f} s | {first / later:.2f} | {worst / sync_save:.2f} | "
            f"{statistics.median(idle) if idle else float('nan'):.3f} s | "
            f"{statistics.median(busy) if busy else float('nan'):.3f} s |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
