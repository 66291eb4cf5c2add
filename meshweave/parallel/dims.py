"""ParallelDims: the run's parallel degrees, their validation, and the one DeviceMesh built from them.

Dims, slowest to fastest: ``pp, dp_replicate, dp_shard, cp, tp`` (TP innermost so it stays inside a
node). Every dim is present in the mesh, also at size 1, so code can always ask for ``mesh["tp"]``.
The flattened ``dp`` (``dp_replicate x dp_shard``) is what the loader and loss normalisation use.

:func:`resolve_degrees` checks the degrees against the world size and the model before any process
group exists (config validation calls it); it imports no torch so a bad layout fails in
milliseconds with a message that names the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshweave.config import Config, ModelConfig, divisors, require

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from meshweave.comm.ops import CommGroup

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
NOT_YET = {"cp": "context", "pp": "pipeline", "ep": "expert"}


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str) -> "ParallelMesh":
        """The job's DeviceMesh with every named dim plus the flattened ``dp`` (collective)."""
        from torch.distributed.device_mesh import init_device_mesh

        from meshweave.comm.ops import register_group

        root = init_device_mesh(device_type, tuple(getattr(self, d) for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)
        mesh = ParallelMesh(root, {"dp": root["dp_replicate", "dp_shard"]._flatten("dp")})
        # Flattened first: where torch reuses one group for two names, the named dim wins.
        for name in (*mesh.flattened, *MESH_DIMS):
            register_group(mesh[name].get_group(), name)
        return mesh


@dataclass(frozen=True)
class ParallelMesh:
    """The root mesh plus flattened dims, addressed by name: ``mesh["tp"]``, ``mesh["dp"]``."""

    root: "DeviceMesh"
    flattened: dict[str, "DeviceMesh"]

    def __getitem__(self, name: str | tuple[str, ...]) -> "DeviceMesh":
        if isinstance(name, str) and name in self.flattened:
            return self.flattened[name]
        return self.root[name]

    def group(self, name: str) -> "CommGroup":
        """The comm-layer group of one named (or flattened) dim."""
        from meshweave.comm.ops import CommGroup

        return CommGroup(self[name].get_group(), name)


def _tp_choices(m: ModelConfig, seq_len: int) -> str:
    """Tensor-parallel degrees that divide every dimension TP shards."""
    sizes = (m.n_heads, m.n_kv_heads, m.ffn_dim, m.vocab_size, seq_len)
    return ", ".join(str(d) for d in range(1, min(sizes) + 1) if all(s % d == 0 for s in sizes))


def resolve_degrees(cfg: Config, world_size: int) -> ParallelDims:
    """Validate ``cfg.parallel`` for ``world_size`` processes, fill ``dp_shard=-1``, return the dims.

    Raises ConfigError naming the key and the fix. Pure: no torch, no process group.
    """
    p, t, m = cfg.parallel, cfg.train, cfg.model
    for key in ("dp_replicate", "tp", "cp", "pp", "ep"):
        require(getattr(p, key) >= 1, f"parallel.{key}", f"must be >= 1, got {getattr(p, key)}")
    require(p.dp_shard == -1 or p.dp_shard >= 1, "parallel.dp_shard", "must be >= 1 or -1 (fill)")
    for key, what in NOT_YET.items():
        require(getattr(p, key) == 1, f"parallel.{key}",
                f"{getattr(p, key)} asks for {what} parallelism, which this build does not have yet "
                f"(it has dp_replicate, dp_shard, tp); set parallel.{key}=1")

    for key in ("n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
        size = getattr(m, key)
        require(size % p.tp == 0, "parallel.tp",
                f"tp={p.tp} does not divide model.{key}={size} (choose tp in {_tp_choices(m, t.seq_len)})")
    require(t.seq_len % p.tp == 0, "parallel.tp",
            f"tp={p.tp} does not divide train.seq_len={t.seq_len}: sequence parallelism shards the "
            f"sequence (use a seq_len that is a multiple of {p.tp})")

    others = p.dp_replicate * p.tp * p.cp * p.pp
    if p.dp_shard == -1:
        require(world_size % others == 0, "parallel",
                f"dp_replicate*tp*cp*pp={others} does not divide the world size {world_size} "
                f"(choose degrees whose product divides {world_size})")
        p.dp_shard = world_size // others
    total = others * p.dp_shard
    require(total == world_size, "parallel",
            f"dp_replicate*dp_shard*tp*cp*pp={total} but the world size is {world_size} "
            "(make the product equal the number of processes, or set parallel.dp_shard=-1)")

    dp = p.dp_replicate * p.dp_shard
    require(t.global_batch % dp == 0, "train.global_batch",
            f"{t.global_batch} is not divisible by the data-parallel degree {dp} (use a multiple of {dp})")
    if t.micro_batch:
        per_rank = t.global_batch // dp
        require(per_rank % t.micro_batch == 0, "train.micro_batch",
                f"{t.micro_batch} does not divide the per-rank batch {per_rank} "
                f"(choose one of {divisors(per_rank)})")
    require(p.mixed_precision == "none" or p.dp_shard > 1, "parallel.mixed_precision",
            f"{p.mixed_precision} parameters need FSDP (parallel.dp_shard > 1); "
            "for autocast without FSDP use train.dtype=bf16")
    return ParallelDims(p.pp, p.dp_replicate, p.dp_shard, p.cp, p.tp)
