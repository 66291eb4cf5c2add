"""Hugging Face Llama weights in and out: a tiny model built locally with transformers (no download).

Logits within 1e-5 (fp32): both sides compute the same ops on the same weights; what remains is
kernel-order rounding (observed ~1e-6 with init_std 0.1, which makes attention non-uniform so a
wrong RoPE layout or a swapped KV head would show at ~1e-1). Export -> import is bit-exact.
"""

import json
import subprocess

import pytest
import torch

from meshweave.checkpoint.hf import export_hf, import_hf, read_hf_config, read_model_weights
from meshweave.models.llama import build_model
from tests.parity import MESHWEAVE, losses, train_run

transformers = pytest.importorskip("transformers")


def _tiny_hf(path, tie=False):
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=260,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def _meshweave_from(ckpt):
    cfg, state = read_model_weights(ckpt)
    model = build_model(cfg, "cpu")
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_imported_llama_logits_equal_transformers(tmp_path, tie):
    hf = _tiny_hf(tmp_path / "hf", tie)
    ckpt = import_hf(tmp_path / "hf", tmp_path / "imported")
    tokens = torch.randint(0, 260, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = _meshweave_from(ckpt)(tokens)
    assert (got - expected).abs().max() <= 1e-5


def test_export_then_import_is_exact_and_loads_in_transformers(tmp_path):
    _tiny_hf(tmp_path / "hf")
    ckpt = import_hf(tmp_path / "hf", tmp_path / "imported")
    export_hf(ckpt, tmp_path / "exported")
    again = import_hf(tmp_path / "exported", tmp_path / "reimported")
    _, a = read_model_weights(ckpt)
    _, b = read_model_weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_hf_config(tmp_path / "exported") == read_hf_config(tmp_path / "hf")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "exported").eval()
    tokens = torch.randint(0, 260, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (reloaded(tokens).logits - _meshweave_from(ckpt)(tokens)).abs().max() <= 1e-5


def test_cli_import_export_and_finetune_from_hf_in_two_layouts(tmp_path):
    _tiny_hf(tmp_path / "hf")
    shape = [
        "--model.dim=64",
        "--model.n_layers=2",
        "--model.n_heads=4",
        "--model.n_kv_heads=2",
        "--model.ffn_dim=160",
        "--model.vocab_size=260",
        "--model.norm_eps=1e-05",
    ]
    out = subprocess.run(
        [*MESHWEAVE, "ckpt", "import-hf", str(tmp_path / "hf"), str(tmp_path / "imp")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "imp" / "config.toml").is_file()
    one = losses(train_run(tmp_path / "ft1", 1, *shape, f"--checkpoint.init_from={tmp_path / 'hf'}", steps=2))
    tp2 = losses(
        train_run(tmp_path / "ft2", 2, *shape, "--parallel.tp=2", f"--checkpoint.init_from={tmp_path / 'hf'}", steps=2)
    )
    scratch = losses(train_run(tmp_path / "scratch", 1, *shape, steps=2))
    assert abs(one[0] - tp2[0]) / one[0] <= 1e-5 and one[0] != scratch[0]
    exported = subprocess.run(
        [*MESHWEAVE, "ckpt", "export-hf", str(tmp_path / "imp" / "checkpoints" / "step-0"), str(tmp_path / "exp")],
        capture_output=True,
        text=True,
    )
    assert exported.returncode == 0, exported.stderr
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["num_key_value_heads"] == 2


def test_init_from_a_differently_shaped_model_is_a_one_line_error(tmp_path):
    _tiny_hf(tmp_path / "hf")
    proc = subprocess.run(
        [*MESHWEAVE, "train", f"--checkpoint.init_from={tmp_path / 'hf'}", f"--out={tmp_path / 'x'}"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "model.dim" in proc.stderr and "Traceback" not in proc.stderr


def test_export_of_a_checkpoint_saved_in_fsdp_shards_holds_its_full_weights(tmp_path):
    from meshweave.checkpoint.hf import load_hf_weights

    train_run(tmp_path / "run", 2, "--parallel.dp_shard=2", "--checkpoint.save_final=true", steps=2)
    ckpt = max((tmp_path / "run" / "checkpoints").glob("step-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    exported = export_hf(ckpt, tmp_path / "hf", max_shard_bytes=100_000)
    _, saved = read_model_weights(ckpt)
    again = load_hf_weights(exported)
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
