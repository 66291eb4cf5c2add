"""LoRA adapters leave meshweave in formats transformers and peft load, with the same logits.

A tiny Llama built locally by transformers (tests/hf_models.py) is imported with ``init_from``,
trained a few LoRA steps in one process, and exported two ways: ``ckpt export-peft`` (loaded by
``PeftModel.from_pretrained`` onto the original transformers model) and ``ckpt export-hf
--merge-lora`` (loaded by transformers alone). Both must give meshweave's finetuned logits within
1e-5 (fp32; the three compute the same products in different orders, which moves logits of
this size by ~1e-6).
"""

import json

import pytest
import torch

from meshweave.checkpoint.adapters import resolve_checkpoint
from meshweave.checkpoint.hf import read_checkpoint, read_model_config
from meshweave.cli import main
from meshweave.config import LoRAConfig
from meshweave.models.llama import build_model
from meshweave.models.lora import apply_lora, is_adapter
from tests.hf_models import model_overrides, save_tiny
from tests.parity import train_run

pytestmark = pytest.mark.dist
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SHAPE = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=260,
    max_position_embeddings=256,
)
LORA = ["--lora.rank=4", "--lora.alpha=8", "--lora.targets=q,v,o,down", "--optim.lr=1e-2"]
TOL = 1e-5
STEPS = 4


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """(HF dir, run dir, meshweave's finetuned model in eval mode)."""
    root = tmp_path_factory.mktemp("lora-peft")
    save_tiny("llama", root / "hf", **SHAPE)
    start = [*model_overrides(root / "hf"), f"--checkpoint.init_from={root / 'hf'}"]
    train_run(root / "run", 1, *start, *LORA, "--checkpoint.save_final=true", steps=STEPS)
    ckpt = resolve_checkpoint(root / "run")
    cfg, moe = read_model_config(ckpt)
    model = build_model(cfg, device="cpu", moe=moe)
    apply_lora(model.layers.values(), LoRAConfig(rank=4, alpha=8, targets="q,v,o,down"))
    state = {k.removeprefix("model."): v for k, v in read_checkpoint(ckpt, prefix="model.").items()}
    model.load_state_dict(state, strict=True)
    return root / "hf", root / "run", model.eval()


def test_run_reports_trainable_and_total_parameters(finetuned):
    _, run, model = finetuned
    adapters = sum(p.numel() for n, p in model.named_parameters() if is_adapter(n))
    total = sum(p.numel() for p in model.parameters())
    assert f"trainable parameters: {adapters:,} of {total:,}" in (run / "events.log").read_text()
    manifest = json.loads((resolve_checkpoint(run) / "manifest.json").read_text())
    assert manifest["parameters"] == {"trainable": adapters, "total": total}


def test_init_from_an_imported_checkpoint_equals_init_from_the_hf_dir(finetuned, tmp_path):
    # The base comes from the checkpoint (DCP, adapters excluded), the adapters from their init.
    hf_dir, run, _ = finetuned
    imported = main(["ckpt", "import-hf", str(hf_dir), str(tmp_path / "imported")])
    assert imported == 0
    start = [*model_overrides(hf_dir), f"--checkpoint.init_from={tmp_path / 'imported' / 'checkpoints' / 'step-0'}"]
    records = train_run(tmp_path / "run", 1, *start, *LORA, steps=STEPS)
    reference = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == reference


def _tokens() -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(0))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_the_adapters_trained(finetuned):
    _, _, model = finetuned
    b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert len(b) == 2 * 4 and all(p.abs().max() > 0 for p in b)  # 2 layers x q,v,o,down


def test_peft_loads_the_exported_adapter_with_equal_logits(finetuned, tmp_path):
    hf_dir, run, model = finetuned
    assert main(["ckpt", "export-peft", str(run), str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hf_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    tuned = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    loaded = {n for n, _ in tuned.named_parameters() if "lora_" in n}
    assert len(loaded) == sum(is_adapter(n) for n, _ in model.named_parameters())
    tokens = _tokens()
    with torch.no_grad():
        ours, theirs = model(tokens), tuned(tokens).logits
        untuned = tuned.get_base_model()
        with tuned.disable_adapter():
            plain = untuned(tokens).logits
    assert _relative(theirs, ours) <= TOL
    assert _relative(plain, ours) > 1e-3  # the adapters change the logits: equality is not vacuous


def test_merged_export_has_equal_logits(finetuned, tmp_path):
    _, run, model = finetuned
    ckpt = resolve_checkpoint(run)
    assert main(["ckpt", "export-hf", str(ckpt), str(tmp_path / "merged"), "--merge-lora"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).eval()
    tokens = _tokens()
    with torch.no_grad():
        assert _relative(merged(tokens).logits, model(tokens)) <= TOL


def test_export_peft_refuses_a_full_finetune(reference_run, tmp_path, capsys):
    run = reference_run.dir(1, "--checkpoint.save_final=true", steps=2)
    assert main(["ckpt", "export-peft", str(run), str(tmp_path / "adapter")]) == 2
    assert "not a LoRA checkpoint" in capsys.readouterr().err
