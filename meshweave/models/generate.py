"""Text generation in one process: greedy or nucleus (top-p) sampling with a KV cache.

For looking at what a model says before and after training, not for serving: batch of one, the
prompt processed in one forward, then one token per forward over the cached keys and values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from meshweave.models.llama import KVCache

Tensor = torch.Tensor


def sample_next(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """The next token id from ``logits [vocab]``: the argmax when ``temperature == 0``, else a draw
    from the smallest set of most likely tokens whose probability reaches ``top_p``."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep a token while the mass before it is below top_p: the most likely one always stays
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_ids: Sequence[int] = (),
    seed: int = 0,
) -> list[int]:
    """Up to ``max_new_tokens`` token ids continuing ``prompt`` (at least one id), stopping after
    one of ``eos_ids``. Greedy when ``temperature == 0``; otherwise sampled with ``top_p``,
    reproducibly from ``seed``. ``model`` is a whole meshweave model (not a pipeline stage)."""
    if not prompt:
        raise ValueError("generate: the prompt needs at least one token")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
    window = getattr(getattr(model, "cfg", None), "sliding_window", 0)
    if window and len(prompt) + max_new_tokens > window:
        # meshweave attends over the whole context: past the window that is not the model's math
        raise ValueError(
            f"generate: prompt + max_new_tokens = {len(prompt) + max_new_tokens} exceeds the model's sliding "
            f"window of {window} tokens, which meshweave does not implement; generate fewer tokens"
        )
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    cache = KVCache()
    logits = model(torch.tensor([list(prompt)], device=device), cache=cache)[0, -1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, generator)
        out.append(token)
        if token in eos_ids:
            break
        logits = model(torch.tensor([[token]], device=device), cache=cache)[0, -1]
    return out
