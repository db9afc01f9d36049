#!/usr/bin/env bash
# GPU checks of the CUDA path, prepared here and run on a bare GPU machine (no Rust toolchain,
# no network; Python >= 3.11 with torch built for CUDA).
#
#   scripts/gpu-check.sh build      # here: builds everything `run` needs into target/gpu-check/
#   scripts/gpu-check.sh dry-run    # here: checks what `run` can check without a GPU (the wheel
#                                   # installs into a fresh 3.11 venv and imports, the scripts parse)
#   scripts/gpu-check.sh run        # there, from the repository root: runs the checks
#
# `build` writes (debug info stripped; total printed, well under the 64 MiB a run may carry):
#   target/gpu-check/cuda-tests       the `it` test binary (`cargo test --release --features cuda`),
#                                     run with the filter `cuda::` (tests/it/cuda.rs)
#   target/gpu-check/uring-ckpt       the CLI, `--release --features cuda`
#   target/gpu-check/wheels/*.whl     the extension, an abi3 wheel for CPython >= 3.11
#                                     (`maturin build --release --features cuda,pyo3/abi3-py311`),
#                                     plus pytest and its dependencies, for a machine without them
#   target/gpu-check/checks.py        the Python checks (also embedded below)
#   target/gpu-check/MANIFEST         commit, sizes, sha256
# target/ is ignored by git: the run tool must carry `target/gpu-check`.
#
# `run` (about 3-5 minutes; each step under a timeout: 90 + 120 + 220 + 30 s, so under 8 minutes
# with the setup; the run tool should get timeout_s=540):
#   1. the machine: nvidia-smi, a Python >= 3.11 (3.12 preferred) with torch seeing CUDA, the
#      artifacts and their checksums;
#   2. a venv with --system-site-packages (torch is the machine's), the wheel installed with
#      pip --no-deps --no-index;
#   3. the Rust CUDA tests (URING_CKPT_REQUIRE_GPU=1: an unusable GPU fails, never skips);
#   4. pytest python/tests/test_cuda.py, failing on any skip;
#   5. checks.py through the public Python API: saves of 3 and 4 shards verified and
#      compared after load, a failed save then a good one, current device/context unchanged
#      after a save from another thread, a kernel still writing the tensor on a side stream
#      when the save starts, and an 8 GiB bf16 checkpoint saved in sync, snapshot and stream
#      modes with copy GB/s, stall and page-locked counts, then loaded back into device memory
#      fresh (`load(device="cuda")`) and in place (`load_into`), GB/s and host peak RSS;
#   6. a summary; the exit status is non-zero on any failure.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="$root/target/gpu-check"
mode="${1:-}"

die() { echo "gpu-check: $*" >&2; exit 2; }

write_checks() {
  # The Python checks, run by `run` (and parsed by `dry-run`).
  cat >"$1" <<'PY'
"""GPU checks of uring_ckpt through its public Python API (scripts/gpu-check.sh run)."""
import ctypes, json, os, sys, threading, time, traceback
import torch
import uring_ckpt
from uring_ckpt import _uring_ckpt

work = sys.argv[1]
big_gib = float(os.environ.get("GPU_CHECK_GIB", "8"))
results = []


def check(name):
    def wrap(fn):
        started = time.perf_counter()
        try:
            detail = fn() or ""
            results.append((name, True, detail, time.perf_counter() - started))
            print(f"PASS {name} ({time.perf_counter() - started:.1f}s) {detail}", flush=True)
        except BaseException as e:  # noqa: BLE001
            traceback.print_exc()
            results.append((name, False, f"{type(e).__name__}: {e}", time.perf_counter() - started))
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
        return fn
    return wrap


def path(name):
    p = os.path.join(work, name)
    if os.path.exists(p):
        uring_ckpt.remove(p)
    return p


def same(state, back):
    for k, v in state.items():
        assert torch.equal(back[k], v), k


libcuda = ctypes.CDLL("libcuda.so.1")


def current_context():
    ctx = ctypes.c_void_p()
    assert libcuda.cuCtxGetCurrent(ctypes.byref(ctx)) == 0
    return ctx.value or 0


@check("setup: CUDA build, driver found")
def _():
    assert _uring_ckpt.cuda_built(), "the installed extension was built without cuda"
    assert uring_ckpt.cuda_available(), "cuda_available() is False on a GPU machine"
    return f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}"


@check("saves of 3 and 4 shards, verified and compared after load")
def _():
    g = torch.Generator(device="cuda").manual_seed(1)
    state = {f"w{i}": torch.randn(1 << 20, device="cuda", generator=g) for i in range(12)}  # 4 MiB each
    shards = []
    for n, limit in ((3, "18MiB"), (4, "14MiB")):  # 4 or 3 tensors of 4 MiB per shard
        p = path(f"shards{n}")
        report = uring_ckpt.save(state, p, config={"max_shard_size": limit, "chunk_size": "1MiB"})
        assert report["shards"] == n, (n, report["shards"])
        assert report["cuda_tensors"] == 12, report["cuda_tensors"]
        uring_ckpt.verify(p)
        same(state, uring_ckpt.load(p, device="cuda"))
        shards.append(report["shards"])
    return f"shards {shards}"


@check("a failed save, then a good one")
def _():
    bad = os.path.join(work, "file")
    with open(bad, "wb") as f:
        f.write(b"not a directory")
    state = {"t": torch.randn(3 << 20, device="cuda")}
    for saver_mode in (None, "snapshot", "stream"):
        if saver_mode is None:
            try:
                uring_ckpt.save(state, os.path.join(bad, "c"))
            except (OSError, uring_ckpt.CheckpointError):
                pass
            else:
                raise AssertionError("a save beneath a regular file succeeded")
            p = path("good-sync")
            uring_ckpt.save(state, p)
        else:
            with uring_ckpt.AsyncSaver(mode=saver_mode) as saver:
                try:
                    error = saver.save(state, os.path.join(bad, "c")).exception()
                except (OSError, uring_ckpt.CheckpointError) as e:
                    error = e
                assert error is not None, "a save beneath a regular file succeeded"
                saver._futures.clear()
                p = path(f"good-{saver_mode}")
                saver.save(state, p).durable()
        same(state, uring_ckpt.load(p, device="cuda"))


@check("current device and context unchanged after a save from another thread")
def _():
    state = {"t": torch.randn(1 << 20, device="cuda")}
    main_before = (current_context(), torch.cuda.current_device())
    seen = []

    def worker():
        try:
            torch.cuda.current_stream(0)
            before = (current_context(), torch.cuda.current_device())
            uring_ckpt.save(state, path("thread-sync"))
            with uring_ckpt.AsyncSaver(mode="stream") as saver:
                saver.save(state, path("thread-async")).durable()
            seen.append((before, (current_context(), torch.cuda.current_device())))
        except BaseException as e:  # noqa: BLE001
            seen.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert not isinstance(seen[0], BaseException), seen[0]
    assert seen[0][0] == seen[0][1], f"the saving thread's context/device changed: {seen[0]}"
    assert (current_context(), torch.cuda.current_device()) == main_before, "the main thread's changed"
    same(state, uring_ckpt.load(os.path.join(work, "thread-async"), device="cuda"))
    return f"{torch.cuda.device_count()} device(s)"


@check("ordering: a kernel still writing the tensor on a side stream when the save starts")
def _():
    t = torch.zeros(32 << 20, device="cuda")  # 128 MiB
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    for i, how in enumerate(("sync", "snapshot", "stream")):
        value = float(i + 1)
        with torch.cuda.stream(side):
            torch.cuda._sleep(int(5e8))
            t.fill_(value)
            p = path(f"order-{how}")
            if how == "sync":
                uring_ckpt.save({"t": t}, p)
            else:
                with uring_ckpt.AsyncSaver(mode=how) as saver:
                    saver.save({"t": t}, p).durable()
        back = uring_ckpt.load(p)["t"]
        assert bool((back == value).all()), f"{how}: the save read the tensor before the kernel finished"
    torch.cuda.synchronize()


def big_state():
    n = int(big_gib * (1 << 30)) // (128 << 20)  # 128 MiB bf16 tensors
    g = torch.Generator(device="cuda").manual_seed(3)
    return {f"layer{i}.w": torch.randn(64 << 20, device="cuda", generator=g).to(torch.bfloat16) for i in range(n)}


big = {}


@check(f"{big_gib:g} GiB bf16 in sync, snapshot and stream modes")
def _():
    state = big_state()
    torch.cuda.synchronize()
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    lines = []
    for how in ("sync", "snapshot", "stream"):
        p = path(f"big-{how}")
        started = time.perf_counter()
        if how == "sync":
            writer = uring_ckpt._writer(None)
            report = uring_ckpt.save(state, p)
            stall = time.perf_counter() - started
            locked = writer.cuda_staging_buffers
        else:
            with uring_ckpt.AsyncSaver(mode=how) as saver:
                future = saver.save(state, p)
                stall = time.perf_counter() - started
                report = future.durable()
                locked = saver._writer.cuda_staging_buffers
        total = time.perf_counter() - started
        assert report["cuda_bytes"] == nbytes, (report["cuda_bytes"], nbytes)
        assert locked > 0, f"{how}: no staging buffer page-locked"
        copy = report.get("copy_seconds") or 0.0
        gbs = nbytes / copy / 1e9 if copy else float("nan")
        back = uring_ckpt.load(p, device="cuda")
        same(state, back)
        del back
        uring_ckpt.remove(p)
        line = (f"{how}: copy {gbs:.1f} GB/s ({copy:.2f}s), stall {stall:.2f}s, total {total:.2f}s, "
                f"write {report.get('write_seconds', 0):.2f}s, overlap {report.get('overlap_ratio', 0):.2f}, "
                f"page-locked staging buffers {locked}")
        print("  " + line, flush=True)
        lines.append(line)
        big[how] = {"copy_gb_s": gbs, "stall_s": stall, "total_s": total, "page_locked": locked,
                    "report": report}
    return "; ".join(lines)


def host_peak_reset():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS:")


def status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


loads = {}


@check(f"{big_gib:g} GiB bf16 loaded into device memory: fresh (load device=cuda) and in place (load_into)")
def _():
    state = big_state()
    torch.cuda.synchronize()
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    p = path("big-load")
    uring_ckpt.save(state, p)
    lines = []
    for how in ("fresh", "in-place", "fresh", "in-place"):
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        target = {k: torch.empty_like(v) for k, v in state.items()} if how == "in-place" else None
        torch.cuda.synchronize()
        before = host_peak_reset()
        started = time.perf_counter()
        if how == "fresh":
            back = uring_ckpt.load(p, device="cuda")
        else:
            result = uring_ckpt.load_into(target, p)
            back = target
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        grown = (status_kib("VmHWM:") - before) / 1024
        same(state, back)
        del back, target
        line = f"{how}: {nbytes / seconds / 1e9:.2f} GB/s ({seconds:.2f}s), host peak +{grown:.0f} MiB"
        print("  " + line, flush=True)
        lines.append(line)
        loads.setdefault(how, []).append({"gb_s": nbytes / seconds / 1e9, "seconds": seconds, "host_peak_mib": grown})
        assert grown < 512, f"{how}: the host peak grew {grown:.0f} MiB (no full host copy expected)"
    uring_ckpt.remove(p)
    return "; ".join(lines)


with open(os.path.join(work, "checks.json"), "w") as f:
    json.dump({"results": results, "big": big, "loads": loads}, f, indent=1, default=str)
failed = [r for r in results if not r[1]]
print(f"python checks: {len(results) - len(failed)} passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
PY
}

build() {
  command -v cargo >/dev/null || die "cargo not found (build runs where the Rust toolchain is)"
  rm -rf "$out" && mkdir -p "$out/wheels"
  echo "== cuda test binary (release, --features cuda)"
  local exe
  exe="$(cargo test --release --features cuda --no-run --test it --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "it":
        print(m["executable"])')" || die "cargo test --no-run failed"
  [ -n "$exe" ] || die "no test executable for tests/it (tests/it/cuda.rs)"
  cp "$exe" "$out/cuda-tests" && strip --strip-debug "$out/cuda-tests"
  echo "== CLI (release, --features cuda)"
  cargo build --release --features cuda --bin uring-ckpt --quiet || die "CLI build failed"
  cp "${CARGO_TARGET_DIR:-target}/release/uring-ckpt" "$out/uring-ckpt" && strip --strip-debug "$out/uring-ckpt"
  echo "== abi3 wheel (CPython >= 3.11, --features cuda)"
  local py="${PYO3_PYTHON:-}"
  # The repository's venv (scripts/test-python.sh makes it, with maturin) first.
  [ -n "$py" ] || { [ -x "$root/.venv/bin/maturin" ] && py="$root/.venv/bin/python"; }
  [ -n "$py" ] || py="$(command -v python3.11 || command -v python3)"
  local maturin
  maturin="$(command -v maturin || echo "$(dirname "$py")/maturin")"
  [ -x "$maturin" ] || die "maturin not found (pip install maturin)"
  (cd python && PYO3_PYTHON="$py" "$maturin" build --release --strip --features cuda,pyo3/abi3-py311 \
    -i "$py" -o "$out/wheels" --quiet) || die "maturin build failed"
  echo "== pytest wheels (for a machine without pytest)"
  "$py" -m pip download --quiet --only-binary=:all: -d "$out/wheels" pytest pluggy iniconfig packaging \
    || echo "warning: could not fetch pytest wheels; run needs pytest on the GPU machine"
  write_checks "$out/checks.py"
  {
    echo "commit $(git rev-parse HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
    echo "built $(date -u +%FT%TZ)"
    # tests/common::scratch() makes its directories under the CARGO_TARGET_TMPDIR baked in.
    echo "scratch $(cd "${CARGO_TARGET_DIR:-target}" && pwd)/tmp"
    (cd "$out" && find . -type f ! -name MANIFEST -printf '%P\n' | sort | xargs sha256sum)
  } >"$out/MANIFEST"
  echo "== artifacts"
  (cd "$out" && find . -type f -printf '%10s  %P\n' | sort -k2)
  local total
  total="$(du -sb "$out" | cut -f1)"
  echo "total: $total bytes ($((total / 1048576)) MiB; the run tool carries at most 64 MiB: carry [\"target/gpu-check\"])"
  [ "$total" -lt $((48 << 20)) ] || die "artifacts too large ($total bytes)"
}

pick_python() {
  local p
  for p in python3.12 python3.13 python3.11 python3; do
    if command -v "$p" >/dev/null && "$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

install_wheel() {
  # $1: venv python. pip first; if it refuses the wheel's platform tag, unpack it (a wheel is
  # a zip) into the venv and let the import decide.
  local vpy="$1" whl
  whl="$(ls "$out"/wheels/uring_ckpt-*-abi3-*.whl 2>/dev/null | head -1)"
  [ -n "$whl" ] || die "no uring_ckpt abi3 wheel in $out/wheels (run 'build' first and carry target/gpu-check)"
  if ! "$vpy" -m pip install --quiet --no-deps --no-index "$whl"; then
    echo "warning: pip refused $(basename "$whl") (glibc $(ldd --version 2>/dev/null | head -1 | awk '{print $NF}')); unpacking it"
    "$vpy" - "$whl" <<'PY' || die "could not unpack the wheel"
import site, sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(site.getsitepackages()[0])
PY
  fi
  if ! "$vpy" -c 'import pytest' 2>/dev/null; then
    "$vpy" -m pip install --quiet --no-index --find-links "$out/wheels" pytest \
      || die "pytest is missing and its bundled wheels did not install"
  fi
}

dry_run() {
  # What can be checked without a GPU: the artifacts are there, the wheel installs into a
  # fresh CPython 3.11 venv with pip --no-deps --no-index and imports, the scripts parse.
  local fail=0 py work
  [ -x "$out/cuda-tests" ] && [ -x "$out/uring-ckpt" ] || die "run 'build' first"
  py="$(command -v python3.11 || true)"
  [ -n "$py" ] || die "dry-run needs python3.11"
  work="$(mktemp -d)"
  "$py" -m venv --system-site-packages "$work/venv" || die "venv"
  install_wheel "$work/venv/bin/python"
  "$work/venv/bin/python" -c 'import uring_ckpt, uring_ckpt._uring_ckpt as e
assert e.cuda_built(), "not a cuda build"
assert e.cuda_available() is False, "no GPU here, yet cuda_available()"
print("wheel imports:", uring_ckpt.__file__, "cuda_built", e.cuda_built())' || fail=1
  write_checks "$work/checks.py"
  "$work/venv/bin/python" -m py_compile "$work/checks.py" "$root/python/tests/test_cuda.py" && echo "checks.py and test_cuda.py parse" || fail=1
  bash -n "$0" && echo "gpu-check.sh parses" || fail=1
  "$out/uring-ckpt" --help >/dev/null && echo "CLI runs" || fail=1
  "$out/cuda-tests" cuda:: --list 2>/dev/null | grep -c ': test' | xargs echo "cuda tests listed:" || fail=1
  # Without a GPU the Rust CUDA tests must skip, and must fail when a GPU is required.
  "$out/cuda-tests" cuda:: -q >/dev/null 2>&1 && echo "cuda tests pass (skip) without a GPU" || fail=1
  if URING_CKPT_REQUIRE_GPU=1 "$out/cuda-tests" cuda:: -q >/dev/null 2>&1; then
    echo "FAIL: URING_CKPT_REQUIRE_GPU=1 did not fail without a GPU"; fail=1
  else
    echo "URING_CKPT_REQUIRE_GPU=1 fails without a GPU, as it should"
  fi
  # test_cuda.py against the CUDA wheel (no GPU: the GPU tests skip, the CUDA-build branches
  # of the others run); torch from the repository's venv, when it has one (a PYTHONPATH entry
  # comes first, but its .pth files, the editable install of uring_ckpt, are not read).
  local torch_site
  torch_site="$(ls -d "$root"/.venv/lib/python3.11/site-packages 2>/dev/null || true)"
  if [ -n "$torch_site" ] && [ -d "$torch_site/torch" ]; then
    (cd "$root" && PYTHONPATH="$torch_site" "$work/venv/bin/python" -c '
import uring_ckpt, sys
assert "/venv/lib/" in uring_ckpt.__file__ and ".venv" not in uring_ckpt.__file__, uring_ckpt.__file__' \
      && PYTHONPATH="$torch_site" "$work/venv/bin/python" -m pytest -q -p no:cacheprovider -rs \
        python/tests/test_cuda.py 2>&1 | tail -4) || fail=1
  else
    echo "no torch in $root/.venv: test_cuda.py only parsed"
  fi
  rm -rf "$work"
  [ "$fail" = 0 ] && echo "dry-run: OK" || { echo "dry-run: FAILED"; exit 1; }
}

run() {
  local started=$SECONDS py work vpy
  declare -a summary=()
  local failed=0
  step() { # name, timeout seconds, command...
    local name="$1" limit="$2"; shift 2
    local t0=$SECONDS
    echo; echo "== $name"
    if timeout --kill-after=10 "$limit" "$@"; then
      summary+=("PASS  $name ($((SECONDS - t0))s)")
    else
      local rc=$?
      summary+=("FAIL  $name (exit $rc$([ $rc = 124 ] && echo ', timed out'), $((SECONDS - t0))s)")
      failed=1
    fi
  }

  echo "== machine"
  command -v nvidia-smi >/dev/null || die "nvidia-smi not found: not a GPU machine?"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || die "nvidia-smi failed"
  py="$(pick_python)" || die "no python >= 3.11 found (python3.12 expected)"
  echo "python: $py ($("$py" -V 2>&1))"
  "$py" -c 'import torch; assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' \
    || die "torch with CUDA is needed in $py"
  [ -f "$out/MANIFEST" ] || die "no $out/MANIFEST: run 'build' here first and carry target/gpu-check"
  (cd "$out" && grep -E '^[0-9a-f]{64} ' MANIFEST | sha256sum --check --quiet) || die "artifacts do not match MANIFEST"
  head -2 "$out/MANIFEST"

  work="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
  "$py" -m venv --system-site-packages "$work/venv" || die "venv creation failed"
  vpy="$work/venv/bin/python"
  install_wheel "$vpy"
  "$vpy" -c 'import uring_ckpt._uring_ckpt as e; assert e.cuda_built(); assert e.cuda_available(), "cuda_available() is False"' \
    || die "the installed extension cannot read device memory"
  export URING_CKPT_REQUIRE_GPU=1

  local scratch
  scratch="$(awk '$1 == "scratch" {print $2}' "$out/MANIFEST")"
  if [ -n "$scratch" ] && ! mkdir -p "$scratch" 2>/dev/null; then
    echo "warning: cannot create $scratch (the Rust tests' scratch base, fixed at build time)"
  fi
  step "Rust CUDA tests (tests/it/cuda.rs)" 90 "$out/cuda-tests" cuda:: --test-threads=1
  step "pytest python/tests/test_cuda.py (no skips allowed)" 120 bash -c '
    "$1" -m pytest -p no:cacheprovider -rs -q python/tests/test_cuda.py --junitxml="$2/junit.xml" || exit 1
    "$1" - "$2/junit.xml" <<"PY"
import sys, xml.etree.ElementTree as ET
suites = ET.parse(sys.argv[1]).getroot()
suites = [suites] if suites.tag == "testsuite" else list(suites)
tests = sum(int(s.get("tests", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
print(f"{tests} tests, {skipped} skipped")
sys.exit(1 if skipped or not tests else 0)
PY' _ "$vpy" "$work"
  write_checks "$work/checks.py"
  mkdir -p "$work/ckpt"
  step "Python checks (shards, failure, device/context, ordering, 8 GiB modes)" 220 "$vpy" "$work/checks.py" "$work/ckpt"
  step "CLI (--features cuda build) verifies the 3- and 4-shard checkpoints the GPU saved" 30 bash -c '
    for n in 3 4; do "$1" verify "$2/shards$n" >/dev/null || exit 1; done' _ "$out/uring-ckpt" "$work/ckpt"

  echo; echo "== summary ($((SECONDS - started))s)"
  printf '%s\n' "${summary[@]}"
  [ -f "$work/ckpt/checks.json" ] && cp "$work/ckpt/checks.json" "${OUT:-$work}/checks.json" 2>/dev/null
  rm -rf "$work/ckpt"
  if [ "$failed" = 0 ]; then echo "gpu-check: ALL PASSED"; else echo "gpu-check: FAILED"; fi
  return "$failed"
}

case "$mode" in
  build) build ;;
  dry-run|--dry-run) dry_run ;;
  run) run ;;
  *) echo "usage: $0 build|dry-run|run" >&2; exit 2 ;;
esac
