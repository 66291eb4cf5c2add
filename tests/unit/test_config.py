"""Specification of run configuration: TOML loading, command-line overrides, rendering, validation,
and the command line's contract for invalid configs (exit 2, one line, nothing started)."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from meshweave.config import SECTIONS, Config, ConfigError, leaves, option_name
from meshweave.options import load_toml, parse_overrides, to_toml
from meshweave.validation import resolve, validate

REPO = Path(__file__).resolve().parents[2]
MESHWEAVE = str(Path(sys.executable).with_name("meshweave"))
TINY = REPO / "configs" / "tiny.toml"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def reload(cfg: Config, tmp_path: Path) -> Config:
    return load_toml(write(tmp_path / "rendered.toml", to_toml(cfg)))


# --------------------------------------------------------------------------------------------
# TOML file -> Config


def test_toml_file_sets_values_and_leaves_the_rest_default(tmp_path):
    path = write(
        tmp_path / "run.toml",
        """
out = "runs/x"

[model]
dim = 64
tie_embeddings = true
norm_eps = 1e-6

[optim]
name = "sgd"
lr = 1          # an integer is accepted for a float option

[train]
steps = 7
""",
    )
    cfg = load_toml(path)
    assert cfg.out == "runs/x"
    assert cfg.model.dim == 64 and cfg.model.tie_embeddings is True and cfg.model.norm_eps == 1e-6
    assert cfg.optim.name == "sgd"
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 7
    default = Config()
    assert cfg.model.n_layers == default.model.n_layers
    assert cfg.data == default.data and cfg.parallel == default.parallel


def test_unknown_key_in_toml_is_rejected_with_allowed_keys(tmp_path):
    path = write(tmp_path / "run.toml", "[model]\ndimm = 64\n")
    with pytest.raises(ConfigError) as err:
        load_toml(path)
    message = str(err.value)
    assert "model.dimm" in message
    for f in dataclasses.fields(Config().model):
        assert option_name(f.name) in message


def test_unknown_section_in_toml_is_rejected_with_the_sections(tmp_path):
    path = write(tmp_path / "run.toml", "[modle]\ndim = 64\n")
    with pytest.raises(ConfigError) as err:
        load_toml(path)
    assert "modle.dim" in str(err.value)
    for section in SECTIONS:
        assert section in str(err.value)


@pytest.mark.parametrize(
    "text,key",
    [
        ('[model]\ndim = "abc"\n', "model.dim"),
        ("[model]\ndim = 64.0\n", "model.dim"),
        ("[model]\ndim = true\n", "model.dim"),
        ("[comm]\noverlap = 1\n", "comm.overlap"),
        ("[optim]\nlr = true\n", "optim.lr"),
        ("[data]\nsource = 3\n", "data.source"),
    ],
    ids=[
        "int-given-abc",
        "int-given-float",
        "int-given-bool",
        "bool-given-int",
        "float-given-bool",
        "string-given-int",
    ],
)
def test_toml_values_are_type_checked(tmp_path, text, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_toml(write(tmp_path / "run.toml", text))


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# --------------------------------------------------------------------------------------------
# overrides


def test_overrides_in_both_forms_beat_the_file(tmp_path):
    path = write(tmp_path / "run.toml", "[model]\ndim = 64\nn_layers = 3\n[train]\nsteps = 7\n")
    cfg = resolve(str(path), ["--model.dim=96", "--train.steps", "9", "--out", "elsewhere"], world_size=1)
    assert cfg.model.dim == 96  # --a.b=v
    assert cfg.train.steps == 9  # --a.b v
    assert cfg.out == "elsewhere"
    assert cfg.model.n_layers == 3  # the file still beats the default where not overridden


def test_later_override_of_the_same_key_wins():
    cfg = parse_overrides(["--train.steps=3", "--train.steps=5"], Config())
    assert cfg.train.steps == 5


@pytest.mark.parametrize(
    "text,value",
    [
        ("true", True),
        ("1", True),
        ("yes", True),
        ("On", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("OFF", False),
    ],
)
def test_bool_overrides_accept_common_spellings(text, value):
    assert parse_overrides([f"--comm.overlap={text}"], Config()).comm.overlap is value


def test_negative_number_is_a_value_not_an_option():
    cfg = parse_overrides(["--parallel.dp_shard", "-1", "--model.dim", "64"], Config())
    assert cfg.parallel.dp_shard == -1 and cfg.model.dim == 64


def test_override_without_a_value_is_rejected():
    with pytest.raises(ConfigError, match=re.escape("--train.steps needs a value")):
        parse_overrides(["--train.steps", "--model.dim=64"], Config())


def test_positional_argument_is_rejected():
    with pytest.raises(ConfigError, match="unexpected argument 'steps'"):
        parse_overrides(["steps"], Config())


# --------------------------------------------------------------------------------------------
# rendering


def non_default_config() -> Config:
    """Every type and awkward value the renderer has to get right."""
    cfg = Config()
    cfg.model.dim, cfg.model.norm_eps, cfg.model.rope_theta = 96, 1e-6, 5e5
    cfg.model.tie_embeddings = True
    cfg.optim.eps, cfg.optim.lr, cfg.optim.name = 1e-12, 0.1 + 0.2, "sgd"  # 0.30000000000000004
    cfg.comm.overlap = False
    cfg.log.peak_tflops = 1e16
    cfg.log.wandb_run_name = 'quote " and back\\slash'
    cfg.data.source = "C:\\data\\prepared"
    cfg.parallel.dp_shard = 4
    cfg.out = "runs/non default"
    return cfg


def test_to_toml_round_trips_to_an_equal_config(tmp_path):
    cfg = non_default_config()
    assert reload(cfg, tmp_path) == cfg


def test_to_toml_round_trips_the_default_config(tmp_path):
    assert reload(Config(), tmp_path) == Config()


def test_to_toml_round_trips_tiny_toml(tmp_path):
    cfg = load_toml(TINY)
    assert cfg.out == "runs/tiny" and cfg.model.ffn_dim == 352  # really read the file
    assert reload(cfg, tmp_path) == cfg
    validate(cfg, world_size=4)
    assert reload(cfg, tmp_path) == cfg


def test_to_toml_is_valid_toml_with_every_section():
    data = tomllib.loads(to_toml(non_default_config()))
    assert set(data) == {"out", *SECTIONS}


def test_to_toml_round_trips_strings_with_control_characters(tmp_path):
    cfg = Config()
    cfg.log.wandb_run_name = "line one\nline two\ttabbed"
    assert reload(cfg, tmp_path) == cfg


# --------------------------------------------------------------------------------------------
# validation in-process


@pytest.mark.parametrize("world_size,replicate,expected", [(1, 1, 1), (8, 1, 8), (8, 2, 4), (4, 4, 1)])
def test_validate_fills_dp_shard_from_the_world_size(world_size, replicate, expected):
    cfg = Config()
    cfg.parallel.dp_replicate = replicate
    cfg.train.global_batch = 64
    assert cfg.parallel.dp_shard == -1
    validate(cfg, world_size=world_size)
    assert cfg.parallel.dp_shard == expected


def test_validate_reads_the_world_size_from_the_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = Config()
    validate(cfg)
    assert cfg.parallel.dp_shard == 4


def test_validate_keeps_an_explicit_dp_shard():
    cfg = Config()
    cfg.parallel.dp_replicate, cfg.parallel.dp_shard = 2, 2
    validate(cfg, world_size=4)
    assert (cfg.parallel.dp_replicate, cfg.parallel.dp_shard) == (2, 2)


def test_validate_accepts_the_defaults_and_tiny_toml():
    validate(Config(), world_size=1)
    validate(load_toml(TINY), world_size=4)


def test_infinite_bucket_size_is_rejected():
    cfg = parse_overrides(["--comm.bucket_mb=inf"], Config())
    with pytest.raises(ConfigError, match=r"comm\.bucket_mb"):
        validate(cfg, world_size=1)


def test_micro_batch_must_divide_the_per_rank_batch():
    cfg = Config()
    cfg.train.global_batch, cfg.train.micro_batch = 16, 3
    with pytest.raises(ConfigError, match=r"train\.micro_batch: 3 does not divide the per-rank batch 4"):
        validate(cfg, world_size=4)


# --------------------------------------------------------------------------------------------
# the command line: invalid configs


def clean_env() -> dict[str, str]:
    """The test process's environment without any launcher variables that would change the world."""
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # timeout only so a hung launcher fails the test instead of the session; not a speed check
    return subprocess.run([MESHWEAVE, *args], cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=180)


TRAIN = ["train"]
RUN4 = ["run", "--nproc", "4"]

# (command, options, the key the one-line error must name). "{tmp}" is the test's tmp_path.
INVALID = [
    pytest.param(TRAIN, ["--modle.dim=64"], "modle.dim", id="unknown-section"),
    pytest.param(TRAIN, ["--model.dimm=64"], "model.dimm", id="unknown-key"),
    pytest.param(RUN4, ["--optim.lrr", "0.1"], "optim.lrr", id="unknown-key-via-run"),
    pytest.param(TRAIN, ["--model.dim=abc"], "model.dim", id="int-given-abc"),
    pytest.param(TRAIN, ["--comm.overlap", "maybe"], "comm.overlap", id="bool-given-maybe"),
    pytest.param(TRAIN, ["--optim.name=lion"], "optim.name", id="choice-not-allowed"),
    pytest.param(TRAIN, ["--train.steps=0"], "train.steps", id="zero-steps"),
    pytest.param(TRAIN, ["--train.steps=-5"], "train.steps", id="negative-steps"),
    pytest.param(TRAIN, ["--model.n_kv_heads=3"], "model.n_kv_heads", id="kv-heads-not-dividing-heads"),
    pytest.param(
        RUN4,
        ["--train.global_batch=6", "--parallel.dp_replicate=4"],
        "train.global_batch",
        id="global-batch-not-divisible-by-dp",
    ),
    pytest.param(
        RUN4, ["--parallel.dp_replicate=3", "--parallel.dp_shard=1"], "parallel", id="degrees-product-not-world-size"
    ),
    pytest.param(TRAIN, ["--train.seq_len=4096"], "train.seq_len", id="seq-len-over-max"),
    pytest.param(TRAIN, ["--data.source={tmp}"], "data.source", id="source-not-prepared"),
    pytest.param(TRAIN, ["--model.vocab_size=100"], "model.vocab_size", id="vocab-smaller-than-data"),
    pytest.param(TRAIN, ["--config", "{tmp}/missing.toml"], "--config", id="missing-config-file"),
    pytest.param(TRAIN, ["--config={tmp}/broken.toml"], "--config", id="config-not-toml"),
    pytest.param(RUN4, ["--parallel.tp=4"], "parallel.tp", id="tp-not-dividing-kv-heads"),
    pytest.param(
        RUN4,
        ["--parallel.tp=4", "--model.n_heads=2", "--model.n_kv_heads=1", "--model.dim=64"],
        "parallel.tp",
        id="tp-not-dividing-heads",
    ),
    pytest.param(RUN4, ["--parallel.tp=2", "--model.ffn_dim=351"], "parallel.tp", id="tp-not-dividing-ffn"),
    pytest.param(RUN4, ["--parallel.tp=2", "--model.vocab_size=321"], "parallel.tp", id="tp-not-dividing-vocab"),
    pytest.param(
        RUN4,
        ["--parallel.tp=2", "--train.seq_len=127"],
        "parallel.tp",
        id="seq-len-not-divisible-for-sequence-parallel",
    ),
    pytest.param(RUN4, ["--parallel.tp=3"], "parallel", id="tp-not-dividing-world"),
    pytest.param(RUN4, ["--parallel.tp=2", "--parallel.dp_shard=1"], "parallel", id="tp-times-dp-not-world-size"),
    pytest.param(
        RUN4, ["--parallel.cp=4", "--train.seq_len=36"], "train.seq_len", id="seq-len-not-splitting-into-zigzag-chunks"
    ),
    pytest.param(
        RUN4,
        [
            "--parallel.cp=4",
            "--parallel.cp_method=ulysses",
            "--model.n_heads=2",
            "--model.n_kv_heads=1",
            "--model.dim=64",
        ],
        "parallel.cp",
        id="ulysses-degree-over-heads",
    ),
    pytest.param(
        RUN4, ["--parallel.cp=2", "--parallel.ulysses=2"], "parallel.ulysses", id="ulysses-degree-without-hybrid"
    ),
    pytest.param(
        RUN4,
        ["--parallel.cp=4", "--parallel.cp_method=hybrid", "--parallel.ulysses=3"],
        "parallel.ulysses",
        id="hybrid-ulysses-not-dividing-cp",
    ),
    pytest.param(RUN4, ["--parallel.cp_method=spiral"], "parallel.cp_method", id="cp-method-unknown"),
    pytest.param(RUN4, ["--parallel.pp=4", "--model.n_layers=3"], "model.n_layers", id="layers-not-filling-stages"),
    pytest.param(
        RUN4,
        ["--parallel.pp=4", "--parallel.pp_microbatches=2"],
        "parallel.pp_microbatches",
        id="too-few-microbatches-for-1f1b",
    ),
    pytest.param(
        RUN4,
        [
            "--parallel.pp=2",
            "--parallel.pp_schedule=interleaved_1f1b",
            "--model.n_layers=4",
            "--parallel.pp_microbatches=3",
            "--train.global_batch=6",
            "--parallel.dp_shard=2",
        ],
        "parallel.pp_microbatches",
        id="interleaved-microbatches-not-multiple-of-pp",
    ),
    pytest.param(
        TRAIN,
        ["--comm.diloco.enabled=true", "--comm.diloco.inner_steps=10", "--comm.diloco.fragments=3"],
        "comm.diloco.inner_steps",
        id="diloco-steps-not-divisible-by-fragments",
    ),
    pytest.param(
        TRAIN,
        [
            "--comm.diloco.enabled=true",
            "--comm.diloco.inner_steps=8",
            "--comm.diloco.fragments=2",
            "--comm.diloco.delay=4",
        ],
        "comm.diloco.delay",
        id="diloco-delay-beyond-fragment-spacing",
    ),
    pytest.param(
        TRAIN,
        ["--comm.diloco.enabled=true", "--optim.name=onebit_adam"],
        "comm.diloco.enabled",
        id="diloco-with-onebit-adam",
    ),
    pytest.param(
        TRAIN,
        ["--comm.co2.enabled=true", "--comm.diloco.enabled=true"],
        "comm.co2.enabled",
        id="co2-with-diloco",
    ),
    pytest.param(
        TRAIN, ["--comm.co2.enabled=true", "--optim.name=onebit_adam"], "comm.co2.enabled", id="co2-with-onebit-adam"
    ),
    pytest.param(TRAIN, ["--comm.co2.enabled=true", "--comm.co2.inner_steps=0"], "comm.co2.inner_steps", id="co2-h-0"),
    pytest.param(
        TRAIN,
        ["--comm.co2.enabled=true", "--comm.co2.gap_penalty=0.5"],
        "comm.co2.gap_penalty",
        id="co2-penalty-below-1",
    ),
    pytest.param(TRAIN, ["--comm.co2.enabled=true", "--comm.co2.clip=-1"], "comm.co2.clip", id="co2-negative-clip"),
    pytest.param(
        TRAIN,
        ["--comm.co2.enabled=true", "--comm.co2.outer_momentum=1"],
        "comm.co2.outer_momentum",
        id="co2-momentum-1",
    ),
    pytest.param(
        TRAIN, ["--optim.name=onebit_adam", "--optim.freeze_step=0"], "optim.freeze_step", id="onebit-without-warmup"
    ),
    pytest.param(
        RUN4,
        [
            "--parallel.pp=2",
            "--parallel.pp_schedule=zbv",
            "--parallel.pp_microbatches=4",
            "--parallel.dp_replicate=2",
            "--parallel.dp_shard=1",
            "--train.eval_interval=5",
        ],
        "train.eval_interval",
        id="zbv-with-eval",
    ),
    pytest.param(
        RUN4,
        ["--parallel.pp=2", "--parallel.pp_schedule=interleaved_zb", "--parallel.dp_shard=2", "--model.n_layers=4"],
        "parallel.pp_schedule",
        id="zero-bubble-with-fsdp",
    ),
    pytest.param(
        RUN4,
        ["--parallel.pp=2", "--train.micro_batch=3"],
        "train.micro_batch",
        id="micro-batch-not-matching-pipeline-microbatches",
    ),
    pytest.param(
        RUN4,
        ["--parallel.pp=2", "--parallel.pp_schedule=wavefront"],
        "parallel.pp_schedule",
        id="pipeline-schedule-unknown",
    ),
    pytest.param(
        RUN4,
        ["--parallel.pp=2", "--parallel.pp_layers=0-1,1-3"],
        "parallel.pp_layers",
        id="explicit-layer-split-overlapping",
    ),
    pytest.param(RUN4, ["--parallel.ep=2"], "parallel.ep", id="expert-degree-without-moe"),
    pytest.param(
        RUN4, ["--moe.num_experts=6", "--parallel.ep=4"], "parallel.ep", id="expert-degree-not-dividing-experts"
    ),
    pytest.param(
        RUN4,
        ["--moe.num_experts=8", "--parallel.tp=2", "--parallel.ep=4"],
        "parallel.ep",
        id="expert-degree-not-dividing-dp-shard-times-cp",
    ),
    pytest.param(TRAIN, ["--moe.num_experts=8", "--moe.top_k=9"], "moe.top_k", id="moe-top-k-over-experts"),
    pytest.param(
        RUN4,
        ["--parallel.mixed_precision=bf16", "--parallel.dp_replicate=4"],
        "parallel.mixed_precision",
        id="bf16-params-without-fsdp",
    ),
]


@pytest.mark.procs
@pytest.mark.parametrize("command,options,key", INVALID)
def test_invalid_config_is_one_error_line_exit_2_and_starts_nothing(tmp_path, command, options, key):
    write(tmp_path / "broken.toml", "[model\ndim = 64\n")
    before = sorted(os.listdir(tmp_path))
    out = tmp_path / "run"
    result = cli([*command, *(o.replace("{tmp}", str(tmp_path)) for o in options), "--out", str(out)], cwd=tmp_path)

    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("meshweave: error: ") and lines[0] != "meshweave: error: "
    assert key in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""
    # No run directory and nothing else in the working directory: no run or process group started.
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.procs
def test_run_checks_the_layout_against_nproc(tmp_path):
    # 4 processes, dp_replicate=2: dp_shard fills to 2, so global_batch 6 (per-dp 6/4) is invalid
    result = cli(
        [*RUN4, "--parallel.dp_replicate=2", "--train.global_batch=6", "--out", str(tmp_path / "r")], cwd=tmp_path
    )
    assert result.returncode == 2
    assert "data-parallel degree 4" in result.stderr


# --------------------------------------------------------------------------------------------
# the command line: help


def help_options(text: str) -> dict[str, str]:
    """``{"--section[.sub].key": "default text"}`` for every ``--section.key=default`` line."""
    options = {}
    for line in text.splitlines():
        m = re.match(r"^\s+(--[a-z0-9_]+(?:\.[a-z0-9_]+)+)=(\S+)", line)
        if m:
            options[m.group(1)] = m.group(2)
    return options


@pytest.fixture(scope="module")
def train_help() -> subprocess.CompletedProcess:
    return subprocess.run([MESHWEAVE, "train", "--help"], env=clean_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.procs
def test_train_help_exits_zero(train_help):
    assert train_help.returncode == 0, train_help.stderr
    assert "Traceback" not in train_help.stderr


@pytest.mark.procs
def test_train_help_lists_every_option_with_its_default(train_help):
    listed = help_options(train_help.stdout)
    default = Config()
    expected = set()
    for section in SECTIONS:
        for key, owner, name in leaves(getattr(default, section), section):  # sub-sections too
            option = f"--{key}"
            expected.add(option)
            assert option in listed, f"{option} missing from `meshweave train --help`"
            shown = tomllib.loads(f"v = {listed[option]}")["v"]  # defaults are shown as TOML values
            assert shown == getattr(owner, name) and type(shown) is type(getattr(owner, name)), option
    assert set(listed) == expected  # and nothing that is not an option


def test_every_config_section_is_in_sections():
    assert set(SECTIONS) == {f.name for f in dataclasses.fields(Config)} - {"out"}


@pytest.mark.procs
def test_train_help_lists_out_and_config_with_default(train_help):
    assert re.search(r"^\s+--out DIR\s.*default: runs/default", train_help.stdout, re.M)
    assert Config().out == "runs/default"
    assert re.search(r"^\s+--config FILE\s", train_help.stdout, re.M)


@pytest.mark.procs
def test_train_help_lists_the_allowed_choices(train_help):
    assert "one of adamw|sgd" in train_help.stdout
    assert "one of none|bf16" in train_help.stdout


def test_keyword_named_option_is_spelled_without_underscore(tmp_path):
    cfg = parse_overrides(["--checkpoint.async=true"], Config())
    assert cfg.checkpoint.async_ is True
    assert "async = true" in to_toml(cfg) and load_toml(write(tmp_path / "c.toml", to_toml(cfg))) == cfg


# --------------------------------------------------------------------------------------------
# the config is a leaf, documented field by field


def test_every_option_has_help_text_beside_its_field():
    for section in SECTIONS:
        for key, owner, name in leaves(getattr(Config(), section), section):
            meta = next(f.metadata for f in dataclasses.fields(owner) if f.name == name)
            assert meta.get("help"), f"{key} has no help text"


@pytest.mark.procs
def test_validation_imports_no_torch():
    # A bad layout must fail in the launching process in milliseconds: the CLI reads the launch
    # environment, resolves, validates and preflights a run that names no checkpoint without torch.
    code = (
        "import sys, meshweave.cli; from meshweave.launch.env import rank_info; "
        "from meshweave.validation import preflight, resolve; rank_info(); preflight(resolve(None, [], 1)); "
        "assert 'torch' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_compiled_blocks_are_refused_with_the_tp_overlap_ring():
    cfg = Config()
    cfg.train.compile = True
    cfg.parallel.tp, cfg.comm.tp_overlap = 2, True
    with pytest.raises(ConfigError, match="train.compile") as err:
        validate(cfg, world_size=2)
    assert "\n" not in str(err.value)
