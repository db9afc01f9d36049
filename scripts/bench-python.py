#!/usr/bin/env python3
"""Save the same ~2 GiB state dict four ways, in one run, and print a table:

  torch.save + fsync, safetensors.torch.save_file + fsync, uring_ckpt.save (sync, durable),
  uring_ckpt.AsyncSaver (the training stall until save returns, and the time to durable).

Usage: .venv/bin/python scripts/bench-python.py [--size-gib 2] [--dir bench-out/python] [--repeat 1]
Each figure is the best of --repeat runs; outputs are deleted between runs and `sync` runs
before each timing, so earlier dirty pages do not count against the next method.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch
import uring_ckpt
from safetensors.torch import save_file

GIB = 1 << 30


def state_dict(size_gib: float) -> dict[str, torch.Tensor]:
    """A transformer-like state dict: per layer, attention and MLP weights (bf16 and f32)
    plus norms and biases, as many layers as fit in the size."""
    torch.manual_seed(0)
    hidden = 2048
    state: dict[str, torch.Tensor] = {}
    total = 0
    layer = 0
    while total < size_gib * GIB:
        p = f"model.layers.{layer}."
        dtype = torch.bfloat16 if layer % 2 == 0 else torch.float32
        for name, shape in (
            ("self_attn.q_proj.weight", (hidden, hidden)),
            ("self_attn.k_proj.weight", (hidden, hidden)),
            ("self_attn.v_proj.weight", (hidden, hidden)),
            ("self_attn.o_proj.weight", (hidden, hidden)),
            ("mlp.up_proj.weight", (4 * hidden, hidden)),
            ("mlp.down_proj.weight", (hidden, 4 * hidden)),
            ("input_layernorm.weight", (hidden,)),
            ("mlp.up_proj.bias", (4 * hidden,)),
        ):
            t = torch.empty(shape, dtype=dtype).uniform_(-1, 1)
            state[p + name] = t
            total += t.numel() * t.element_size()
        layer += 1
    return state


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    parent = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(parent)
    finally:
        os.close(parent)


def clean(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)
    os.sync()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--dir", default="bench-out/python")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    state = state_dict(args.size_gib)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(
        f"state dict: {len(state)} tensors, {nbytes / GIB:.2f} GiB (bf16 and f32), dir {args.dir}"
    )

    results: dict[str, dict[str, float]] = {}

    def record(name: str, **figures: float) -> None:
        best = results.get(name)
        if best is None or figures["durable_s"] < best["durable_s"]:
            results[name] = figures

    for _ in range(args.repeat):
        path = os.path.join(args.dir, "torch.pt")
        clean(path)
        t0 = time.perf_counter()
        torch.save(state, path)
        fsync_path(path)
        t = time.perf_counter() - t0
        record("torch.save + fsync", stall_s=t, durable_s=t)
        clean(path)

        path = os.path.join(args.dir, "st.safetensors")
        clean(path)
        t0 = time.perf_counter()
        save_file(state, path)
        fsync_path(path)
        t = time.perf_counter() - t0
        record("safetensors save_file + fsync", stall_s=t, durable_s=t)
        clean(path)

        path = os.path.join(args.dir, "uring-sync")
        clean(path)
        t0 = time.perf_counter()
        report = uring_ckpt.save(state, path)
        t = time.perf_counter() - t0
        record(
            "uring_ckpt.save",
            stall_s=t,
            durable_s=t,
            engine_mib_s=report["throughput_mib_s"],
        )
        engine = report["engine"]["engine"]
        clean(path)

        path = os.path.join(args.dir, "uring-async")
        clean(path)
        with uring_ckpt.AsyncSaver() as saver:
            t0 = time.perf_counter()
            future = saver.save(state, path)
            stall = time.perf_counter() - t0
            future.durable()
            t = time.perf_counter() - t0
        record("uring_ckpt.AsyncSaver (snapshot)", stall_s=stall, durable_s=t)
        clean(path)

    base = results["torch.save + fsync"]["durable_s"]
    print()
    print(
        "| method | training stall (s) | durable (s) | GiB/s to durable | vs torch.save |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        print(
            f"| {name} | {r['stall_s']:.2f} | {r['durable_s']:.2f} | {nbytes / GIB / r['durable_s']:.2f} "
            f"| {base / r['durable_s']:.1f}x |"
        )
    print(
        f"\nuring_ckpt engine: {engine}; torch {torch.__version__}; {args.repeat} run(s), best of each"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"bytes": nbytes, "engine": engine, "results": results}, f, indent=2
            )


if __name__ == "__main__":
    main()
