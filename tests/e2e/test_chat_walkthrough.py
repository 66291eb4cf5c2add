"""The README's chat-finetuning walkthrough runs as written (with 4 steps instead of 30).

Its bash block is taken from README.md and run in a fresh directory: the tiny model and chat data
are built, imported, prepared with --format chat, trained with LoRA on 4 ranks (tp2 x dp_shard2),
exported for peft and loaded by peft to generate. The README cannot drift from what works.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist
ROOT = Path(__file__).resolve().parents[2]


def walkthrough() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("```bash", text.index("A walkthrough on a tiny model built locally")) + len("```bash")
    return text[start : text.index("```", start)]


def test_the_readme_chat_walkthrough_runs_from_import_to_a_peft_adapter(tmp_path):
    script = (
        walkthrough()
        .replace("--train.steps=30", "--train.steps=4")
        .replace("--train.eval_interval=10", "--train.eval_interval=2")
    )
    assert "--train.steps=4" in script
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parents[1])
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs/chat/data/text_document.loss_mask").is_file()
    assert (tmp_path / "runs/chat/adapter/adapter_model.safetensors").is_file()
    assert "<|im_start|>assistant" in done.stdout  # peft's generate printed the rendered prompt
