"""The run's train and eval sets from its data config: one source (the embedded corpus or a
prepared dataset) split and packed (meshweave.data.datasets), or a weighted blend of prepared
datasets (meshweave.data.blend). The one entry the trainer calls."""

from __future__ import annotations

from typing import Any

from meshweave.data.blend import build_blend
from meshweave.data.datasets import PackedSequences, TokenCorpus, corpus_from_source, split_documents


def build_datasets(data_cfg: Any, seq_len: int, seed: int) -> tuple[Any, Any, TokenCorpus]:
    """``(train, eval, corpus)`` for ``data_cfg.source`` (tokenized by ``data_cfg.tokenizer`` when
    embedded) split by ``data_cfg.eval_fraction``: two :class:`PackedSequences`, or for a
    ``data_cfg.blend`` two :class:`~meshweave.data.blend.BlendedSequences` of the sources' splits
    and the first source's corpus.

    ``seed`` does not enter the split: held-out documents are a property of the corpus, so runs
    with different seeds are evaluated on the same text. Train always has at least one sequence,
    and eval does whenever ``eval_fraction > 0``; otherwise this raises ValueError.
    """
    del seed
    if getattr(data_cfg, "blend", ""):
        train_blend, eval_blend = build_blend(data_cfg.blend, data_cfg.tokenizer, data_cfg.eval_fraction, seq_len)
        return train_blend, eval_blend, train_blend.sources[0].corpus
    corpus = corpus_from_source(data_cfg.source, data_cfg.tokenizer)
    train_ids, eval_ids = split_documents(corpus.num_documents, data_cfg.eval_fraction)
    train = PackedSequences(corpus, train_ids, seq_len)
    evals = PackedSequences(corpus, eval_ids, seq_len)
    need = seq_len + 1
    if len(train) == 0:
        raise ValueError(
            f"data.source={data_cfg.source!r}: the train split has {train.num_tokens} "
            f"tokens, fewer than train.seq_len+1={need}; use more data or a shorter seq_len"
        )
    if data_cfg.eval_fraction > 0 and len(evals) == 0:
        raise ValueError(
            f"data.eval_fraction={data_cfg.eval_fraction}: the {len(eval_ids)} held-out "
            f"documents hold {evals.num_tokens} tokens, fewer than train.seq_len+1={need}; "
            "raise data.eval_fraction or shorten train.seq_len"
        )
    return train, evals, corpus
