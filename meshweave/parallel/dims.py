"""ParallelDims: the run's parallel degrees, their validation, and the one DeviceMesh built from them.

Dims, slowest to fastest: ``pp, dp_replicate, dp_shard, cp, tp`` (TP innermost so it stays inside a
node). Every dim is present in the mesh, also at size 1, so code can always ask for ``mesh["tp"]``.
The flattened ``dp`` (``dp_replicate x dp_shard``) is what the loader and loss normalisation use.

Expert parallelism borrows its ranks from ``dp_shard x cp`` (the FSDP dim): with ``ep > 1`` that
dim is unflattened into ``("ep", "edp")``, ``ep`` outer. An ``ep`` group holds the E experts
between its members (E/ep each); an ``edp`` group (expert data parallel) is the dp_shard*cp/ep
ranks holding the same experts, which FSDP-shard them further. Because ``ep`` is the outer
factor, rank ``i`` of the FSDP dim holds slice ``i`` of every stacked expert tensor, exactly
the slice plain FSDP would give it: expert weights stay dim-0 shards of the FSDP mesh
(parallel/expert.py relies on this; validation requires dp_shard*cp to divide num_experts).

:func:`resolve_degrees` checks the degrees against the world size and the model before any process
group exists (meshweave.validation calls it); it imports no torch so a bad layout fails in
milliseconds with a message that names the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshweave.config import Config, ModelConfig, divisors, require
from meshweave.parallel.stages import check_pipeline

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from meshweave.comm.ops import CommGroup

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    ep: int = 1  # borrowed from dp_shard x cp: not a factor of the world size

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def loss_dim(self) -> str:
        """The flattened dim over which token counts, losses and gradients are summed."""
        return "dp_cp" if self.cp > 1 else "dp"

    @property
    def shard_dim(self) -> str:
        """The dim FSDP shards parameters over (dp_shard, joined by cp when cp > 1)."""
        return "dp_shard_cp" if self.cp > 1 else "dp_shard"

    @property
    def expert_dp(self) -> int:
        """Ranks of the FSDP dim holding the same experts (``dp_shard * cp / ep``)."""
        return self.dp_shard * self.cp // self.ep

    def build_mesh(self, device_type: str) -> ParallelMesh:
        """The job's DeviceMesh with every named dim plus the flattened ``dp`` (and ``dp_cp``,
        ``dp_shard_cp`` with cp > 1; ``ep``, ``edp`` with ep > 1). Collective."""
        from torch.distributed.device_mesh import init_device_mesh

        from meshweave.comm.ops import register_group

        root = init_device_mesh(device_type, tuple(getattr(self, d) for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)
        flattened = {"dp": root["dp_replicate", "dp_shard"]._flatten("dp")}
        if self.cp > 1:
            # CP ranks see different tokens of the same sequences: for gradients and the loss
            # they are data-parallel ranks too, and FSDP shards over dp_shard x cp.
            flattened["dp_cp"] = root["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
            flattened["dp_shard_cp"] = root["dp_shard", "cp"]._flatten("dp_shard_cp")
        if self.tp > 1 and self.dp_shard * self.cp > 1:
            # FSDP over a tensor-parallel parameter makes a 2-D (shard, tp) mesh; a reduction over
            # both (the grad norm) finds this flattened dim and runs as one all-reduce, not two.
            shard_dims = ("dp_shard", "cp") if self.cp > 1 else ("dp_shard",)
            name = "_".join((*shard_dims, "tp"))
            flattened[name] = root[(*shard_dims, "tp")]._flatten(name)
        if self.ep > 1:
            shard = flattened["dp_shard_cp"] if self.cp > 1 else root["dp_shard"]
            experts = shard._unflatten(0, (self.ep, self.expert_dp), ("ep", "edp"))
            # first, so that FSDP's traffic keeps its dim's name when ep (or edp) spans it all
            flattened = {"ep": experts["ep"], "edp": experts["edp"], **flattened}
        mesh = ParallelMesh(root, flattened)
        # Flattened first: where torch reuses one group for two names, the named dim wins.
        for name in (*mesh.flattened, *MESH_DIMS):
            register_group(mesh[name].get_group(), name)
        return mesh


@dataclass(frozen=True)
class ParallelMesh:
    """The root mesh plus flattened dims, addressed by name: ``mesh["tp"]``, ``mesh["dp"]``."""

    root: DeviceMesh
    flattened: dict[str, DeviceMesh]

    def __getitem__(self, name: str | tuple[str, ...]) -> DeviceMesh:
        if isinstance(name, str) and name in self.flattened:
            return self.flattened[name]
        return self.root[name]  # torch resolves flattened names inside tuples too

    def group(self, name: str) -> CommGroup:
        """The comm-layer group of one named (or flattened) dim."""
        from meshweave.comm.ops import CommGroup

        return CommGroup(self[name].get_group(), name)


def _tp_choices(m: ModelConfig, seq_len: int) -> str:
    """Tensor-parallel degrees that divide every dimension TP shards."""
    sizes = (m.n_heads, m.n_kv_heads, m.ffn_dim, m.vocab_size, seq_len)
    return ", ".join(str(d) for d in range(1, min(sizes) + 1) if all(s % d == 0 for s in sizes))


def default_ulysses_degree(cp: int) -> int:
    """The hybrid's Ulysses degree when none is given: the largest power of two <= sqrt(cp)
    dividing it (square-ish, Ulysses inside, ring across)."""
    u = 1
    while cp % (2 * u) == 0 and (2 * u) ** 2 <= cp:
        u *= 2
    return u


def _check_context_parallel(cfg: Config) -> None:
    """The sequence and head counts split as the chosen CP method needs (layout.py, ulysses.py)."""
    p, m, seq = cfg.parallel, cfg.model, cfg.train.seq_len
    require(p.ulysses >= 0, "parallel.ulysses", f"must be >= 0 (0: automatic), got {p.ulysses}")
    require(
        not p.ulysses or p.cp_method == "hybrid",
        "parallel.ulysses",
        f"{p.ulysses} only applies to parallel.cp_method=hybrid (cp_method={p.cp_method} uses all "
        f"{p.cp} CP ranks one way); drop it or use hybrid",
    )
    if p.cp == 1:
        return
    ulysses = {"ulysses": p.cp, "ring": 1, "tokenring": 1}.get(p.cp_method) or p.ulysses or default_ulysses_degree(p.cp)
    require(
        p.cp % ulysses == 0,
        "parallel.ulysses",
        f"{ulysses} does not divide parallel.cp={p.cp} (choose one of {divisors(p.cp)})",
    )
    chunks = p.cp if p.cp_method == "ulysses" else 2 * p.cp
    how = "pieces" if p.cp_method == "ulysses" else "zigzag chunks (2 x cp, for causal load balance)"
    require(
        seq % chunks == 0,
        "train.seq_len",
        f"{seq} does not split for cp={p.cp} with cp_method={p.cp_method}: it is cut into {chunks} "
        f"{how}, so use a multiple of {chunks}",
    )
    require(
        (seq // p.cp) % p.tp == 0,
        "train.seq_len",
        f"each CP rank's {seq // p.cp} tokens are sharded again by tp={p.tp} (sequence parallelism): "
        f"use a multiple of {p.cp * p.tp}",
    )
    if ulysses > 1 and m.n_heads % p.tp == 0 and m.n_kv_heads % p.tp == 0:
        heads, kv = m.n_heads // p.tp, m.n_kv_heads // p.tp
        require(
            heads % ulysses == 0,
            "parallel.cp" if p.cp_method == "ulysses" else "parallel.ulysses",
            f"Ulysses degree {ulysses} does not divide the {heads} attention heads per tp rank "
            f"(choose a degree in {divisors(heads)}, or cp_method=ring)",
        )
        require(
            kv % ulysses == 0 or ulysses % kv == 0,
            "parallel.cp" if p.cp_method == "ulysses" else "parallel.ulysses",
            f"Ulysses degree {ulysses} neither divides nor is a multiple of the {kv} KV heads per tp rank",
        )


def resolve_degrees(cfg: Config, world_size: int) -> ParallelDims:
    """Validate ``cfg.parallel`` for ``world_size`` processes, fill ``dp_shard=-1``, return the dims.

    Raises ConfigError naming the key and the fix. Pure: no torch, no process group.
    """
    p, t, m = cfg.parallel, cfg.train, cfg.model
    for key in ("dp_replicate", "tp", "cp", "pp", "ep"):
        require(getattr(p, key) >= 1, f"parallel.{key}", f"must be >= 1, got {getattr(p, key)}")
    require(p.dp_shard == -1 or p.dp_shard >= 1, "parallel.dp_shard", "must be >= 1 or -1 (fill)")
    _check_context_parallel(cfg)

    for key in ("n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
        size = getattr(m, key)
        require(
            size % p.tp == 0,
            "parallel.tp",
            f"tp={p.tp} does not divide model.{key}={size} (choose tp in {_tp_choices(m, t.seq_len)})",
        )
    require(
        t.seq_len % p.tp == 0,
        "parallel.tp",
        f"tp={p.tp} does not divide train.seq_len={t.seq_len}: sequence parallelism shards the "
        f"sequence (use a seq_len that is a multiple of {p.tp})",
    )

    others = p.dp_replicate * p.tp * p.cp * p.pp
    if p.dp_shard == -1:
        require(
            world_size % others == 0,
            "parallel",
            f"dp_replicate*tp*cp*pp={others} does not divide the world size {world_size} "
            f"(choose degrees whose product divides {world_size})",
        )
        p.dp_shard = world_size // others
    total = others * p.dp_shard
    require(
        total == world_size,
        "parallel",
        f"dp_replicate*dp_shard*tp*cp*pp={total} but the world size is {world_size} "
        "(make the product equal the number of processes, or set parallel.dp_shard=-1)",
    )

    dp = p.dp_replicate * p.dp_shard
    require(
        t.global_batch % dp == 0,
        "train.global_batch",
        f"{t.global_batch} is not divisible by the data-parallel degree {dp} (use a multiple of {dp})",
    )
    if t.micro_batch:
        per_rank = t.global_batch // dp
        require(
            per_rank % t.micro_batch == 0,
            "train.micro_batch",
            f"{t.micro_batch} does not divide the per-rank batch {per_rank} (choose one of {divisors(per_rank)})",
        )
    require(
        p.pp_virtual_stages >= 0 and p.pp_microbatches >= 0,
        "parallel.pp_microbatches",
        "pp_microbatches and pp_virtual_stages must be >= 0 (0: automatic)",
    )
    check_pipeline(cfg, t.global_batch // dp)
    require(
        p.mixed_precision == "none" or p.dp_shard > 1,
        "parallel.mixed_precision",
        f"{p.mixed_precision} parameters need FSDP (parallel.dp_shard > 1); "
        "for autocast without FSDP use train.dtype=bf16",
    )
    _check_expert_parallel(cfg)
    return ParallelDims(p.pp, p.dp_replicate, p.dp_shard, p.cp, p.tp, p.ep)


def _check_expert_parallel(cfg: Config) -> None:
    """ep divides the experts and the FSDP dim, and the FSDP dim divides the experts."""
    p, experts = cfg.parallel, cfg.moe.num_experts
    if p.ep == 1:
        return
    require(
        experts > 0,
        "parallel.ep",
        f"{p.ep} asks for expert parallelism but the model has no MoE layers "
        "(set moe.num_experts > 0, or parallel.ep=1)",
    )
    require(
        experts % p.ep == 0,
        "parallel.ep",
        f"ep={p.ep} does not divide moe.num_experts={experts} (choose ep in {divisors(experts)})",
    )
    shard = p.dp_shard * p.cp
    require(
        shard % p.ep == 0,
        "parallel.ep",
        f"ep={p.ep} does not divide dp_shard*cp={shard}: expert parallelism borrows its ranks from "
        f"dp_shard x cp (choose ep in {divisors(shard)})",
    )
    require(
        p.dp_shard > 1,
        "parallel.ep",
        f"ep={p.ep} needs FSDP (parallel.dp_shard > 1): expert weights are kept as FSDP shards beside the dense ones",
    )
    require(
        p.pp == 1 or p.pp_schedule not in ("interleaved_zb", "zbv"),
        "parallel.pp_schedule",
        f"{p.pp_schedule} with ep={p.ep} is not verified: zero-bubble schedules split backward into "
        "input- and weight-gradient passes around the experts' all-to-alls (use gpipe, 1f1b or "
        "interleaved_1f1b, or ep=1)",
    )
    require(
        experts % shard == 0,
        "parallel.ep",
        f"ep={p.ep}: each rank stores 1/(dp_shard*cp) of every expert tensor (its ep block, "
        f"FSDP-sharded over the {shard // p.ep} ranks holding the same experts), so dp_shard*cp={shard} "
        f"must divide moe.num_experts={experts} (use fewer dp_shard x cp ranks, or more experts)",
    )
