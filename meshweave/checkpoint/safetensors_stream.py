"""A safetensors file written tensor by tensor, so exporting a model holds one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape,
byte offsets into the data section; ``__metadata__``: string pairs), then the raw little-endian
bytes. The header is written first from the declared layout, then each tensor's bytes in that
order; ``safetensors.torch.save_file`` would instead serialise the whole file in memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import torch

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class SafetensorsWriter:
    """``with SafetensorsWriter(path, layout) as w: w.write(name, tensor) ...`` in layout order.

    ``layout`` is ``[(name, dtype, shape), ...]``; every tensor must be written once, in that order,
    with that dtype and shape (checked), or the file is not completed and an error is raised.
    """

    def __init__(
        self, path: str | Path, layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
    ) -> None:
        self.path, self.layout, self.next = Path(path), list(layout), 0
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        for name, dtype, shape in self.layout:
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
        self.file = open(self.path, "wb")
        self.file.write(len(text).to_bytes(8, "little") + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``'s bytes; it must be the layout's next entry."""
        want = self.layout[self.next] if self.next < len(self.layout) else None
        got = (name, tensor.dtype, tuple(tensor.shape))
        if got != want:
            raise ValueError(f"{self.path.name}: expected {want}, got {got}")
        data = tensor.detach().to("cpu").contiguous()
        self.file.write(memoryview(data.view(torch.uint8).numpy()))  # type: ignore[arg-type]
        self.next += 1

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.file.close()
        if kind is None and self.next != len(self.layout):
            raise ValueError(f"{self.path.name}: {len(self.layout) - self.next} declared tensors were not written")
