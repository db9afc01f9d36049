"""Type stubs of the Rust extension module (python/src/lib.rs)."""

import os
from typing import Any

from typing_extensions import TypeAlias

__version__: str

_Path: TypeAlias = str | os.PathLike[str]

class Config:
    """A checkpoint configuration; keyword arguments are the TOML keys (``engine``,
    ``queue_depth``, ``chunk_size``, ``staging_pool_size``, ``max_shard_size``, ``direct_io``,
    ``register_buffers``, ``sqpoll``, ``fsync``, ``verify_on_load``, ``replace_existing``,
    ``io_threads``, ``async_mode``, ``max_saves_in_flight``, ``background_nice``,
    ``background_threads``, ``lock``, ``simulate``). Sizes accept ``"8MiB"``."""

    def __init__(self, **kwargs: Any) -> None: ...
    @staticmethod
    def load(path: _Path | None = None) -> Config: ...
    def replace(self, **kwargs: Any) -> Config: ...
    def to_toml(self) -> str: ...
    @classmethod
    def from_toml(cls, text: str) -> Config: ...
    def __reduce__(self) -> tuple[Any, tuple[str]]: ...
    @property
    def replace_existing(self) -> bool: ...
    @property
    def chunk_size(self) -> int: ...
    @property
    def staging_pool_size(self) -> int: ...
    @property
    def background_nice(self) -> int: ...

class Buffer:
    """Loaded tensor bytes, exported through the (writable) buffer protocol."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

_TensorEntry: TypeAlias = tuple[str, str, list[int], str, Any]
"""``(name, safetensors dtype, shape, kind, obj)``: ``kind`` ``"torch"`` (a contiguous CPU
torch tensor), ``"cuda"`` (a contiguous CUDA torch tensor, copied after the work queued on torch's
current stream of its device; needs
``cuda_available()``) or ``"buffer"`` (a C-contiguous buffer of the tensor's bytes)."""

class Writer:
    def __init__(self, config: Config | None = None) -> None: ...
    @property
    def config(self) -> Config: ...
    @property
    def cuda_staging_buffers(self) -> int:
        """Staging buffers page-locked for CUDA copies (0 before the first CUDA save)."""
    def save(
        self,
        path: _Path,
        tensors: list[_TensorEntry],
        extra_files: list[tuple[str, bytes]],
        metadata: dict[str, str],
        hf_index: bool = True,
    ) -> str: ...
    def begin_ranks(self, path: _Path) -> str:
        """Coordinator: a new multi-rank save id (stale leftovers removed, directory made)."""
    def save_rank(self, path: _Path, save_id: str, rank: int, tensors: list[_TensorEntry]) -> str:
        """This rank's shards into the shared temporary directory; its part as JSON."""
    def commit_ranks(
        self,
        path: _Path,
        save_id: str,
        ranks: list[str],
        metadata: dict[str, str],
        extra_files: list[tuple[str, bytes]],
    ) -> None:
        """Coordinator: checks every rank's shards, writes the manifest, renames once."""
    def load(
        self, path: _Path, names: list[str] | None = None, verify: bool | None = None, map: bool = False
    ) -> tuple[list[tuple[str, str, list[int], Buffer]], dict[str, str], dict[str, bytes], str]: ...
    def load_into(
        self,
        path: _Path,
        dests: list[tuple[str, Any, str, list[int]]],
        names: list[str] | None = None,
        verify: bool | None = None,
        strict: bool = True,
    ) -> tuple[str, list[str], list[str]]: ...
    def remove(self, path: _Path) -> None: ...
    def verify(self, path: _Path) -> str: ...
    def inspect(self, path: _Path) -> str: ...

def dtypes() -> list[str]: ...
def cuda_built() -> bool:
    """Whether the extension was built with the ``cuda`` feature."""

def cuda_available() -> bool:
    """Whether CUDA tensors can be saved from device memory: built with the ``cuda``
    feature and the CUDA driver (``libcuda.so.1``) loads. Never raises."""

class SaveHandle:
    """A background save: its staged and durable completions."""

    @property
    def path(self) -> os.PathLike[str] | str: ...
    def wait_staged(self, timeout: float | None = None) -> bool: ...
    def wait_durable(self, timeout: float | None = None) -> str | None: ...
    def is_staged(self) -> bool: ...
    def is_done(self) -> bool: ...

class AsyncWriter:
    def __init__(self, config: Config) -> None: ...
    @property
    def cuda_staging_buffers(self) -> int: ...
    def save(
        self,
        path: _Path,
        tensors: list[_TensorEntry],
        extra_files: list[tuple[str, bytes]],
        metadata: dict[str, str],
        hf_index: bool = True,
    ) -> SaveHandle: ...
    def in_flight(self) -> int: ...
    def reserve(self, nbytes: int) -> None: ...
    def wait_reserved(self) -> None: ...
    def snapshot_stats(self) -> dict[str, int | bool]: ...
    def teardown(self) -> None: ...
