"""ParallelDims: the run's parallel degrees and the one DeviceMesh built from them.

Dims, slowest to fastest: ``pp, dp_replicate, dp_shard, cp, tp`` (TP innermost so it stays inside a
node). Every dim is present in the mesh, also at size 1, so code can always ask for ``mesh["tp"]``.
The flattened ``dp`` (``dp_replicate x dp_shard``) is what the loader and loss normalisation use.
The degrees are validated by :func:`meshweave.config.validate_layout` before any group exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from meshweave.comm.ops import CommGroup, register_group
from meshweave.config import ParallelConfig

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int

    @classmethod
    def from_config(cls, p: ParallelConfig) -> "ParallelDims":
        if p.dp_shard < 1:
            raise ValueError("ParallelDims needs a resolved dp_shard; run config.validate_layout first")
        return cls(p.pp, p.dp_replicate, p.dp_shard, p.cp, p.tp)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str) -> "ParallelMesh":
        """The job's DeviceMesh with every named dim plus the flattened ``dp`` (collective)."""
        root = init_device_mesh(device_type, tuple(getattr(self, d) for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)
        mesh = ParallelMesh(root, {"dp": root["dp_replicate", "dp_shard"]._flatten("dp")})
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
        return self.root[name]

    def group(self, name: str) -> CommGroup:
        """The comm-layer group of one named (or flattened) dim."""
        return CommGroup(self[name].get_group(), name)
