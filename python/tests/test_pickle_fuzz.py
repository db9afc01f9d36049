"""Fuzzing the weights_only unpickler: mutated real sidecars and random opcode streams.

Seeded and bounded (a fixed number of inputs, about two seconds here). For every input the
restricted load either raises a ``CorruptCheckpointError`` (``UnsafeCheckpointError`` for
the stream itself) or returns a value built only from allowed types; it never runs code
(payloads in the vocabulary would create a marker file) and never crashes the interpreter.
"""

from __future__ import annotations

import collections
import pathlib
import pickle
import random
import struct

import numpy as np
import pytest
import torch
import uring_ckpt
from uring_ckpt import _pytree, _safe_pickle

P = pickle
TAG = _pytree.PID_TAG
SEED = 20261201
MUTATIONS = 4000
GENERATED = 3000
ROUND_TRIPS = 400


def u(text: str) -> bytes:
    raw = text.encode()
    return (
        P.SHORT_BINUNICODE + bytes([len(raw)]) + raw
        if len(raw) < 256
        else P.BINUNICODE + struct.pack("<I", len(raw)) + raw
    )


def const(value) -> bytes:
    return pickle.dumps(value, protocol=2)[2:-1]


def sg(module: str, name: str) -> bytes:
    return u(module) + u(name) + P.STACK_GLOBAL


def rich_state() -> dict:
    """A Lightning-like checkpoint with every allowed kind of value."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    adam = {  # what Adam.state_dict() holds (a real step costs seconds of imports)
        "state": {
            i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p)}
            for i, p in enumerate(model.parameters())
        },
        "param_groups": [
            {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "foreach": None, "params": [0, 1, 2, 3]}
        ],
    }
    return {
        "epoch": 1,
        "global_step": 10,
        "state_dict": model.state_dict(),
        "optimizer_states": [adam],
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"kth_value": torch.tensor(float("inf"))}},
        "hyper_parameters": {"lr": 1e-3, "dir": pathlib.PurePosixPath("/data"), "sizes": (3, 4)},
        "misc": [
            collections.OrderedDict(a=1),
            collections.Counter("aab"),
            collections.deque([1], maxlen=3),
            collections.defaultdict(None, {1: 2}),
            {1, 2},
            frozenset({"x"}),
            bytearray(b"ab"),
            b"raw",
            complex(1, 2),
            range(3),
            slice(1, None),
            torch.Size([2, 3]),
            torch.device("cpu"),
            torch.bfloat16,
            np.float32(1.5),
            np.dtype(">i4"),
            np.arange(3, dtype=np.int16),
            torch.zeros(2, dtype=torch.int64),
            torch.nn.Parameter(torch.ones(2)),
        ],
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real sidecars and the tensor buffers their references resolve to."""
    path = tmp_path_factory.mktemp("fuzz") / "c"
    state = rich_state()
    uring_ckpt.save(state, path)
    tensors, _meta, extras, _report = uring_ckpt._writer(None).load(str(path), None, True)
    buffers = {name: (dtype, shape, buf) for name, dtype, shape, buf in tensors}
    # The second one references tensors of the first by name ("misc/16", ...).
    sidecars = [extras[_pytree.SIDECAR], _pytree.flatten({"misc": state["misc"]}).sidecar]
    return buffers, sidecars, tmp_path_factory.mktemp("marker") / "marker"


def allowed_check():
    """A function that raises AssertionError when a value holds anything not allowed."""
    try:
        from lightning.fabric.utilities.data import AttributeDict
    except ImportError:  # without Lightning the global is refused anyway
        AttributeDict = dict

    tables = _safe_pickle.tables()
    leaf_types = {
        type(None),
        bool,
        int,
        float,
        complex,
        str,
        bytes,
        bytearray,
        range,
        slice,
        torch.device,
        torch.dtype,
        torch.Tensor,
        torch.nn.Parameter,
        np.ndarray,
        pathlib.PurePosixPath,
        pathlib.PosixPath,
    }
    containers = {list, tuple, set, frozenset, dict, collections.deque, torch.Size}
    dicts = {collections.OrderedDict, collections.defaultdict, collections.Counter, AttributeDict}
    allowed_objects = set(tables.values)  # the allowed globals themselves (classes, functions)

    def check(value) -> None:
        seen: set[int] = set()
        todo = [value]
        while todo:
            v = todo.pop()
            if id(v) in seen:
                continue
            seen.add(id(v))
            t = type(v)
            if id(v) in allowed_objects or t in leaf_types:
                continue
            if isinstance(v, (np.dtype, np.generic)):
                assert _safe_pickle._simple_np_dtype(v if isinstance(v, np.dtype) else v.dtype), repr(v)
                continue
            if t in containers:
                todo.extend(v)
            elif t in dicts or t is dict:
                todo.extend(v.keys())
                todo.extend(v.values())
                todo.extend(vars(v).values() if hasattr(v, "__dict__") else ())
                if t is collections.defaultdict:
                    assert v.default_factory is None or v.default_factory in tables.factories
            else:
                raise AssertionError(f"built a {t!r}: {v!r:.100}")

    return check


def vocabulary(marker: str) -> list[bytes]:
    code = f"open({marker!r}, 'w').close()"
    pid = const((TAG, "state_dict/0.weight", "torch", "float32", "cpu", False, False)) + P.BINPERSID
    words = [
        P.MARK,
        P.POP,
        P.POP_MARK,
        P.DUP,
        P.NONE,
        P.NEWTRUE,
        P.NEWFALSE,
        P.EMPTY_TUPLE,
        P.TUPLE,
        P.TUPLE1,
        P.TUPLE2,
        P.TUPLE3,
        P.EMPTY_LIST,
        P.LIST,
        P.APPEND,
        P.APPENDS,
        P.EMPTY_DICT,
        P.DICT,
        P.SETITEM,
        P.SETITEMS,
        P.EMPTY_SET,
        P.ADDITEMS,
        P.FROZENSET,
        P.MEMOIZE,
        P.REDUCE,
        P.BUILD,
        P.NEWOBJ,
        P.NEWOBJ_EX,
        P.BINPERSID,
        P.OBJ,
        P.STOP,
        P.BINGET + b"\x00",
        P.BINGET + b"\x01",
        P.BINGET + b"\x05",
        P.BINPUT + b"\x02",
        P.LONG_BINGET + b"\xff\xff\xff\xff",
        P.EXT1 + b"\x01",
        P.INST + b"os\nsystem\n",
        P.PERSID + b"x\n",
        P.FRAME + struct.pack("<Q", 3),
        const(0),
        const(-1),
        const(7),
        const(2**70),
        const(1.5),
        const("a"),
        const("f8"),
        const("cpu"),
        const(b"\x00" * 8),
        const((1, 2)),
        P.BYTEARRAY8 + struct.pack("<Q", 2) + b"ab",
        u(code),
        u("touch " + marker),
        pid,
        const((TAG, "nope", "torch", "float32", "cpu", False, False)) + P.BINPERSID,
        const((TAG, "state_dict/0.weight", "torch", "int32", "cpu", False, False)) + P.BINPERSID,
        sg("builtins", "exec"),
        sg("os", "system"),
        sg("numpy", "_core.numeric.builtins.exec"),
        P.GLOBAL + b"builtins\neval\n",
    ]
    for module, name in sorted(_safe_pickle.tables().entries):
        words.append(sg(module, name))
    return words


def restricted_load(data: bytes, buffers) -> object:
    return _pytree.unflatten(data, _pytree.Restorer(buffers, "cpu"), weights_only=True)


def mutate(rng: random.Random, data: bytes, others: list[bytes], words: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(7)
        at = rng.randrange(len(b) + 1)
        if choice == 0 and b:  # flip a byte
            b[min(at, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif choice == 1:  # random bytes
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif choice == 2:  # an opcode snippet, dangerous ones included
            b[at:at] = rng.choice(words)
        elif choice == 3:  # delete a range
            del b[at : at + rng.randint(1, 16)]
        elif choice == 4:  # duplicate a range
            b[at:at] = b[at : at + rng.randint(1, 32)]
        elif choice == 5:  # splice from another sidecar
            o = rng.choice(others)
            s = rng.randrange(len(o))
            b[at:at] = o[s : s + rng.randint(1, 64)]
        else:  # retarget an allowed global of the stream
            b = bytearray(
                bytes(b).replace(
                    u("collections") + P.MEMOIZE + u("OrderedDict"), u("os") + P.MEMOIZE + u("system"), 1
                )
            )
    return bytes(b)


def generate(rng: random.Random, words: list[bytes]) -> bytes:
    body = b"".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
    return P.PROTO + b"\x05" + body + P.STOP


def random_value(rng: random.Random, depth: int = 0):
    """A random nesting of the values a weights_only load may build (no tensors)."""
    leaves = [
        lambda: None,
        lambda: rng.random() < 0.5,
        lambda: rng.randint(-(2**70), 2**70),
        lambda: rng.uniform(-1e9, 1e9),
        lambda: "".join(rng.choice("ab.é/_") for _ in range(rng.randint(0, 8))),
        lambda: bytes(rng.randrange(256) for _ in range(rng.randint(0, 8))),
        lambda: bytearray(rng.randrange(256) for _ in range(rng.randint(0, 4))),
        lambda: complex(rng.random(), rng.random()),
        lambda: range(rng.randint(0, 5), rng.randint(5, 9)),
        lambda: slice(rng.randint(0, 3), None, rng.choice([None, 2])),
        lambda: torch.Size([rng.randint(0, 9) for _ in range(rng.randint(0, 3))]),
        lambda: torch.device(rng.choice(["cpu", "cuda:1", "meta"])),
        lambda: rng.choice([torch.float32, torch.bfloat16, torch.int8, torch.bool]),
        lambda: np.dtype(rng.choice(["<f4", ">i8", "|b1", "<c16"])),
        lambda: rng.choice([np.float32(1.5), np.int64(-3), np.bool_(False), np.uint16(7)]),
        lambda: pathlib.PurePosixPath("/", *rng.choice([["a"], ["b", "c"]])),
        lambda: collections.OrderedDict,
    ]
    if depth >= 3 or rng.random() < 0.4:
        return rng.choice(leaves)()
    items = [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = [rng.choice([rng.randint(0, 99), "k" + str(rng.randint(0, 99)), (1, "t")]) for _ in items]
    kind = rng.randrange(9)
    if kind == 0:
        return items
    if kind == 1:
        return tuple(items)
    if kind == 2:
        return dict(zip(keys, items))
    if kind == 3:
        return collections.OrderedDict(zip(keys, items))
    if kind == 4:
        return collections.defaultdict(None, zip(keys, items))
    if kind == 5:
        return collections.Counter({k: rng.randint(0, 5) for k in keys})
    if kind == 6:
        return collections.deque(items, maxlen=rng.choice([None, 10]))
    if kind == 7:
        return set(keys)
    return frozenset(keys)


def test_random_allowed_values_round_trip(corpus):
    buffers, _, _ = corpus
    check = allowed_check()
    rng = random.Random(SEED + 1)
    for _ in range(ROUND_TRIPS):
        value = random_value(rng)
        back = restricted_load(pickle.dumps({"v": value}, protocol=5), buffers)["v"]
        check(back)
        assert back == value and type(back) is type(value), (value, back)


def test_restricted_unpickler_fuzz(corpus):
    buffers, sidecars, marker = corpus
    check = allowed_check()
    words = vocabulary(str(marker))
    rng = random.Random(SEED)
    outcomes: collections.Counter = collections.Counter()

    for data in sidecars:  # the unmutated ones load
        check(restricted_load(data, buffers))

    inputs = [mutate(rng, rng.choice(sidecars), sidecars, words) for _ in range(MUTATIONS)]
    inputs += [generate(rng, words) for _ in range(GENERATED)]
    for i, data in enumerate(inputs):
        try:
            value = restricted_load(data, buffers)
        except uring_ckpt.CorruptCheckpointError as e:
            outcomes["unsafe" if isinstance(e, uring_ckpt.UnsafeCheckpointError) else "corrupt"] += 1
        except BaseException as e:  # anything else escaping is a bug: say which input
            raise AssertionError(f"input {i} ({data[:80]!r}...) raised {type(e).__name__}: {e}") from e
        else:
            check(value)
            outcomes["built"] += 1
        assert not marker.exists(), f"input {i} ran code: {data!r}"
    print(f"fuzz outcomes over {len(inputs)} inputs: {dict(outcomes)}")
    assert outcomes["built"] > 50 and outcomes["unsafe"] > 1000 and outcomes["corrupt"] > 0, outcomes
