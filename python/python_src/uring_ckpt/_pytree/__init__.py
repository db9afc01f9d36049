"""Flattening a nested training state into tensor entries plus a pickled sidecar, and back.

The state (dicts, lists, tuples, any picklable object) is pickled with a ``persistent_id``
hook, as ``torch.save`` does: every torch tensor and numpy array of a safetensors dtype is
left out of the pickle and replaced by a reference to a named tensor entry; the entries go to
safetensors shards. Names are the tensor's path in the nested dicts and lists
(``state_dict/layer.weight``, ``optimizer_states/0/state/3/exp_avg``); a tensor reached only
through some other object is named ``objects/<n>``.

Tensors that share memory with the same offset, shape, strides and dtype (tied weights, or
one tensor object reached twice) are stored once, and come back as one tensor object.
Partially overlapping views are stored separately. Tensors of other dtypes (complex128,
quantized, sparse) and tensor subclasses stay in the pickle, as ``pickle`` writes them.

CUDA tensors are saved from device memory (entry kind ``"cuda"``) when the extension was
built with its ``cuda`` feature and the CUDA driver loads (``_uring_ckpt.cuda_available()``):
they are made contiguous on their device, an event is recorded on torch's current stream
of that device, and the Rust side waits for it on its own streams before it copies them
chunk by chunk into its staging buffers. Otherwise they are copied to the CPU
here (``.to("cpu")``), and the ``uring_ckpt`` logger says why, once.

Modules: :mod:`._format` (file and key names, dtype tables), :mod:`._flatten` (the save
side: :func:`flatten`), :mod:`._restore` (the load side: :class:`Restorer`,
:func:`unflatten`). This package's namespace is what the rest of uring_ckpt uses.
"""

from __future__ import annotations

from ._flatten import Flattened, TensorEntry, cuda_direct, flatten, tensor_bytes
from ._format import FORMAT_KEY, FORMAT_VERSION, PID_TAG, SIDECAR, torch_dtype_from_safetensors, torch_dtype_map
from ._restore import Restorer, unflatten

__all__ = [
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "PID_TAG",
    "SIDECAR",
    "Flattened",
    "Restorer",
    "TensorEntry",
    "cuda_direct",
    "flatten",
    "tensor_bytes",
    "torch_dtype_from_safetensors",
    "torch_dtype_map",
    "unflatten",
]
