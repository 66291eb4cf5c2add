"""Put the collectives torch issues on meshweave's behalf into the ledger.

FSDP2 all-gathers and reduce-scatters through ``torch.distributed``; DTensor redistributes through
the functional collectives. meshweave does not re-implement either, so to keep the ledger complete
:func:`install` wraps those entry points once per process: each call is recorded under the mesh
dimension its process group was registered for (:func:`meshweave.comm.ops.register_group`), with
the same byte formulas as ``ops.py``.

Nesting is counted once: a wrapped call made while another recorded collective is running (one
torch API calling another, or ``ops.py`` calling ``torch.distributed``) is not recorded again.
Functional collectives and ``async_op=True`` calls return before the data moves, so they book
bytes and no seconds.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.distributed.distributed_c10d as c10d

from meshweave.comm import ops

Tensor = torch.Tensor


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _resolve(group: Any) -> dist.ProcessGroup:
    """The ProcessGroup behind any group spec torch accepts (None, a group, a name, (mesh, dim))."""
    if group is None:
        assert dist.group.WORLD is not None, "no default process group"
        return dist.group.WORLD
    if isinstance(group, dist.ProcessGroup):
        return group
    return c10d._resolve_process_group(funcol._resolve_group_name(group))


# Each rule: (ledger op, positional index and name of the tensor, kind of formula, group index/name)
# kinds: "all_reduce" 2(n-1)/n x t; "gather" (n-1) x input; "scatter" (n-1)/n x input;
# "bcast" (n-1)/n x t; "a2a" (n-1)/n x input; "p2p" t.
_DIST_RULES = {
    "all_reduce": ("all_reduce", (0, "tensor"), "all_reduce", (2, "group")),
    "all_gather_into_tensor": ("all_gather", (1, "input_tensor"), "gather", (2, "group")),
    "all_gather_single": ("all_gather", (1, "input_tensor"), "gather", (2, "group")),
    "reduce_scatter_tensor": ("reduce_scatter", (1, "input"), "scatter", (3, "group")),
    "reduce_scatter_single": ("reduce_scatter", (1, "input"), "scatter", (3, "group")),
    "all_to_all_single": ("all_to_all", (1, "input"), "a2a", (4, "group")),
    "broadcast": ("broadcast", (0, "tensor"), "bcast", (2, "group")),
    "send": ("send", (0, "tensor"), "p2p", (2, "group")),
    "isend": ("send", (0, "tensor"), "p2p", (2, "group")),
}
_FUNCOL_RULES = {
    "all_reduce": ("all_reduce", (0, "self"), "all_reduce", (2, "group")),
    "all_gather_tensor": ("all_gather", (0, "self"), "gather", (2, "group")),
    "all_gather_single": ("all_gather", (0, "self"), "gather", (2, "group")),
    "reduce_scatter_tensor": ("reduce_scatter", (0, "self"), "scatter", (3, "group")),
    "reduce_scatter_single": ("reduce_scatter", (0, "self"), "scatter", (3, "group")),
    "all_to_all_single": ("all_to_all", (0, "self"), "a2a", (3, "group")),
    "all_gather_tensor_autograd": ("all_gather", (0, "self"), "gather", (2, "group")),
    "all_gather_single_autograd": ("all_gather", (0, "self"), "gather", (2, "group")),
    "reduce_scatter_single_autograd": ("reduce_scatter", (0, "self"), "scatter", (3, "group")),
    "reduce_scatter_tensor_autograd": ("reduce_scatter", (0, "self"), "scatter", (3, "group")),
    "all_to_all_single_autograd": ("all_to_all", (0, "self"), "a2a", (3, "group")),
}


def _wrap(
    fn: Callable, op: str, tensor_at: tuple[int, str], kind: str, group_at: tuple[int, str], synchronous: bool
) -> Callable:
    @functools.wraps(fn)
    def recorded(*args: Any, **kwargs: Any) -> Any:
        if ops.recording_suspended():
            return fn(*args, **kwargs)
        payload = _arg(args, kwargs, *tensor_at)
        pg = _resolve(_arg(args, kwargs, *group_at))
        n = dist.get_world_size(pg)
        if not isinstance(payload, Tensor) or n <= 1:
            return fn(*args, **kwargs)
        dim = ops.dim_of(pg)
        ops.note_launch(dim, op)
        started = time.perf_counter()
        with ops.suspend_recording():
            result = fn(*args, **kwargs)
        waited = synchronous and not kwargs.get("async_op", False)
        seconds = time.perf_counter() - started if waited else 0.0
        ops.LEDGER.record(dim, op, ops.wire_bytes(kind, _nbytes(payload), n), seconds)
        return result

    recorded.__meshweave_recorded__ = True  # type: ignore[attr-defined]
    return recorded


_installed = False


def install() -> None:
    """Route torch's own collectives into the ledger (idempotent; call before building models)."""
    global _installed
    if _installed:
        return
    for name, (op, tensor_at, kind, group_at) in _DIST_RULES.items():
        fn = getattr(c10d, name, None)
        if fn is not None and not getattr(fn, "__meshweave_recorded__", False):
            # One wrapper in both namespaces: torch compares functions by identity (P2POp
            # accepts only ``isend``/``irecv`` as c10d sees them).
            wrapped = _wrap(fn, op, tensor_at, kind, group_at, synchronous=True)
            setattr(c10d, name, wrapped)
            setattr(dist, name, wrapped)
    for name, (op, tensor_at, kind, group_at) in _FUNCOL_RULES.items():
        fn = getattr(funcol, name, None)
        if fn is not None and not getattr(fn, "__meshweave_recorded__", False):
            setattr(funcol, name, _wrap(fn, op, tensor_at, kind, group_at, synchronous=False))
    _installed = True
