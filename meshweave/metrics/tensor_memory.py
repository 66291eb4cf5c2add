"""The high-water mark of live tensor bytes on this rank, on any device (``log.tensor_memory``).

``mem_peak_bytes`` is the CUDA allocator's peak on a GPU but the process's peak RSS on a CPU,
which includes the interpreter, torch's libraries and allocator slack (300-450 MB before a
single weight exists), so it cannot check a memory estimate there. :class:`TensorMemoryPeak`
counts what the run itself holds: the bytes of every distinct tensor storage alive at once.

How (the accounting of torch's ``MemTracker``, without its per-module snapshots, which refuse a
second iteration): a dispatch mode sees every operator's outputs and records each new storage
with a weak reference whose callback subtracts it when the storage is freed. Storages that exist
when tracking starts (parameters, buffers, gradients, optimizer state) are counted from the
model and the optimizer; optimizer state created later is an operator's output like any other.
DTensor operators are let through to run as local operators, so a shard counts its local bytes;
``UntypedStorage.resize_`` (FSDP2 frees and re-allocates its unsharded parameters that way,
outside the dispatcher) is followed while tracking. Views share their base's storage and count
once. Tensors made outside the dispatcher (``torch.from_numpy``) are not seen.

Every operator runs through Python while tracking is on, so a step costs noticeably more;
tracking is off unless ``log.tensor_memory=true``. ``torch.compile`` regions are not seen
operator by operator.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch._guards import active_fake_mode
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves


def _storages(t: torch.Tensor) -> Iterator[torch.UntypedStorage]:
    """The storages holding ``t``'s bytes (a wrapper subclass's inner tensors, a DTensor's shard)."""
    if isinstance(t, DTensor):
        yield from _storages(t._local_tensor)
    elif is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        for attr in attrs:
            inner = getattr(t, attr)
            if isinstance(inner, torch.Tensor):
                yield from _storages(inner)
    elif t.device.type != "meta":
        yield t.untyped_storage()


class TensorMemoryPeak(TorchDispatchMode):
    """A context that counts live tensor bytes; :meth:`peak_bytes` is the highest total seen
    since it was entered (a run's high-water mark, like ``mem_peak_bytes``). One per thread of
    execution; the callbacks may run on any thread, hence the lock."""

    def __init__(self, *owners: nn.Module | torch.optim.Optimizer) -> None:
        super().__init__()
        self._owners = owners
        self._sizes: dict[int, int] = {}  # id(storage) -> bytes, for storages alive now
        self._refs: dict[int, weakref.ref] = {}
        self._lock = threading.Lock()
        self.current = 0
        self.peak = 0
        self._resize: Any = None

    # ------------------------------------------------------------------ accounting

    def _count(self, storage: torch.UntypedStorage) -> None:
        key, size = id(storage), storage.nbytes()
        with self._lock:
            if key in self._sizes:
                self.current += size - self._sizes[key]
            else:
                self._refs[key] = weakref.ref(storage, functools.partial(self._freed, key))
                self.current += size
            self._sizes[key] = size
            self.peak = max(self.peak, self.current)

    def _freed(self, key: int, _ref: weakref.ref) -> None:
        with self._lock:
            self.current -= self._sizes.pop(key, 0)
            self._refs.pop(key, None)

    def _count_tensor(self, t: object) -> None:
        if isinstance(t, torch.Tensor):
            for storage in _storages(t):
                self._count(storage)

    def _count_owners(self) -> None:
        for owner in self._owners:
            if isinstance(owner, nn.Module):
                for t in [*owner.parameters(), *owner.buffers()]:
                    self._count_tensor(t)
                    self._count_tensor(t.grad)
            else:
                for state in owner.state.values():
                    for value in tree_leaves(state):
                        self._count_tensor(value)

    def peak_bytes(self) -> int:
        """The highest number of live tensor bytes (all devices of this rank) seen so far."""
        return self.peak

    # ------------------------------------------------------------------ the mode

    def __enter__(self) -> TensorMemoryPeak:
        self._count_owners()
        self._resize = original = torch.UntypedStorage.resize_

        @functools.wraps(original)
        def resize_(storage: torch.UntypedStorage, size: int) -> Any:
            out = original(storage, size)
            if storage.device.type != "meta":
                self._count(storage)
            return out

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign,assignment]
        super().__enter__()
        return self

    def __exit__(self, *args: Any) -> None:
        torch.UntypedStorage.resize_ = self._resize  # type: ignore[method-assign]
        super().__exit__(*args)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor runs its local operators, which come back here
        out = func(*args, **(kwargs or {}))
        if active_fake_mode() is None:  # not DTensor's shape propagation on fake tensors
            for t in tree_leaves(out):
                self._count_tensor(t)
        return out
