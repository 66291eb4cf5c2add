"""Bucketed, overlapped gradient all-reduce for replicated data parallelism.

Parameters are grouped into buckets of about ``bucket_bytes`` in reverse registration order,
because backward produces the last layers' gradients first. A post-accumulate-grad hook counts
each parameter's gradient as ready; when a bucket's last gradient arrives, the bucket is
flattened and its all-reduce launched asynchronously, so communication runs under the rest of
backward. :meth:`GradientReducer.finish` launches whatever did not fire (parameters unused this
step count as zero gradients), waits for every bucket, and writes the reduced values back into
``.grad``. Only that wait is exposed; it is timed as ``exposed_wait_s`` (metrics.jsonl
``dp_exposed_wait_s``). The ledger's ``comm_exposed_s["<dim>/all_reduce"]`` books the same wait
more narrowly — only the time blocked inside each bucket's ``wait()`` (ops.py), without launching
the unfired buckets and copying the results back — so it is <= ``exposed_wait_s``.

The reduction is a SUM: the trainer normalises the loss by the global token count, so the sum
over ranks is the gradient of the global mean. ``scale`` multiplies afterwards if a caller wants
an average.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from meshweave.comm.ops import CommGroup, Handle, all_reduce

Tensor = torch.Tensor


def _local(t: Tensor) -> Tensor:
    """This rank's part of ``t``: tensor-parallel parameters and gradients are DTensors."""
    return t.to_local() if isinstance(t, DTensor) else t


class _Bucket:
    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.numel = sum(_local(p).numel() for p in params)
        self.ready = 0
        self.flat: Tensor | None = None
        self.handle: Handle | None = None

    def flatten(self) -> Tensor:
        p0 = _local(self.params[0])
        if self.flat is None:
            self.flat = torch.empty(self.numel, dtype=p0.dtype, device=p0.device)
        offset = 0
        for p in self.params:
            n = _local(p).numel()
            if isinstance(p, DTensor) and isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                # Some DTensor backward rules leave the grad in another layout (e.g. a vocab-
                # sharded embedding's grad replicated): bring it to the parameter's layout.
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)
            if p.grad is None:
                self.flat[offset : offset + n].zero_()
            else:
                self.flat[offset : offset + n].copy_(_local(p.grad).reshape(-1))
            offset += n
        return self.flat

    def unflatten(self, scale: float) -> None:
        assert self.flat is not None, "flatten() first"
        offset = 0
        for p in self.params:
            local = _local(p)
            n = local.numel()
            chunk = self.flat[offset : offset + n].view_as(local)
            if scale != 1.0:
                chunk.mul_(scale)
            if p.grad is None:
                grad = chunk.clone()
                p.grad = DTensor.from_local(grad, p.device_mesh, p.placements) if isinstance(p, DTensor) else grad
            else:
                _local(p.grad).copy_(chunk)
            offset += n


class GradientReducer:
    """All-reduces gradients of ``params`` over ``group`` in buckets, overlapped with backward.

    Every member of ``group`` must run the same backward passes and call :meth:`finish` once per
    optimizer step (collective). Gradient-accumulation micro-steps run under :meth:`no_sync`.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        group: CommGroup,
        bucket_bytes: int,
        overlap: bool = True,
        scale: float = 1.0,
    ) -> None:
        unique: dict[int, nn.Parameter] = {}
        for p in params:
            if p.is_meta:
                raise ValueError("GradientReducer needs materialised parameters: build it after to_empty/init")
            if p.requires_grad:
                unique.setdefault(id(p), p)
        self.group, self.overlap, self.scale = group, overlap, scale
        self.buckets = _make_buckets(list(unique.values())[::-1], bucket_bytes)
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self._sync = True
        self.exposed_wait_s = 0.0
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in unique.values()]

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally without launching reductions (micro-steps but the last)."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        if not (self._sync and self.overlap):
            return
        bucket = self._bucket_of[id(p)]
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        bucket.handle = all_reduce(bucket.flatten(), self.group, async_op=True)

    def finish(self) -> None:
        """Launch unfired buckets, wait for all, write reduced gradients back (collective)."""
        started = time.perf_counter()
        for bucket in self.buckets:
            if bucket.handle is None:
                self._launch(bucket)
        for bucket in self.buckets:
            assert bucket.handle is not None  # launched just above
            bucket.handle.wait()
            bucket.unflatten(self.scale)
            bucket.handle, bucket.ready = None, 0
        self.exposed_wait_s = time.perf_counter() - started

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @property
    def num_buckets(self) -> int:
        return len(self.buckets)


def _make_buckets(params: list[nn.Parameter], bucket_bytes: int) -> list[_Bucket]:
    """Consecutive groups of same-dtype/device parameters of at most ``bucket_bytes`` (>= 1 each)."""
    buckets: list[_Bucket] = []
    current: list[nn.Parameter] = []
    size = 0
    for p in params:
        nbytes = _local(p).numel() * p.element_size()
        same_kind = not current or (current[0].dtype == p.dtype and current[0].device == p.device)
        if current and (size + nbytes > bucket_bytes or not same_kind):
            buckets.append(_Bucket(current))
            current, size = [], 0
        current.append(p)
        size += nbytes
    if current:
        buckets.append(_Bucket(current))
    return buckets
