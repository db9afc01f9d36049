"""Independent check of uring-ckpt shards with the upstream `safetensors` package.

Usage: check_shards.py CHECKPOINT_DIR EXPECTED_DIR [DATA_PHASE]

EXPECTED_DIR holds index.json ({"tensors": [{"name", "dtype", "shape", "file"}]}) and one
raw file per tensor with the bytes the writer was given. For every shard this checks:
- `safetensors.numpy.load_file` loads it unchanged (when every dtype has a numpy type),
  each array's bytes equal the source and its zlib.crc32 equals the stored CRC;
- for dtypes numpy lacks (BF16, F8_*), the header parsed by hand gives the same bytes/CRC;
- the data region starts at a multiple of 8, at most 4095 bytes past the first multiple of
  4096 after the JSON (its phase, equal to DATA_PHASE when given), and everything between
  the JSON and the data region is spaces.
Prints "N passed, 0 failed" on success; exits 1 on the first mismatch.
"""

import json
import os
import struct
import sys
import zlib

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

NUMPY_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "F16", "U32", "I32", "F32", "U64", "I64", "F64", "C64"}


def fail(message):
    print(f"FAIL: {message}")
    print("0 passed, 1 failed")
    sys.exit(1)


def main():
    ckpt, expected_dir = sys.argv[1], sys.argv[2]
    want_phase = int(sys.argv[3]) if len(sys.argv) > 3 else None
    with open(os.path.join(expected_dir, "index.json")) as f:
        expected = {t["name"]: t for t in json.load(f)["tensors"]}
    with open(os.path.join(ckpt, "manifest.json")) as f:
        manifest = json.load(f)
    checked = 0
    via_load_file = 0
    seen = set()
    for shard in manifest["shards"]:
        path = os.path.join(ckpt, shard["file"])
        with open(path, "rb") as f:
            raw = f.read()
        (n,) = struct.unpack("<Q", raw[:8])
        start = 8 + n
        json_end = 8 + len(raw[8:start].rstrip(b" "))
        phase = start - -(-json_end // 4096) * 4096
        if start % 8 != 0 or not 0 <= phase < 4096:
            fail(f"{path}: data region starts at {start}, JSON ends at {json_end}")
        if want_phase is not None and phase != want_phase:
            fail(f"{path}: data region starts at {start}, phase {phase}, not {want_phase}")
        header = json.loads(raw[8:start])
        data = raw[8 + n :]
        with safe_open(path, framework="np") as sf:
            metadata = sf.metadata() or {}
        names = [k for k in header if k != "__metadata__"]
        all_numpy = all(header[k]["dtype"] in NUMPY_DTYPES for k in names)
        arrays = load_file(path) if all_numpy else {}
        for name in names:
            entry = header[name]
            want = expected.get(name)
            if want is None:
                fail(f"{path}: unexpected tensor {name!r}")
            with open(os.path.join(expected_dir, want["file"]), "rb") as f:
                source = f.read()
            if entry["dtype"] != want["dtype"] or entry["shape"] != want["shape"]:
                fail(f"{name}: dtype/shape {entry['dtype']} {entry['shape']} != {want['dtype']} {want['shape']}")
            if name in arrays:
                via_load_file += 1
                got = np.ascontiguousarray(arrays[name]).tobytes()
                if list(arrays[name].shape) != want["shape"]:
                    fail(f"{name}: numpy shape {arrays[name].shape} != {want['shape']}")
            else:
                begin, end = entry["data_offsets"]
                got = data[begin:end]
            if got != source:
                fail(f"{name}: bytes differ from the source ({len(got)} vs {len(source)} bytes)")
            stored = metadata.get("crc32:" + name)
            if stored is None or int(stored, 16) != zlib.crc32(got):
                fail(f"{name}: stored CRC {stored} != zlib.crc32 {zlib.crc32(got):08x}")
            seen.add(name)
            checked += 1
    missing = set(expected) - seen
    if missing:
        fail(f"tensors missing from the shards: {sorted(missing)[:5]}")
    print(f"checked {via_load_file} tensors through safetensors.numpy.load_file")
    print(f"{checked} passed, 0 failed")


if __name__ == "__main__":
    main()
