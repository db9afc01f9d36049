"""Hostile sidecars: a weights_only load (the default) never runs code.

Each case is a forged ``extras.pkl`` written into a real checkpoint whose manifest lists it
with a matching size and CRC-32 (so ``verify`` passes and the bytes reach the unpickler).
Every payload, if it ran, would create a marker file; each case must fail with a typed
error through ``uring_ckpt.load`` (default and ``weights_only=True``) and through the
Lightning plugin's ``load_checkpoint``, and the marker must not exist. A control test runs
the live payloads through plain ``pickle`` to show that they do run there.

(Long because it is the corpus: 68 forged sidecars, each a few lines.)
"""

from __future__ import annotations

import collections
import contextlib
import copyreg
import io
import json
import os
import pickle
import shlex
import struct
import time
import zlib
from typing import Any, Callable

import numpy as np
import pytest
import torch
import uring_ckpt
from uring_ckpt import _pytree, _safe_pickle

P = pickle  # opcode constants: P.MARK, P.REDUCE, ...
TAG = _pytree.PID_TAG

# ---------------------------------------------------------------------------------------
# A tiny pickle assembler


def u(text: str) -> bytes:
    """A string constant (SHORT_BINUNICODE or BINUNICODE)."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) < 256:
        return P.SHORT_BINUNICODE + bytes([len(raw)]) + raw
    return P.BINUNICODE + struct.pack("<I", len(raw)) + raw


def const(value: Any) -> bytes:
    """The opcodes protocol 2 writes for a plain constant (no PROTO, no STOP)."""
    return pickle.dumps(value, protocol=2)[2:-1]


def sg(module: str, name: str) -> bytes:
    return u(module) + u(name) + P.STACK_GLOBAL


def gl(module: str, name: str) -> bytes:
    return P.GLOBAL + f"{module}\n{name}\n".encode()


def tup(*items: bytes) -> bytes:
    return P.MARK + b"".join(items) + P.TUPLE


def call(func: bytes, *args: bytes) -> bytes:
    return func + tup(*args) + P.REDUCE


def pk(body: bytes) -> bytes:
    """A protocol-5 pickle of ``{"x": <body>}``."""
    return P.PROTO + b"\x05" + P.EMPTY_DICT + u("x") + body + P.SETITEM + P.STOP


def pid(name: str = "w", kind: str = "torch", dtype: str = "float32", *rest: Any) -> bytes:
    fields = rest or ("cpu", False, False)
    return const((TAG, name, kind, dtype, *fields)) + P.BINPERSID


class _Exec:
    """What an attacker pickles into the files a payload loads: exec(code) on unpickling."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple:
        return (exec, (self.code,))


# ---------------------------------------------------------------------------------------
# The corpus: name -> (build(marker, tmp_path) -> bytes, live, expected error)

UNSAFE = uring_ckpt.UnsafeCheckpointError
CORRUPT = uring_ckpt.CorruptCheckpointError
EXT_CODES = {"ext1": 0xF1, "ext2": 0x1F2, "ext4": 0x1F2F2}
EXT_TARGETS = {"ext1": ("builtins", "exec"), "ext2": ("builtins", "eval"), "ext4": ("os", "system")}


def _code(marker: str) -> str:
    return f"open({marker!r}, 'w').close()"


def _shell(marker: str) -> str:
    return f"touch {shlex.quote(marker)}"


def _torch_file(marker: str, tmp: Any) -> str:
    path = os.path.join(tmp, "payload.pt")
    torch.save(_Exec(_code(marker)), path)
    return path


def _npy_file(marker: str, tmp: Any) -> str:
    path = os.path.join(tmp, "payload.npy")
    np.save(path, np.array([_Exec(_code(marker))], dtype=object), allow_pickle=True)
    return path


def _torch_bytes(marker: str) -> bytes:
    buf = io.BytesIO()
    torch.save(_Exec(_code(marker)), buf)
    return buf.getvalue()


def _dag(levels: int) -> bytes:
    """t0 = 0, t(k+1) = (tk, tk): hashing t(levels) walks 2**levels nodes."""
    out = const(0) + P.MEMOIZE + P.POP
    for k in range(levels):
        out += P.BINGET + bytes([k]) + P.BINGET + bytes([k]) + P.TUPLE2 + P.MEMOIZE + P.POP
    return out + P.BINGET + bytes([levels])


def _list_dag(levels: int) -> bytes:
    """l0 = [], l(k+1) = [lk, lk]: printing l(levels) takes 2**levels steps."""
    out = P.EMPTY_LIST + P.MEMOIZE + P.POP
    for k in range(levels):
        out += P.EMPTY_LIST + P.MARK + (P.BINGET + bytes([k])) * 2 + P.APPENDS + P.MEMOIZE + P.POP
    return out + P.BINGET + bytes([levels])


def _set_bomb(copies: int) -> bytes:
    """A 1000-element list, then set(list) built over and over: copies x 1000 elements."""
    body = P.EMPTY_LIST + P.MEMOIZE + P.MARK + b"".join(const(i) for i in range(1000)) + P.APPENDS + P.POP
    body += P.EMPTY_LIST
    one = sg("builtins", "set") + P.BINGET + b"\x00" + P.TUPLE1 + P.REDUCE + P.APPEND
    return body + one * copies


Case = tuple[Callable[[str, Any], bytes], bool, type]

CASES: dict[str, Case] = {
    # -- globals that run code, by every way of naming one -------------------------------
    "stack_global_builtins_exec": (lambda m, t: pk(call(sg("builtins", "exec"), u(_code(m)))), True, UNSAFE),
    "stack_global_builtins_eval": (lambda m, t: pk(call(sg("builtins", "eval"), u(_code(m)))), True, UNSAFE),
    "global_opcode_os_system": (lambda m, t: pk(call(gl("os", "system"), u(_shell(m)))), True, UNSAFE),
    "posix_system": (lambda m, t: pk(call(sg("posix", "system"), u(_shell(m)))), True, UNSAFE),
    "subprocess_popen": (
        lambda m, t: pk(call(sg("subprocess", "Popen"), const(["touch", m]))),
        True,
        UNSAFE,
    ),
    "builtins_getattr_import_chain": (
        lambda m, t: pk(
            call(
                call(sg("builtins", "getattr"), call(sg("builtins", "__import__"), u("os")), u("system")),
                u(_shell(m)),
            )
        ),
        True,
        UNSAFE,
    ),
    # Protocol 4 resolves a dotted name attribute by attribute: an allowed module (numpy,
    # torch, collections) then leads anywhere.
    "dotted_numpy_to_builtins_exec": (
        lambda m, t: pk(call(sg("numpy", "_core.numeric.builtins.exec"), u(_code(m)))),
        True,
        UNSAFE,
    ),
    "dotted_numpy_to_os_system": (
        lambda m, t: pk(call(sg("numpy", "_pytesttester.os.system"), u(_shell(m)))),
        True,
        UNSAFE,
    ),
    "dotted_torch_os_system": (lambda m, t: pk(call(sg("torch", "os.system"), u(_shell(m)))), True, UNSAFE),
    "dotted_global_opcode": (lambda m, t: pk(call(gl("torch", "os.system"), u(_shell(m)))), True, UNSAFE),
    "dotted_ordered_dict_class_chain": (
        # OrderedDict.__class__ is type: type(name, bases, dict) builds classes.
        lambda m, t: pk(call(sg("collections", "OrderedDict.__class__"), u("X"), tup(), P.EMPTY_DICT)),
        False,
        UNSAFE,
    ),
    "numpy_dtypes_prefix_getattr_chain": (
        lambda m, t: pk(sg("numpy.dtypes", "_add_dtype_helper.__globals__")),
        False,
        UNSAFE,
    ),
    "numpy_dtype_suffix_name": (
        lambda m, t: pk(sg("numpy", "_core.numeric.builtins.FakeDType")),
        False,
        UNSAFE,
    ),
    "torch_load_trusted_mode_file": (
        # torch.load(f, None, pickle_module) defaults to weights_only=False.
        lambda m, t: pk(
            call(
                sg("torch", "load"),
                u(_torch_file(m, t)),
                P.NONE,
                call(sg("importlib", "import_module"), u("pickle")),
            )
        ),
        True,
        UNSAFE,
    ),
    "torch_storage_load_from_bytes": (
        lambda m, t: pk(call(sg("torch.storage", "_load_from_bytes"), const(_torch_bytes(m)))),
        True,
        UNSAFE,
    ),
    "numpy_load_allow_pickle": (
        lambda m, t: pk(call(sg("numpy", "load"), u(_npy_file(m, t)), P.NONE, P.NEWTRUE)),
        True,
        UNSAFE,
    ),
    "codecs_encode": (
        lambda m, t: pk(call(sg("_codecs", "encode"), u(_code(m)), u("latin1"))),
        False,
        UNSAFE,
    ),
    "torch_rebuild_tensor": (
        lambda m, t: pk(call(sg("torch._utils", "_rebuild_tensor_v2"), P.NONE, const(0), const((2,)))),
        False,
        UNSAFE,
    ),
    "torch_tensor_class": (lambda m, t: pk(call(sg("torch", "Tensor"), const([1.0]))), False, UNSAFE),
    # EXT codes name globals through copyreg's registry (registered by the fixture).
    "ext1_copyreg": (lambda m, t: pk(call(P.EXT1 + bytes([EXT_CODES["ext1"]]), u(_code(m)))), True, UNSAFE),
    "ext2_copyreg": (
        lambda m, t: pk(call(P.EXT2 + struct.pack("<H", EXT_CODES["ext2"]), u(_code(m)))),
        True,
        UNSAFE,
    ),
    "ext4_copyreg": (
        lambda m, t: pk(call(P.EXT4 + struct.pack("<i", EXT_CODES["ext4"]), u(_shell(m)))),
        True,
        UNSAFE,
    ),
    # -- the other opcodes that call or import ---------------------------------------------
    "inst_opcode": (lambda m, t: pk(P.MARK + u(_shell(m)) + P.INST + b"os\nsystem\n"), True, UNSAFE),
    "obj_opcode": (lambda m, t: pk(P.MARK + sg("builtins", "exec") + u(_code(m)) + P.OBJ), True, UNSAFE),
    "newobj_of_allowed_global": (
        lambda m, t: pk(sg("collections", "OrderedDict") + tup() + P.NEWOBJ),
        False,
        UNSAFE,
    ),
    "newobj_of_popen": (
        lambda m, t: pk(sg("subprocess", "Popen") + const((["touch", m],)) + P.NEWOBJ),
        False,
        UNSAFE,
    ),
    "newobj_ex": (
        lambda m, t: pk(sg("collections", "OrderedDict") + tup() + P.EMPTY_DICT + P.NEWOBJ_EX),
        False,
        UNSAFE,
    ),
    "persid_text_opcode": (lambda m, t: pk(P.PERSID + b"w\n"), False, UNSAFE),
    "stack_global_from_non_constants": (
        # The module name comes out of a tuple built at run time.
        lambda m, t: pk(
            const(("os",))
            + P.POP
            + u("os")
            + P.TUPLE1
            + P.POP
            + u("os")
            + P.DUP
            + P.POP
            + u("system")
            + P.STACK_GLOBAL
        ),
        False,
        UNSAFE,
    ),
    "stack_global_operand_spoof": (
        # Allowed strings pushed, then popped off again before the real ones.
        lambda m, t: pk(
            u("os") + u("collections") + u("OrderedDict") + P.POP + P.POP + u("system") + P.STACK_GLOBAL
        ),
        False,
        UNSAFE,
    ),
    # -- BUILD: __setstate__ / __dict__ tricks ---------------------------------------------
    "build_dunder_attribute": (
        lambda m, t: pk(call(sg("collections", "OrderedDict")) + const({"__class__": None}) + P.BUILD),
        False,
        UNSAFE,
    ),
    "build_shadows_a_method": (
        # od.keys = OrderedDict would run on od.keys(): refused, as is any non-dunder shadow.
        lambda m, t: pk(
            call(sg("collections", "OrderedDict"))
            + P.EMPTY_DICT
            + u("keys")
            + sg("collections", "OrderedDict")
            + P.SETITEM
            + P.BUILD
        ),
        False,
        UNSAFE,
    ),
    "build_on_a_tensor": (
        # Tensor.__setstate__ would install backward hooks (or set_() a storage).
        lambda m, t: pk(pid() + tup(P.NEWFALSE, P.NONE, call(sg("collections", "OrderedDict"))) + P.BUILD),
        False,
        UNSAFE,
    ),
    "build_slotstate_tuple": (
        lambda m, t: pk(call(sg("collections", "OrderedDict")) + tup(P.NONE, const({"x": 1})) + P.BUILD),
        False,
        UNSAFE,
    ),
    "build_on_a_device": (
        lambda m, t: pk(call(sg("torch", "device"), u("cpu")) + const({"a": 1}) + P.BUILD),
        False,
        UNSAFE,
    ),
    # -- container opcodes on objects that are not the built-in containers ----------------
    "setitem_on_a_tensor": (lambda m, t: pk(pid() + const(0) + const(7.0) + P.SETITEM), False, UNSAFE),
    "append_to_a_bytearray": (lambda m, t: pk(const(bytearray(b"ab")) + const(1) + P.APPEND), False, UNSAFE),
    "additems_on_a_tensor": (lambda m, t: pk(pid() + P.MARK + const(1.0) + P.ADDITEMS), False, UNSAFE),
    # -- allowed callables asked to allocate without bound ---------------------------------
    "bytearray_of_a_terabyte": (
        lambda m, t: pk(call(sg("builtins", "bytearray"), const(10**12))),
        False,
        UNSAFE,
    ),
    "set_copy_bomb": (lambda m, t: pk(_set_bomb(3000)), False, UNSAFE),
    "tuple_dag_hash_bomb": (lambda m, t: pk(P.EMPTY_DICT + _dag(60) + P.NONE + P.SETITEM), False, UNSAFE),
    "error_message_repr_bomb_in_pid": (
        lambda m, t: pk(_list_dag(60) + P.TUPLE1 + P.BINPERSID),
        False,
        CORRUPT,
    ),
    "error_message_repr_bomb_in_reduce": (
        lambda m, t: pk(_list_dag(60) + P.MEMOIZE + P.BINGET + b"\x3c" + P.TUPLE1 + P.REDUCE),
        False,
        UNSAFE,
    ),
    "error_message_repr_bomb_in_dtype_state": (
        lambda m, t: pk(call(sg("numpy", "dtype"), u("f8"), P.NEWFALSE, P.NEWTRUE) + _dag(60) + P.BUILD),
        False,
        UNSAFE,
    ),
    "numpy_object_dtype": (
        lambda m, t: pk(call(sg("numpy", "dtype"), u("O"), P.NEWFALSE, P.NEWTRUE)),
        False,
        UNSAFE,
    ),
    "numpy_dtype_state_with_fields": (
        lambda m, t: pk(
            call(sg("numpy", "dtype"), u("f8"), P.NEWFALSE, P.NEWTRUE)
            + const((3, "<", None, ("a",), {"a": (None, 0)}, 8, 1, 16))
            + P.BUILD
        ),
        False,
        UNSAFE,
    ),
    "numpy_scalar_short_bytes": (
        lambda m, t: pk(
            call(
                sg("numpy._core.multiarray", "scalar"),
                call(sg("numpy", "dtype"), u("f8"), P.NEWFALSE, P.NEWTRUE),
                const(b"\x00"),
            )
        ),
        False,
        UNSAFE,
    ),
    "defaultdict_factory_is_a_function": (
        lambda m, t: pk(call(sg("collections", "defaultdict"), sg("numpy._core.multiarray", "scalar"))),
        False,
        UNSAFE,
    ),
    "torch_device_index_out_of_range": (
        lambda m, t: pk(call(sg("torch", "device"), u("cuda"), const(1 << 40))),
        False,
        UNSAFE,
    ),
    # -- malformed streams -------------------------------------------------------------------
    "text_long_opcode": (lambda m, t: pk(P.LONG + b"9" * 100000 + b"L\n"), False, UNSAFE),
    "bytes_after_stop": (lambda m, t: pk(const(1)) + b"garbage", False, UNSAFE),
    "truncated": (lambda m, t: pk(const("abcdef"))[:-6], False, UNSAFE),
    "memo_get_missing": (lambda m, t: pk(P.LONG_BINGET + struct.pack("<I", 123456)), False, UNSAFE),
    "pop_mark_without_mark": (lambda m, t: pk(const(1) + P.POP_MARK), False, UNSAFE),
    "not_a_pickle": (lambda m, t: b"\x00\x01\x02 definitely not a pickle", False, UNSAFE),
    # -- persistent ids (tensor references) that do not match the shards -------------------
    "pid_unknown_tensor": (lambda m, t: pk(pid("no/such/tensor")), False, CORRUPT),
    "pid_wrong_dtype_other_itemsize": (lambda m, t: pk(pid("w", "torch", "float64")), False, CORRUPT),
    "pid_wrong_dtype_same_itemsize": (lambda m, t: pk(pid("w", "torch", "int32")), False, CORRUPT),
    "pid_dtype_name_is_a_torch_module": (lambda m, t: pk(pid("w", "torch", "_dynamo")), False, CORRUPT),
    "pid_numpy_wrong_dtype": (lambda m, t: pk(pid("n", "numpy", "<f4")), False, CORRUPT),
    "pid_numpy_object_dtype": (lambda m, t: pk(pid("n", "numpy", "|O")), False, CORRUPT),
    "pid_numpy_structured_dtype": (lambda m, t: pk(pid("n", "numpy", "i2,i2")), False, CORRUPT),
    "pid_with_a_shape": (
        lambda m, t: pk(const((TAG, "w", "torch", "float32", "cpu", False, False, (3, 2))) + P.BINPERSID),
        False,
        CORRUPT,
    ),
    "pid_not_a_tuple": (lambda m, t: pk(u("w") + P.BINPERSID), False, CORRUPT),
    "pid_a_list": (
        lambda m, t: pk(const([TAG, "w", "torch", "float32", "cpu", False, False]) + P.BINPERSID),
        False,
        CORRUPT,
    ),
    "pid_tensor_valued_field": (
        lambda m, t: pk(
            tup(u(TAG), u("w"), u("torch"), u("float32"), u("cpu"), pid(), P.NEWFALSE) + P.BINPERSID
        ),
        False,
        CORRUPT,
    ),
    "pid_grad_on_an_int_tensor": (
        lambda m, t: pk(pid("i", "torch", "int64", "cpu", True, True)),
        False,
        CORRUPT,
    ),
    "pid_bad_device": (
        lambda m, t: pk(pid("w", "torch", "float32", "no-such-device:x", False, False)),
        False,
        CORRUPT,
    ),
}


@pytest.fixture
def ext_codes():
    """Registers the EXT codes the ext* cases use (exec, eval, os.system), as a library might."""
    for key, code in EXT_CODES.items():
        copyreg.add_extension(*EXT_TARGETS[key], code)
    yield
    for key, code in EXT_CODES.items():
        copyreg.remove_extension(*EXT_TARGETS[key], code)


def base_checkpoint(path: Any) -> None:
    uring_ckpt.save(
        {
            "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "i": torch.arange(3, dtype=torch.int64),
            "n": np.arange(4, dtype=np.int32),
        },
        path,
    )


def forge(path: Any, sidecar: bytes) -> None:
    """Replaces the checkpoint's sidecar and patches the manifest's size and CRC-32 for it,
    as an attacker who controls every file would (the manifest has no checksum of its own)."""
    (path / _pytree.SIDECAR).write_bytes(sidecar)
    manifest_path = path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    (extra,) = [e for e in manifest["extra_files"] if e["file"] == _pytree.SIDECAR]
    extra["size"] = len(sidecar)
    extra["crc32"] = f"{zlib.crc32(sidecar) & 0xFFFFFFFF:08x}"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")


def test_the_corpus_is_large_and_live():
    assert len(CASES) >= 30
    assert sum(live for _, live, _ in CASES.values()) >= 15


@pytest.mark.parametrize("name", sorted(CASES))
def test_forged_sidecar_is_refused(tmp_path, name, ext_codes):
    build, _live, expected = CASES[name]
    marker = tmp_path / "marker"
    path = tmp_path / "c.ckpt"
    base_checkpoint(path)
    forge(path, build(str(marker), str(tmp_path)))
    assert uring_ckpt.verify(path)  # consistent forgery: the bytes reach the unpickler

    lightning = pytest.importorskip("uring_ckpt.lightning")
    loads = {
        "load()": lambda: uring_ckpt.load(path),
        "load(weights_only=True)": lambda: uring_ckpt.load(path, weights_only=True),
        "load_checkpoint()": lambda: lightning.UringCheckpointIO().load_checkpoint(path),
        "load_checkpoint(weights_only=True)": lambda: lightning.UringCheckpointIO().load_checkpoint(
            path, weights_only=True
        ),
    }
    for how, load in loads.items():
        with pytest.raises(CORRUPT) as info:
            load()
        assert isinstance(info.value, expected), (how, repr(info.value))
        if expected is UNSAFE:
            assert isinstance(info.value, pickle.UnpicklingError), how
        assert not marker.exists(), f"{name}: {how} ran the payload"
    time.sleep(0.01 if name != "subprocess_popen" else 0.5)  # a Popen would be asynchronous
    assert not marker.exists()


@pytest.mark.parametrize("name", sorted(n for n, (_, live, _) in CASES.items() if live))
def test_control_live_payloads_run_under_plain_pickle(tmp_path, name, ext_codes):
    """The corpus is not vacuous: plain pickle (what weights_only=False uses) runs them."""
    build, _, _ = CASES[name]
    marker = tmp_path / "marker"
    data = build(str(marker), str(tmp_path))
    with contextlib.suppress(Exception):  # the side effect happens before whatever fails next
        pickle.loads(data)
    deadline = time.monotonic() + 5
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), name


def test_refusal_message_says_how_to_proceed(tmp_path):
    path = tmp_path / "c"
    base_checkpoint(path)
    forge(path, pk(call(sg("os", "system"), u("true"))))
    with pytest.raises(UNSAFE) as info:
        uring_ckpt.load(path)
    text = str(info.value)
    assert "os.system" in text and "weights_only=False" in text
    assert "torch.serialization.add_safe_globals([os.system])" in text
    assert "extras.pkl" in text


def test_add_safe_globals_cannot_allow_blocked_modules(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "c"
    base_checkpoint(path)
    forge(path, pk(call(sg("posix", "system"), u(_shell(str(marker))))))
    with torch.serialization.safe_globals([os.system]), pytest.raises(UNSAFE, match="never allowed"):
        uring_ckpt.load(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------
# What stays allowed


class Config:
    """A user class, allowed only through add_safe_globals."""

    def __init__(self, lr: float) -> None:
        self.lr = lr


def test_allowed_values_round_trip_with_the_default(tmp_path):
    import pathlib

    sd = torch.nn.Linear(2, 2).state_dict()  # an OrderedDict with a _metadata attribute
    state = {
        "state_dict": sd,
        "od": collections.OrderedDict(a=1),
        "dd": collections.defaultdict(None, {"k": [1]}),
        "counter": collections.Counter("abca"),
        "deque": collections.deque([1, 2], maxlen=5),
        "set": {1, (2, 3)},
        "frozenset": frozenset({"a"}),
        "misc": [slice(1, 2), range(3), complex(1, 2), bytearray(b"xy"), b"raw", 2**100, -1.5],
        "torch": [torch.Size([2, 3]), torch.device("cpu"), torch.bfloat16, torch.float8_e4m3fn],
        "numpy": [np.float32(1.5), np.int64(-3), np.bool_(True), np.dtype(">i4"), np.dtype("c16")],
        "paths": [pathlib.PurePosixPath("/a/b"), pathlib.Path("rel/dir")],
        "classes": [collections.OrderedDict, torch.Size],
    }
    uring_ckpt.save(state, tmp_path / "c")
    back = uring_ckpt.load(tmp_path / "c")
    assert back["state_dict"]._metadata == sd._metadata
    for key, value in state.items():
        if key != "state_dict":
            assert back[key] == value, key
            assert type(back[key]) is type(value), key
    assert back["dd"].default_factory is None and back["deque"].maxlen == 5
    assert [type(x) for x in back["numpy"]] == [type(x) for x in state["numpy"]]
    assert back["numpy"][3].byteorder == ">"


def test_add_safe_globals_allows_a_class_exactly(tmp_path):
    uring_ckpt.save({"cfg": Config(0.1), "w": torch.ones(2)}, tmp_path / "c")
    with pytest.raises(UNSAFE, match="Config"):
        uring_ckpt.load(tmp_path / "c")
    with torch.serialization.safe_globals([Config]):
        back = uring_ckpt.load(tmp_path / "c")
    assert type(back["cfg"]) is Config and back["cfg"].lr == 0.1
    # A name that only starts like the allowed one is still refused.
    path = tmp_path / "d"
    base_checkpoint(path)
    forge(path, pk(sg(Config.__module__, "Config.__init__.__globals__")))
    with torch.serialization.safe_globals([Config]), pytest.raises(UNSAFE, match="dotted"):
        uring_ckpt.load(path)
    assert uring_ckpt.load(tmp_path / "c", weights_only=False)["cfg"].lr == 0.1


def test_lightning_attribute_dict_is_allowed(tmp_path):
    data = pytest.importorskip("lightning.fabric.utilities.data")
    state = data.AttributeDict(step=3, w=torch.ones(2))
    uring_ckpt.save({"state": state}, tmp_path / "c")
    back = uring_ckpt.load(tmp_path / "c")["state"]
    assert type(back) is data.AttributeDict and back.step == 3 and torch.equal(back.w, torch.ones(2))
    # but never with constructor arguments
    path = tmp_path / "d"
    base_checkpoint(path)
    forge(path, pk(sg("lightning.fabric.utilities.data", "AttributeDict") + const((1,)) + P.NEWOBJ))
    with pytest.raises(UNSAFE):
        uring_ckpt.load(path)


def test_trusted_mode_still_unpickles_everything(tmp_path):
    import threading

    uring_ckpt.save({"cls": threading.Event, "cfg": Config(2.0)}, tmp_path / "c")
    back = uring_ckpt.load(tmp_path / "c", weights_only=False)
    assert back["cls"] is threading.Event and back["cfg"].lr == 2.0
    lightning = pytest.importorskip("uring_ckpt.lightning")
    assert lightning.UringCheckpointIO().load_checkpoint(tmp_path / "c", weights_only=False)["cfg"].lr == 2.0
    with pytest.raises(UNSAFE):
        lightning.UringCheckpointIO().load_checkpoint(tmp_path / "c")


def test_forged_dtype_raises_corrupt_also_in_trusted_mode(tmp_path):
    path = tmp_path / "c"
    base_checkpoint(path)
    forge(path, pk(pid("w", "torch", "float64")))
    with pytest.raises(CORRUPT, match="float64"):
        uring_ckpt.load(path, weights_only=False)


def test_every_allowed_opcode_has_a_handler():
    machine = _safe_pickle._Machine(0, lambda pid: None, _safe_pickle.tables(), {}, "x")
    handled = set(machine._dispatch()) | _safe_pickle._CONSTANT_OPS
    assert handled == _safe_pickle._ALLOWED_OPS
    assert not {"INST", "OBJ", "EXT1", "EXT2", "EXT4", "NEWOBJ_EX", "PERSID"} & handled
    assert all("." not in name for _, name in _safe_pickle.tables().entries)
