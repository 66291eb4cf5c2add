"""The autograd seam shared by the blockwise CP methods (ring, TokenRing).

Each method supplies a forward ``(q, k, v, causal, group) -> (out, lse)`` and a backward
``(dout, q, k, v, out, lse, causal, group) -> (dq, dk, dv)`` that uses the final out / lse; this
wraps the pair as a ``torch.autograd.Function`` whose ``apply(q, k, v, causal, group)`` returns
``(out, lse)`` with ``lse`` non-differentiable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def blockwise_function(name: str, forward: Callable, backward: Callable) -> type[torch.autograd.Function]:
    """An autograd Function class named ``name`` running ``forward`` / ``backward`` (collective)."""

    def fwd(ctx, q: Tensor, k: Tensor, v: Tensor, causal: bool, group):
        out, lse = forward(q, k, v, causal, group)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.group = causal, group
        ctx.mark_non_differentiable(lse)
        return out, lse

    def bwd(ctx, dout: Tensor, _dlse: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward(dout.contiguous(), q, k, v, out, lse, ctx.causal, ctx.group)
        return dq, dk, dv, None, None

    doc = f"Autograd wrapper: ``{name}.apply(q, k, v, causal, group) -> (out, lse)``."
    return type(
        name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd), "__doc__": doc}
    )
