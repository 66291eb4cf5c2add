"""Generation in one process: the KV cache reproduces the full forward, greedy decoding follows
transformers' own ``generate`` token for token, sampling is reproducible."""

from __future__ import annotations

import pytest
import torch

from meshweave.checkpoint.hf import import_hf
from meshweave.models import from_pretrained
from meshweave.models.generate import generate, sample_next
from meshweave.models.llama import KVCache
from tests.hf_models import save_tiny

transformers = pytest.importorskip("transformers")
SHAPE = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=89,
    max_position_embeddings=128,
)
PROMPT = [5, 17, 42, 8, 33, 61, 2 + 1]


@pytest.fixture(scope="module", params=["llama3.1-rope", "qwen3", "mixtral"])
def pair(request, tmp_path_factory):
    """(transformers model, the same weights as a meshweave checkpoint)."""
    root = tmp_path_factory.mktemp(request.param)
    hf = save_tiny(request.param, root / "hf", **SHAPE)
    return hf, import_hf(root / "hf", root / "imported")


def test_decoding_with_the_cache_gives_the_full_forwards_logits(pair):
    _, ckpt = pair
    model = from_pretrained(ckpt)
    tokens = torch.tensor([PROMPT])
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache()
        steps = [model(tokens[:, :4], cache=cache)] + [model(tokens[:, i : i + 1], cache=cache) for i in range(4, 7)]
    # fp32, same weights: only the order of the attention sums differs between the two (~1e-6).
    assert torch.allclose(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_tokens_equal_transformers_generate(pair):
    hf, ckpt = pair
    expected = hf.generate(
        torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(PROMPT) :].tolist()
    assert generate(from_pretrained(ckpt), PROMPT, 20) == expected


def test_generation_stops_after_an_end_of_sequence_token(pair):
    _, ckpt = pair
    model = from_pretrained(ckpt)
    free = generate(model, PROMPT, 12)
    assert generate(model, PROMPT, 12, eos_ids=[free[3]]) == free[: free.index(free[3]) + 1]


def test_sampling_is_reproducible_from_its_seed_and_varies_with_it(pair):
    _, ckpt = pair
    model = from_pretrained(ckpt)
    runs = [generate(model, PROMPT, 16, temperature=1.5, seed=s) for s in (0, 0, 1)]
    assert runs[0] == runs[1] != runs[2]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    draws = {sample_next(logits, 1.0, 0.75, torch.Generator().manual_seed(s)) for s in range(200)}
    assert draws == {0, 1}
    assert {sample_next(logits, 1.0, 0.4, torch.Generator().manual_seed(s)) for s in range(50)} == {0}


def test_cli_generates_from_a_hf_directory_like_the_library(pair, capsys):
    from meshweave.cli import main

    hf, ckpt = pair
    hf_dir = ckpt.parents[2] / "hf"
    assert main(["generate", str(hf_dir), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "6"]) == 0
    ids = capsys.readouterr().err.strip().removeprefix("ids: ")
    assert [int(i) for i in ids.split(",")] == generate(from_pretrained(ckpt), PROMPT, 6)


def test_cli_generate_from_a_missing_model_is_a_one_line_error(tmp_path, capsys):
    from meshweave.cli import main

    assert main(["generate", str(tmp_path / "nothing"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err


def test_generating_past_a_sliding_window_is_refused(tmp_path):
    save_tiny("mistral", tmp_path / "hf", **SHAPE)  # a window of 4096 tokens
    with pytest.raises(ValueError, match="sliding window of 4096"):
        generate(from_pretrained(tmp_path / "hf"), PROMPT, 4096)
