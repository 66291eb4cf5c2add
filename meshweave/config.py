"""Run configuration: one dataclass per concept, with each option's help and choices; section checks.

Everything a run needs is one :class:`Config`. It is resolved (TOML file, then command-line
overrides: meshweave/options.py) and validated in the launching process before any process group
exists, so a bad value costs one line on stderr and exit code 2, never a traceback from eight ranks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration value. The message names the key and what is allowed."""


# --------------------------------------------------------------------------------------------
# sections


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its ``--help`` text, and for strings its allowed values, beside it."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class ModelConfig:
    """Llama-style decoder shape and the architecture features of the families built on it (Llama
    1-3.x, Mistral, Qwen2/2.5, Qwen3, OLMoE; the MoE ones with [moe]), one key per feature.
    Parameter names follow Hugging Face's."""

    dim: int = opt(128, "hidden size")
    n_layers: int = opt(4, "decoder layers")
    n_heads: int = opt(4, "attention heads")
    n_kv_heads: int = opt(2, "key/value heads (grouped-query attention; divides n_heads)")
    head_dim: int = opt(0, "width of one attention head; 0 = dim / n_heads (Qwen3 sets it independently)")
    ffn_dim: int = opt(384, "SwiGLU hidden width")
    vocab_size: int = opt(320, "embedding rows; must cover the tokenizer's vocabulary")
    norm_eps: float = opt(1e-5, "RMSNorm epsilon")
    qkv_bias: bool = opt(False, "biases on the q, k and v projections (Qwen2 / Qwen2.5)")
    qk_norm: str = opt(
        "none",
        "RMSNorm of q and k before the rotary embedding: per head (Qwen3) or over the full projection (OLMoE)",
        ("none", "head", "full"),
    )
    rope_theta: float = opt(10000.0, "rotary embedding base")
    rope_scaling: str = opt(
        "none", "rotary frequency scaling for long context (Llama 3.1+: llama3)", ("none", "linear", "llama3", "yarn")
    )
    rope_factor: float = opt(1.0, "rope_scaling: context extension factor")
    rope_low_freq_factor: float = opt(1.0, "rope_scaling=llama3: wavelengths above original_max_len/this are scaled")
    rope_high_freq_factor: float = opt(4.0, "rope_scaling=llama3: wavelengths below original_max_len/this are kept")
    rope_original_max_len: int = opt(0, "rope_scaling=llama3/yarn: pretraining context length; 0 = max_seq_len")
    rope_beta_fast: float = opt(32.0, "rope_scaling=yarn: rotations where extrapolation ends")
    rope_beta_slow: float = opt(1.0, "rope_scaling=yarn: rotations where interpolation begins")
    rope_attention_factor: float = opt(0.0, "rope_scaling=yarn: cos/sin scale; 0 = 0.1 ln(rope_factor) + 1")
    sliding_window: int = opt(0, "attention window of Mistral-style models; 0 = none; must be >= train.seq_len")
    max_seq_len: int = opt(2048, "longest sequence the model is built for")
    tie_embeddings: bool = opt(False, "share one matrix between the embedding and the head")
    init_std: float = opt(0.02, "std of the normal initialisation (residual outputs scaled by 1/sqrt(2 n_layers))")
    ladder_residual: bool = opt(
        False,
        "Ladder Residual: each attention / MLP reads the residual stream without the previous one's output, "
        "whose tensor-parallel reduction then runs under it (a different model: trains to its own loss)",
    )
    hf_family: str = opt(
        "llama",
        "Hugging Face architecture `ckpt export-hf` writes",
        ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"),
    )

    def attention_head_dim(self) -> int:
        """The width of one attention head (``head_dim``, or ``dim / n_heads`` when 0)."""
        return self.head_dim or self.dim // self.n_heads


@dataclass
class MoEConfig:
    """Mixture-of-experts feed-forward layers, used as they are by meshweave.models.moe.

    ``num_experts = 0`` keeps the model dense. Layer ``i`` is MoE iff ``i % every == every - 1``.
    """

    num_experts: int = opt(0, "routed experts per MoE layer; 0 = dense model (no MoE layers)")
    top_k: int = opt(2, "experts each token is routed to")
    every: int = opt(1, "every k-th layer is MoE (the last of each k); 1 = every layer")
    expert_ffn_dim: int = opt(128, "SwiGLU hidden width of one expert (and of each shared expert)")
    shared_experts: int = opt(0, "always-on experts per MoE layer (DeepSeekMoE), overlapping the dispatch")
    shared_expert_gate: bool = opt(False, "scale the shared experts' output by sigmoid(x w), w: dim -> 1 (Qwen2-MoE)")
    score: str = opt("softmax", "router scores (sigmoid: weights renormalised over the top-k)", ("softmax", "sigmoid"))
    renormalize: bool = opt(False, "softmax only: rescale the top-k weights to sum 1 (Mixtral)")
    capacity_factor: float = opt(0.0, "expert capacity ceil(k*T/E * cf), tokens over it dropped; 0 = dropless")
    min_capacity: int = opt(4, "capacity floor when capacity_factor > 0")
    aux_loss_coeff: float = opt(1e-2, "load-balancing loss coeff * E * sum_i f_i P_i")
    z_loss_coeff: float = opt(1e-3, "router z-loss coeff * mean logsumexp(logits)^2")
    bias_balancing: bool = opt(False, "aux-loss-free balancing: per-expert selection bias nudged each step")
    bias_update_rate: float = opt(1e-3, "bias step per optimizer step (sign of the load deviation)")
    low_dim: int = opt(0, "BigMac: routed experts run at this width, so the all-to-alls move it (0 = off)")
    dispatch_chunks: int = opt(
        1,
        "expert parallelism: split each dispatch and combine all-to-all into this many chunks, pipelined with "
        "the experts (chunk i+1 on the wire while chunk i computes; same numbers); 1 = one exchange each way, "
        "the default: on loopback C > 1 measured slower, across 1 Gbit/s or slower links 4 was fastest",
    )

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


@dataclass
class DataConfig:
    """Where tokens come from. ``embedded`` is Python's own pydoc topics, tokenized by ``tokenizer``."""

    source: str = opt(
        "embedded",
        "'embedded', a Megatron dataset prefix (PATH of PATH.bin + PATH.idx) or a directory holding exactly one, "
        "e.g. written by `meshweave data prepare`",
    )
    tokenizer: str = opt("bytes", "'bytes', a Hugging Face model directory or a tokenizer.json; must match source's")
    eval_fraction: float = opt(0.05, "share of documents held out for eval")
    blend: str = opt(
        "",
        "weighted mix of prepared sources instead of source, Megatron's syntax: '0.7 path/a 0.3 path/b' "
        "(weights normalised; each source split for eval on its own)",
    )
    document_mask: bool = opt(
        True,
        "packed sequences: a token attends only within its own document and RoPE positions restart at each "
        "document (false: attend across documents, as before)",
    )


@dataclass
class ParallelConfig:
    """Degrees of the device mesh, slowest to fastest: pp, dp_replicate, dp_shard, cp, tp.

    ``dp_shard = -1`` fills whatever the other degrees leave of the world size.
    """

    dp_replicate: int = opt(1, "replicated data-parallel degree (HSDP when dp_shard > 1)")
    dp_shard: int = opt(-1, "FSDP degree; -1 fills the rest of the world size")
    tp: int = opt(1, "tensor-parallel degree (with sequence parallelism)")
    cp: int = opt(1, "context-parallel degree: each sequence is split over this many ranks")
    pp: int = opt(1, "pipeline-parallel degree: the layers are split into this many stages (x virtual stages)")
    ep: int = opt(1, "expert-parallel degree: experts split over ep ranks carved from dp_shard x cp")
    cp_method: str = opt(
        "ring",
        "ulysses (all-to-all heads) | ring (K/V travel) | tokenring (Q travels) | hybrid",
        ("ulysses", "ring", "tokenring", "hybrid"),
    )
    ulysses: int = opt(0, "hybrid only: Ulysses degree inside each ring rank (0: largest power of 2 <= sqrt(cp))")
    cp_inner: str = opt("ring", "hybrid only: ring or tokenring across the Ulysses groups", ("ring", "tokenring"))
    pp_schedule: str = opt(
        "1f1b",
        "gpipe | 1f1b | interleaved_1f1b | interleaved_zb (zero bubble) | zbv (zero bubble, V)",
        ("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv"),
    )
    pp_microbatches: int = opt(0, "microbatches per step per pipeline (0: the number of stages)")
    pp_virtual_stages: int = opt(0, "stages per rank for interleaved schedules (0: 2 for them, 1 otherwise)")
    pp_layers: str = opt("", "explicit split, e.g. '0-3,4-7' (one range per stage); empty: balance by cost")
    mixed_precision: str = opt("none", "FSDP param dtype policy: bf16 params with fp32 reduction", ("none", "bf16"))
    activation_checkpointing: bool = opt(False, "recompute each decoder layer in backward")
    fsdp_forward_prefetch: int = opt(
        1,
        "FSDP: each layer's forward starts the all-gathers of the next N layers, asynchronously "
        "(0: none, FSDP2's implicit order: each layer gathers on entry)",
    )
    fsdp_backward_prefetch: int = opt(
        1,
        "FSDP: each layer's backward starts the all-gathers of the N layers before it, asynchronously "
        "(0: FSDP2's implicit prefetch of one layer, issued synchronously)",
    )
    fsdp_reshard_after_forward: str = opt(
        "auto",
        "FSDP: free gathered parameters after a layer's forward: true | false (keep them to backward) | "
        "N (keep them sharded over N ranks, N dividing dp_shard x cp) | auto (true but the last layer)",
    )


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: str = opt(
        "adamw", "optimizer (onebit_adam: 1-bit Adam across dp_replicate replicas)", ("adamw", "sgd", "onebit_adam")
    )
    lr: float = opt(3e-3, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "final LR as a fraction of optim.lr")
    weight_decay: float = opt(0.1, "decoupled weight decay (matrices only)")
    beta1: float = opt(0.9, "Adam beta1 (SGD momentum)")
    beta2: float = opt(0.95, "Adam beta2")
    eps: float = opt(1e-8, "Adam epsilon")
    warmup_steps: int = opt(10, "linear warm-up steps")
    schedule: str = opt("cosine", "decay after warm-up", ("cosine", "linear", "constant"))
    grad_clip: float = opt(1.0, "max global grad norm; 0 disables clipping")
    fused: str = opt("auto", "fused AdamW: auto uses it where the device supports it", ("auto", "true", "false"))
    freeze_step: int = opt(100, "onebit_adam: exact Adam steps before the variance freezes and momentum goes 1-bit")


@dataclass
class DiLoCoConfig:
    """Streaming DiLoCo across the dp_replicate replicas, used as it is by meshweave.lowcomm.diloco."""

    enabled: bool = opt(False, "Streaming DiLoCo: replicas (dp_replicate) sync every inner_steps, not every step")
    inner_steps: int = opt(100, "H: inner steps between two syncs of the same fragment")
    fragments: int = opt(1, "P: strided layer fragments, synced in turn H/P steps apart")
    delay: int = opt(0, "tau: steps the fragment's all-reduce runs in the background before it is merged")
    alpha: float = opt(0.0, "weight of the local weights when merging (0: take the global weights)")
    quantize: str = opt("none", "outer-gradient wire format (fp32 accumulation either way)", ("none", "fp4", "int4"))
    outer_lr: float = opt(0.7, "outer Nesterov SGD learning rate")
    outer_momentum: float = opt(0.9, "outer Nesterov SGD momentum")
    chunk_size: int = opt(1024, "elements per 4-bit quantisation scale")

    def validate(self, n_layers: int | None = None) -> None:
        """ConfigError naming the field and the fix; ``n_layers``: the model's total layers."""
        h, p = self.inner_steps, self.fragments
        require(h >= 1, "comm.diloco.inner_steps", f"diloco.inner_steps={h} must be >= 1 (e.g. 100)")
        require(p >= 1, "comm.diloco.fragments", f"diloco.fragments={p} must be >= 1 (1 is vanilla DiLoCo)")
        require(
            h % p == 0,
            "comm.diloco.inner_steps",
            f"diloco.inner_steps={h} is not divisible by diloco.fragments={p}: syncs are staggered every "
            f"inner_steps / fragments steps (choose fragments in {[d for d in range(1, h + 1) if h % d == 0][:8]})",
        )
        require(
            n_layers is None or p <= n_layers,
            "comm.diloco.fragments",
            f"diloco.fragments={p} exceeds the model's {n_layers} layers (choose fragments <= {n_layers})",
        )
        require(
            0 <= self.delay < h // p,
            "comm.diloco.delay",
            f"diloco.delay={self.delay} must satisfy 0 <= delay < inner_steps / fragments = {h // p} so one "
            "fragment is in flight at a time (lower delay or fragments)",
        )
        require(
            0.0 <= self.alpha <= 1.0,
            "comm.diloco.alpha",
            f"diloco.alpha={self.alpha} must be in [0, 1] (0: adopt the global weights)",
        )
        kinds = field_choices(DiLoCoConfig, "quantize") or ()
        require(
            self.quantize in kinds, "comm.diloco.quantize", f"diloco.quantize={self.quantize!r} must be one of {kinds}"
        )
        require(self.outer_lr > 0, "comm.diloco.outer_lr", f"diloco.outer_lr={self.outer_lr} must be > 0 (e.g. 0.7)")
        require(
            0.0 <= self.outer_momentum < 1.0,
            "comm.diloco.outer_momentum",
            f"diloco.outer_momentum={self.outer_momentum} must be in [0, 1) (e.g. 0.9)",
        )
        require(
            self.chunk_size >= 1,
            "comm.diloco.chunk_size",
            f"diloco.chunk_size={self.chunk_size} must be >= 1 (e.g. 1024)",
        )


@dataclass
class CO2Config:
    """CO2 across the dp_replicate replicas, used as it is by meshweave.lowcomm.co2."""

    enabled: bool = opt(
        False, "CO2: replicas (dp_replicate) update locally; each round's all-reduce runs during the next round"
    )
    inner_steps: int = opt(100, "H: inner steps per round (the outer all-reduce has a whole round to finish)")
    outer_lr: float = opt(1.0, "outer SGD learning rate on the one-round-stale averaged pseudo-gradient")
    outer_momentum: float = opt(0.3, "outer heavy-ball momentum (0.5 and more trained worse on the tiny model, H=8)")
    gap_penalty: float = opt(1.0, "staleness-gap penalty lambda >= 1: the stale pseudo-gradient enters momentum / it")
    clip: float = opt(0.0, "outer-update clipping: momentum clamped element-wise to [-clip, clip] (0: off)")

    def validate(self) -> None:
        """ConfigError naming the field and the fix."""
        require(self.inner_steps >= 1, "comm.co2.inner_steps", f"co2.inner_steps={self.inner_steps} must be >= 1")
        require(self.outer_lr > 0, "comm.co2.outer_lr", f"co2.outer_lr={self.outer_lr} must be > 0 (e.g. 1.0)")
        require(
            0.0 <= self.outer_momentum < 1.0,
            "comm.co2.outer_momentum",
            f"co2.outer_momentum={self.outer_momentum} must be in [0, 1) (e.g. 0.3)",
        )
        require(
            self.gap_penalty >= 1.0,
            "comm.co2.gap_penalty",
            f"co2.gap_penalty={self.gap_penalty} must be >= 1 (1: no penalty)",
        )
        require(self.clip >= 0.0, "comm.co2.clip", f"co2.clip={self.clip} must be >= 0 (0: no clipping)")


@dataclass
class CommConfig:
    """The comm layer and the replicas' exchange."""

    bucket_mb: float = opt(25.0, "gradient bucket size for the replicated all-reduce")
    overlap: bool = opt(True, "launch bucket all-reduces during backward")
    tp_overlap: bool = opt(
        False, "tensor parallelism: sequence all-gathers / reduce-scatters as ring steps under the matmuls (tp > 1)"
    )
    timeout_s: float = opt(600.0, "a collective that does not complete in this time fails the run, naming the op")
    diloco: DiLoCoConfig = field(default_factory=DiLoCoConfig)
    co2: CO2Config = field(default_factory=CO2Config)


@dataclass
class LoRAConfig:
    """LoRA adapters (models/lora.py): the base model frozen, only the adapters trained."""

    rank: int = opt(0, "adapter rank r; 0 = off (full finetune)")
    alpha: float = opt(16.0, "scaling numerator: updates are scaled by alpha / rank (as peft, not rsLoRA)")
    dropout: float = opt(0.0, "dropout on the adapters' input (the base path sees none)")
    targets: str = opt("q,k,v,o,gate,up,down", "comma-separated projections that take adapters: q,k,v,o,gate,up,down")
    base_dtype: str = opt(
        "fp32", "storage of the adapted projections' frozen weights (adapters stay fp32)", ("fp32", "bf16")
    )


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written, and what a run starts from."""

    interval: int = opt(0, "save every N steps (0: only at the end)")
    keep: int = opt(2, "complete checkpoints kept")
    resume: str = opt("auto", "auto (newest valid, if any) | none | PATH")
    save_final: bool = opt(True, "save a checkpoint after the last step")
    async_: bool = opt(False, "stage to host memory and write in the background while training continues")
    init_from: str = opt("", "start from these weights (Hugging Face dir or a meshweave step-N dir) when not resuming")


@dataclass
class LogConfig:
    """Console, metrics.jsonl and wandb."""

    interval: int = opt(1, "log every N steps (and the last)")
    progress: bool = opt(True, "progress bar on the console")
    peak_tflops: float = opt(0.0, "device peak for MFU; 0 looks the GPU up in a table")
    wandb: bool = opt(False, "also log to Weights & Biases")
    wandb_project: str = opt("meshweave", "wandb project")
    wandb_run_name: str = opt("", "wandb run name (default: the run directory's name)")
    tensor_memory: bool = opt(
        False,
        "record mem_tensor_peak_bytes: each rank's peak of live tensor bytes (every op tracked: slower steps)",
    )


@dataclass
class TrainConfig:
    """The run's length, batch, precision and device."""

    steps: int = opt(100, "optimizer steps")
    seed: int = opt(1234, "seed of the initial weights and the data order")
    global_batch: int = opt(32, "sequences per optimizer step across all data-parallel ranks")
    micro_batch: int = opt(0, "sequences per forward per rank; 0 = no accumulation")
    seq_len: int = opt(128, "tokens per sequence")
    dtype: str = opt("fp32", "bf16: autocast (loss and norms stay fp32)", ("fp32", "bf16"))
    eval_interval: int = opt(0, "eval every N steps (0: never)")
    eval_batches: int = opt(4, "global batches per eval")
    max_bad_steps: int = opt(5, "abort after this many non-finite steps in a row")
    stop_at_step: int = opt(
        0, "exit (checkpointed) after this step without changing the schedule; 0: run to train.steps"
    )
    device: str = opt("auto", "auto picks CUDA when present", ("auto", "cpu", "cuda"))
    compile: bool = opt(False, "torch.compile each decoder block (inductor, CPU or CUDA); the first steps pay for it")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    log: LogConfig = field(default_factory=LogConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str = "runs/default"


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config) if f.name != "out")


def field_choices(section_cls: type, name: str) -> tuple[str, ...] | None:
    """The allowed values of option ``name`` of a section dataclass (None: any value)."""
    return next(f.metadata.get("choices") for f in dataclasses.fields(section_cls) if f.name == name)


def option_name(field_name: str) -> str:
    """The command-line / TOML name of a field: ``async_`` is ``async`` (keywords can't be fields)."""
    return field_name[:-1] if field_name.endswith("_") else field_name


def leaves(obj: Any, prefix: str) -> list[tuple[str, Any, str]]:
    """``(dotted option name, owning dataclass, field name)`` of every option under ``obj``;
    nested dataclasses (e.g. ``comm.diloco``) are sub-sections."""
    found = []
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{option_name(f.name)}"
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            found += leaves(value, key)
        else:
            found.append((key, obj, f.name))
    return found


# --------------------------------------------------------------------------------------------
# validation


def require(ok: bool, key: str, msg: str) -> None:
    """Raise ConfigError ``"<key>: <msg>"`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def divisors(n: int) -> str:
    """``"1, 2, 4"``: the divisors of ``n``, for error messages."""
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def check_moe(moe: MoEConfig, dim: int) -> None:
    """ConfigError naming the ``[moe]`` key and a valid choice; ``dim``: the model's hidden size."""

    def check(ok: bool, name: str, msg: str) -> None:
        require(ok, f"moe.{name}", f"{name}={getattr(moe, name)!r} {msg}")

    check(moe.num_experts >= 1, "num_experts", "must be >= 1")
    check(1 <= moe.top_k <= moe.num_experts, "top_k", f"must be in 1..num_experts={moe.num_experts}")
    check(moe.every >= 1, "every", "must be >= 1 (1 = every layer is MoE)")
    check(moe.expert_ffn_dim >= 1, "expert_ffn_dim", "must be >= 1")
    check(moe.shared_experts >= 0, "shared_experts", "must be >= 0")
    check(not moe.shared_expert_gate or moe.shared_experts > 0, "shared_expert_gate", "needs moe.shared_experts >= 1")
    scores = field_choices(MoEConfig, "score")
    check(moe.score in (scores or ()), "score", f"must be one of {scores}")
    check(moe.capacity_factor >= 0, "capacity_factor", "must be >= 0 (0 = dropless)")
    check(moe.min_capacity >= 0, "min_capacity", "must be >= 0")
    for name in ("aux_loss_coeff", "z_loss_coeff", "bias_update_rate"):
        check(getattr(moe, name) >= 0, name, "must be >= 0")
    check(0 <= moe.low_dim < dim, "low_dim", f"must be in 0..{dim - 1} (0 = off; below model dim={dim})")
    check(moe.dispatch_chunks >= 1, "dispatch_chunks", "must be >= 1 (1 = unchunked dispatch)")
