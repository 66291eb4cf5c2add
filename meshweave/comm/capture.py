"""Put the collectives torch issues on meshweave's behalf into the ledger.

FSDP2 all-gathers and reduce-scatters through ``torch.distributed``; DTensor redistributes through
the functional collectives. meshweave does not re-implement either, so to keep the ledger complete
:func:`install` wraps those entry points once per process: each call is recorded under the mesh
dimension its process group was registered for (:func:`meshweave.comm.ops.register_group`), with
the same byte formulas as ``ops.py``.

Nesting is counted once: a wrapped call made while another recorded collective is running (one
torch API calling another, or ``ops.py`` calling ``torch.distributed``) is not recorded again.
Functional collectives and ``async_op=True`` calls return before the data moves: they book their
seconds (launch to the end of the wait) when their wait below returns.

Exposed time (see ops.py) of these collectives:

- a synchronous ``torch.distributed`` call (FSDP2's all-gather when not prefetched
  asynchronously, its reduce-scatter, HSDP's all-reduce): on CPU its whole duration — FSDP2 on
  CPU has no side streams, the host runs nothing else meanwhile. On CUDA it counts only when
  issued on the default (compute) stream; FSDP2 issues on its own streams, and the compute
  stream's wait on them happens inside FSDP through stream events that are **not measured**
  (booked as 0 exposed on CUDA).
- an ``async_op=True`` call (FSDP2 with ``unshard_async_op``, i.e. explicit prefetch): the time
  its ``Work.wait()`` blocks (``Work.wait`` is wrapped once per process; works that were not
  recorded here pass through untouched).
- a functional collective (DTensor redistributions of tensor parallelism): the time its
  ``wait_tensor`` blocks — the first wait on any view of the result, which is where
  ``AsyncCollectiveTensor`` synchronises.

Inside ``torch.compile``'d code (``--train.compile`` with tensor parallelism) no wrapper runs when
the graph does. While a functional collective is traced, the wrapper puts a
``meshweave::book_collective`` op beside it (an ordered side effect, so it is neither removed nor
reordered), which books the collective's bytes each time the graph runs, forward and backward;
its seconds and exposed time are not measured (the wait happens inside the compiled code).
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
from torch._library.effects import EffectType

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


# In-flight collectives whose wait books exposed time: id(work) -> (work, dim, op, device) for
# async torch.distributed calls; storage address -> (dim, op, device) for functional collectives.
# Each entry also holds the launch time (perf_counter).
_PENDING_WORKS: dict[int, tuple[Any, str, str, torch.device, float]] = {}
_PENDING_TENSORS: dict[int, tuple[str, str, torch.device, float]] = {}
_MAX_PENDING = 4096  # results dropped unwaited would otherwise accumulate


def _on_compute_stream(device: torch.device) -> bool:
    """Whether a call issued now runs on the compute stream (always, off CUDA)."""
    return device.type != "cuda" or torch.cuda.current_stream(device) == torch.cuda.default_stream(device)


def _remember(table: dict, key: int, value: tuple) -> None:
    if len(table) >= _MAX_PENDING:
        table.clear()  # stale entries only: every live result is waited long before 4096 more launch
    table[key] = value


def _wrap(
    fn: Callable, op: str, tensor_at: tuple[int, str], kind: str, group_at: tuple[int, str], synchronous: bool
) -> Callable:
    op_name = getattr(fn, "__name__", "")

    @functools.wraps(fn)
    def recorded(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            _book_in_graph(_arg(args, kwargs, *tensor_at), _arg(args, kwargs, *group_at), op, kind)
            return fn(*args, **kwargs)
        if ops.recording_suspended():
            return fn(*args, **kwargs)
        payload = _arg(args, kwargs, *tensor_at)
        pg = _resolve(_arg(args, kwargs, *group_at))
        n = dist.get_world_size(pg)
        if not isinstance(payload, Tensor) or n <= 1:
            return fn(*args, **kwargs)
        dim = ops.dim_of(pg)
        ops.note_launch(dim, op)
        # isend is asynchronous whatever its arguments: its Work's wait is where a caller blocks.
        waited = synchronous and not kwargs.get("async_op", False) and op_name != "isend"
        started = time.perf_counter()  # before the mark: exposed never exceeds seconds
        # A functional collective may also wait inside the call (see below): mark before it too.
        marked = (waited or not synchronous) and _on_compute_stream(payload.device)
        mark = ops.stall_begin(payload.device) if marked else None
        stall = mark if waited else None
        with ops.suspend_recording():
            result = fn(*args, **kwargs)
        if not synchronous and not isinstance(result, funcol.AsyncCollectiveTensor):
            # The functional collective waited inside the call (e.g. all_gather_tensor along a dim
            # other than 0 concatenates its chunks, the autograd variants): it blocked throughout.
            waited, stall = True, mark
        if stall is not None:  # first: its clock stops before the seconds' clock (exposed <= seconds)
            ops.stall_end(stall, dim, op)
        seconds = time.perf_counter() - started if waited else 0.0
        ops.LEDGER.record(dim, op, ops.wire_bytes(kind, _nbytes(payload), n), seconds)
        if waited:
            return result
        if synchronous and isinstance(result, dist.Work):  # waited later: book it then
            _remember(_PENDING_WORKS, id(result), (result, dim, op, payload.device, started))
        elif isinstance(result, funcol.AsyncCollectiveTensor):
            _remember(_PENDING_TENSORS, result.elem.untyped_storage().data_ptr(), (dim, op, payload.device, started))
        return result

    recorded.__meshweave_recorded__ = True  # type: ignore[attr-defined]
    return recorded


@torch.library.custom_op("meshweave::book_collective", mutates_args=())
def _book_collective(payload: Tensor, dim: str, op: str, nbytes: int) -> None:
    """Book a collective of a compiled graph in the ledger each time the graph runs."""
    ops.LEDGER.record(dim, op, nbytes, 0.0)


@_book_collective.register_fake
def _(payload: Tensor, dim: str, op: str, nbytes: int) -> None:
    return None


# Ordered side effect: compiled graphs keep the call (no dead-code elimination) in program order.
torch.library._register_effectful_op("meshweave::book_collective", EffectType.ORDERED)


def _book_in_graph(payload: Any, group: Any, op: str, kind: str) -> None:
    """While torch.compile traces a functional collective, put a booking op beside it in the graph
    (bytes from the traced shapes; seconds and exposed time are not measurable from inside)."""
    if not isinstance(payload, Tensor):
        return
    pg = _resolve(group)
    n = dist.get_world_size(pg)
    if n > 1:
        _book_collective(payload, ops.dim_of(pg), op, ops.wire_bytes(kind, _nbytes(payload), n))


def _timed_work_wait(original: Callable) -> Callable:
    @functools.wraps(original)
    def wait(self: Any, *args: Any, **kwargs: Any) -> Any:
        entry = _PENDING_WORKS.pop(id(self), None)
        if entry is None or entry[0] is not self:
            return original(self, *args, **kwargs)
        _, dim, op, device, started = entry
        mark = ops.stall_begin(device) if _on_compute_stream(device) else None
        result = original(self, *args, **kwargs)
        if mark is not None:
            ops.stall_end(mark, dim, op)
        ops.LEDGER.add_seconds(dim, op, time.perf_counter() - started)
        return result

    wait.__meshweave_recorded__ = True  # type: ignore[attr-defined]
    return wait


def _timed_wait_tensor(original: Callable) -> Callable:
    @functools.wraps(original)
    def wait_tensor(tensor: Tensor) -> Tensor:
        if torch.compiler.is_compiling() or not isinstance(tensor, Tensor):
            return original(tensor)
        entry = _PENDING_TENSORS.pop(tensor.untyped_storage().data_ptr(), None)
        if entry is None:
            return original(tensor)
        dim, op, device, started = entry
        mark = ops.stall_begin(device) if _on_compute_stream(device) else None
        result = original(tensor)
        if mark is not None:
            ops.stall_end(mark, dim, op)
        ops.LEDGER.add_seconds(dim, op, time.perf_counter() - started)
        return result

    wait_tensor.__meshweave_recorded__ = True  # type: ignore[attr-defined]
    return wait_tensor


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
    if not getattr(dist.Work.wait, "__meshweave_recorded__", False):
        dist.Work.wait = _timed_work_wait(dist.Work.wait)  # type: ignore[method-assign]
    if not getattr(funcol.wait_tensor, "__meshweave_recorded__", False):
        funcol.wait_tensor = _timed_wait_tensor(funcol.wait_tensor)
    _installed = True
