"""Lossy tensor codecs for compressed communication: 1-bit signs with error feedback, 4-bit floats
and integers. Plain torch, any device, no collectives — the comm layer moves what these produce.

Every codec works on the flattened tensor, cut into consecutive chunks of ``chunk_size`` elements
(the last chunk may be shorter), each chunk with one fp32 scale. Lengths need not be multiples of
8, 2 or ``chunk_size``: packed outputs are padded with zero bits that decoding drops.

1-bit signs (``pack_signs`` / ``onebit_compress``)
    Element ``i`` is bit ``i % 8`` (least significant first) of byte ``i // 8``; the bit is set
    for ``x >= 0`` (so ``-0.0`` and ``+0.0`` both read back as +1, NaN as -1). A compressed chunk
    decodes to ``scale * sign`` with ``scale = ||c_chunk||_2 / sqrt(len)`` (its RMS), so the
    decoded chunk has the same L2 norm as ``c``. The error of one compression is large (relative
    L2 error ``sqrt(2 - 2 ||c||_1 / (sqrt(len) ||c||_2))``, up to ~1 for zero-mean data); error
    feedback — ``error <- c - decoded`` carried into the next call — is what makes the *running
    sum* of decoded values track the running sum of inputs: after T calls the two differ by exactly
    the current error, which stays bounded, so the time-average error decays like 1/T.

4-bit (``quantize_4bit``), two codes per byte, element ``2j`` in the low nibble of byte ``j``;
code 0 decodes to 0 in both formats; the scale of a chunk is its absmax (fp32).
    ``"int4"``: code = two's-complement nibble of ``q = round(7 x / scale)`` in ``[-7, 7]`` (code 8,
    i.e. -8, is never produced); value ``q * scale / 7``. Bound: ``|x - q(x)| <= scale / 14``,
    i.e. ``scale / (2 * INT4_LEVELS)``, up to fp32 rounding.
    ``"fp4"`` (E3M0, sign + 3 exponent bits, no mantissa): bit 3 is the sign (1 = negative), bits
    0-2 are ``e``; magnitude ``FP4_MAGNITUDES[e]`` = 0 for e = 0, else ``2^(e - 7)``, i.e.
    ``0, 1/64, 1/32, 1/16, 1/8, 1/4, 1/2, 1`` times the scale. Rounds to the nearest level in
    linear terms (a tie goes to the smaller magnitude). Bound: for ``|x| >= scale/64`` the
    relative error is ``<= 1/3`` (worst at the midpoint 1.5 * 2^k between two powers of two);
    below that the absolute error is ``<= scale/128``. Hence ``|x - q(x)| <= max(|x|/3,
    scale/128)``.
    Both are deterministic (no stochastic rounding) and idempotent: re-quantizing decoded values
    gives the same codes, scales and values, because the absmax element decodes to exactly
    ``scale``.

Zero chunks get scale 0 and decode to zeros (never NaN). Scales are computed on absmax-normalised
values, so neither huge (|x| ~ 1e30, whose squares overflow fp32) nor tiny chunks (squares
underflow) lose their scale. Non-finite inputs are not supported: they propagate into the scale.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

INT4_LEVELS = 7
# E3M0 magnitudes, indexed by the 3 exponent bits: 0 then 2^-6 .. 2^0.
FP4_MAGNITUDES = (0.0,) + tuple(2.0 ** (e - 7) for e in range(1, 8))


def _bit_weights(device: torch.device) -> Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


def pack_signs(x: Tensor) -> Tensor:
    """Signs of flattened ``x`` as ``ceil(n / 8)`` uint8 bytes; bit set for ``x >= 0``."""
    flat = x.reshape(-1)
    n = flat.numel()
    bits = torch.zeros(8 * math.ceil(n / 8), dtype=torch.uint8, device=flat.device)
    bits[:n] = flat >= 0
    # The 8 weighted bits of a byte are distinct powers of two: their sum is their OR (<= 255).
    return (bits.view(-1, 8) * _bit_weights(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_signs(packed: Tensor, numel: int) -> Tensor:
    """The first ``numel`` signs in ``packed`` as fp32 +1 / -1 (inverse of :func:`pack_signs`)."""
    bits = (packed.reshape(-1, 1) & _bit_weights(packed.device)) != 0
    return bits.reshape(-1)[:numel].to(torch.float32) * 2 - 1


def _chunked(x: Tensor, chunk_size: int) -> Tensor:
    """``x [rows, L]`` zero-padded to ``[rows, ceil(L / chunk_size), chunk_size]``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    rows, length = x.shape
    k = math.ceil(length / chunk_size)
    return torch.nn.functional.pad(x, (0, k * chunk_size - length)).view(rows, k, chunk_size)


def _rms_scales(c: Tensor, chunk_size: int, valid: Tensor | None) -> Tensor:
    """RMS of each chunk of each row of ``c [rows, L]`` over its ``valid`` elements: ``[rows, k]``."""
    chunks = _chunked(c, chunk_size)
    mask = torch.ones_like(c, dtype=torch.bool) if valid is None else valid
    counts = _chunked(mask.to(c.dtype), chunk_size).sum(dim=-1)
    amax = chunks.abs().amax(dim=-1)
    # Normalising by absmax keeps the squares inside fp32 range for huge and tiny chunks alike.
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    mean_sq = (chunks / safe.unsqueeze(-1)).square().sum(dim=-1) / counts.clamp_min(1)
    return torch.where(amax > 0, safe * mean_sq.sqrt(), torch.zeros_like(amax))


def _expand(scales: Tensor, length: int, chunk_size: int) -> Tensor:
    """Per-chunk ``scales [rows, k]`` repeated to per-element ``[rows, length]``."""
    rows = scales.shape[0]
    return scales.unsqueeze(-1).expand(rows, scales.shape[1], chunk_size).reshape(rows, -1)[:, :length]


def compress_rows(x: Tensor, error: Tensor, chunk_size: int, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Row-wise :func:`onebit_compress` of ``x [rows, L]`` (``L % 8 == 0`` when rows > 1, so each
    row packs into whole bytes): chunks restart at every row. ``error`` (fp32, ``[rows, L]``) is
    added first and updated in place. Elements where ``valid`` is False are padding: they count
    for neither scale nor sign and decode to 0, so their error stays exactly 0.

    Returns ``(packed uint8 [rows * L / 8], scales fp32 [rows, k])``. Shared with onebit.py, whose
    per-destination chunks are the rows.
    """
    rows, length = x.shape
    if rows > 1 and length % 8:
        raise ValueError(f"rows of {length} elements do not pack into whole bytes")
    c = x.to(torch.float32) + error
    if valid is not None:
        c = torch.where(valid, c, torch.zeros_like(c))
    scales = _rms_scales(c, chunk_size, valid)
    packed = pack_signs(c)
    decoded = decompress_rows(packed, scales, rows, length, chunk_size, valid)
    error.copy_(c - decoded)
    return packed, scales


def decompress_rows(
    packed: Tensor, scales: Tensor, rows: int, length: int, chunk_size: int, valid: Tensor | None = None
) -> Tensor:
    """Inverse of :func:`compress_rows`: fp32 ``[rows, length]``, zero where not ``valid``."""
    signs = unpack_signs(packed, rows * length).view(rows, length)
    decoded = signs * _expand(scales.to(torch.float32), length, chunk_size)
    if valid is not None:
        decoded = torch.where(valid, decoded, torch.zeros_like(decoded))
    return decoded


def onebit_compress(x: Tensor, error: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Error-feedback 1-bit compression of flattened ``x``.

    ``c = x + error``; each chunk becomes ``RMS(c_chunk) * sign(c)``. Returns ``(packed signs
    uint8 [ceil(n / 8)], scales fp32 [ceil(n / chunk_size)])`` and sets ``error <- c - decoded``
    in place (``error``: fp32, n elements), so ``x + old_error == decoded + new_error`` up to
    one fp32 rounding of the subtraction.
    """
    n = x.numel()
    if error.numel() != n or error.dtype != torch.float32:
        raise ValueError(f"error must be fp32 with {n} elements, got {error.dtype} x {error.numel()}")
    packed, scales = compress_rows(x.reshape(1, n), error.view(1, n), chunk_size)
    return packed, scales.view(-1)


def onebit_decompress(packed: Tensor, scales: Tensor, numel: int, chunk_size: int) -> Tensor:
    """Decode :func:`onebit_compress` output: fp32 ``[numel]``, ``scale * sign`` per chunk."""
    return decompress_rows(packed, scales.reshape(1, -1), 1, numel, chunk_size).view(-1)


def _check_kind(kind: str) -> None:
    if kind not in ("fp4", "int4"):
        raise ValueError(f"kind must be 'fp4' or 'int4', got {kind!r}")


def quantize_4bit(x: Tensor, kind: str, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Round flattened ``x`` to 4-bit codes (``"fp4"`` E3M0 or ``"int4"``) with per-chunk absmax
    scales. Deterministic round-to-nearest. Returns ``(codes uint8 [ceil(n / 2)], scales fp32
    [ceil(n / chunk_size)])``; the format and error bounds are in the module docstring."""
    _check_kind(kind)
    flat = x.reshape(1, -1).to(torch.float32)
    n = flat.shape[1]
    chunks = _chunked(flat, chunk_size)
    scales = chunks.abs().amax(dim=-1)
    # Zero chunks divide by 1 instead of 0: their values are all 0 and encode as code 0.
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    r = (chunks / safe.unsqueeze(-1)).view(1, -1)[:, :n].view(-1)
    if kind == "int4":
        q = torch.round(r * INT4_LEVELS).clamp(-INT4_LEVELS, INT4_LEVELS).to(torch.int16)
        codes = (q & 0xF).to(torch.uint8)
    else:
        mags = torch.tensor(FP4_MAGNITUDES, dtype=torch.float32, device=flat.device)
        midpoints = (mags[1:] + mags[:-1]) / 2
        # bucketize(right=False): a value equal to a midpoint goes to the lower level.
        e = torch.bucketize(r.abs(), midpoints).to(torch.uint8)
        negative = (r < 0) & (e > 0)  # zero is always code 0, whatever the sign of x
        codes = e | (negative.to(torch.uint8) << 3)
    if n % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4), scales.view(-1)


def dequantize_4bit(codes: Tensor, scales: Tensor, numel: int, kind: str, chunk_size: int) -> Tensor:
    """Decode :func:`quantize_4bit` output to fp32 ``[numel]``."""
    _check_kind(kind)
    nibbles = torch.stack([codes & 0xF, codes >> 4], dim=1).view(-1)[:numel]
    if kind == "int4":
        q = nibbles.to(torch.int16)
        levels = torch.where(q >= 8, q - 16, q).to(torch.float32) / INT4_LEVELS
    else:
        mags = torch.tensor(FP4_MAGNITUDES, dtype=torch.float32, device=codes.device)
        levels = mags[(nibbles & 7).long()]
        levels = torch.where((nibbles & 8) != 0, -levels, levels)
    per_element = _expand(scales.reshape(1, -1).to(torch.float32), numel, chunk_size).view(-1)
    return levels * per_element
