"""Specification of document masking in the model (kernels/documents.py, models/llama.py).

A packed sequence with document ids behaves as if each document were run alone: its logits equal
the logits of the document by itself (positions from 0, no attention across the boundary). fp32
end to end; the bound 1e-5 relative to the logits' scale covers blockwise vs whole-row softmax
rounding (measured ~1e-6).
"""

from __future__ import annotations

import pytest
import torch

from meshweave.config import ModelConfig
from meshweave.kernels.documents import Documents, document_positions, single_document_rows
from meshweave.models.llama import build_model, init_value

TOL = 1e-5


def tiny_model(**overrides) -> torch.nn.Module:
    fields = dict(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab_size=97, max_seq_len=64, rope_theta=500.0
    )
    fields.update(overrides)
    cfg = ModelConfig(**fields)
    model = build_model(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_value(name, p.shape, cfg, 0))
    return model


def ids_of(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])


def test_positions_restart_at_every_document():
    ids = torch.stack([ids_of([3, 1, 4]), ids_of([8])])
    assert document_positions(ids).tolist() == [[0, 1, 2, 0, 0, 1, 2, 3], list(range(8))]


def test_rows_of_one_document_are_recognised():
    assert single_document_rows(torch.stack([ids_of([5]), ids_of([5]) + 7]))
    assert not single_document_rows(torch.stack([ids_of([5]), ids_of([2, 3])]))


def test_a_shard_sees_its_own_ids_and_positions():
    ids = ids_of([3, 5]).unsqueeze(0)
    shard = Documents(ids, index=torch.tensor([6, 7, 0, 1]))
    assert shard.local_ids().tolist() == [[1, 1, 0, 0]]
    assert shard.rope_positions().tolist() == [[3, 4, 0, 1]]


@pytest.mark.parametrize("lengths", [[5, 11, 1, 7], [24], [1] * 24, [12, 12]])
def test_packed_logits_equal_each_document_alone(lengths):
    model = tiny_model()
    tokens = torch.randint(0, 97, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        packed = model(tokens, documents=ids_of(lengths).unsqueeze(0))
        alone = torch.cat([model(part) for part in tokens.split(lengths, dim=1)], dim=1)
    assert (packed - alone).abs().max() <= TOL * alone.abs().max()


def test_rows_of_a_batch_keep_their_own_documents():
    model = tiny_model()
    tokens = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    ids = torch.stack([ids_of([4, 12]), ids_of([10, 6])])
    with torch.no_grad():
        both = model(tokens, documents=ids)
        one = [model(tokens[i : i + 1], documents=ids[i : i + 1]) for i in range(2)]
    assert (both - torch.cat(one)).abs().max() <= TOL * both.abs().max()


def test_gradients_stay_inside_documents():
    """The loss of the second document has no gradient with respect to the first one's embeddings."""
    model = tiny_model()
    tokens = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(3))
    logits = model(tokens, documents=ids_of([6, 10]).unsqueeze(0))
    logits[:, 6:].sum().backward()
    grad = model.embed_tokens.weight.grad
    first_only = set(tokens[0, :6].tolist()) - set(tokens[0, 6:].tolist())
    assert grad[sorted(first_only)].abs().max() == 0


def test_documents_refuse_a_kv_cache():
    from meshweave.models.llama import KVCache

    model = tiny_model()
    with pytest.raises(ValueError, match="documents"):
        model(torch.zeros(1, 4, dtype=torch.long), cache=KVCache(), documents=torch.zeros(1, 4, dtype=torch.long))
