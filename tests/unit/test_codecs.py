"""Specification of the lossy codecs in ``meshweave.comm.codecs`` (single process, CPU).

Sign packing is exact; 1-bit compression decodes to ``+-RMS`` per chunk and keeps the exact
residual as error feedback; the 4-bit quantizers respect the error bounds their docstring states,
are deterministic, idempotent, and safe on zero, tiny and huge chunks.
"""

from __future__ import annotations

import math

import pytest
import torch

from meshweave.comm.codecs import (
    FP4_MAGNITUDES,
    INT4_LEVELS,
    dequantize_4bit,
    onebit_compress,
    onebit_decompress,
    pack_signs,
    quantize_4bit,
    unpack_signs,
)

# Lengths around byte, nibble and chunk boundaries (chunk sizes used below: 1, 5, 8, 64).
LENGTHS = [0, 1, 2, 7, 8, 9, 15, 16, 17, 63, 64, 65, 1000, 4099]
KINDS = ["fp4", "int4"]
# One rounding of an fp32 operation is at most half an ulp: 2^-24 relative.
U32 = 2.0**-24


def randn(n: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def per_chunk(x: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
    return list(torch.split(x, chunk_size))


def expected_signs(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0)


# --------------------------------------------------------------------------------------------
# sign packing


@pytest.mark.parametrize("n", LENGTHS)
def test_pack_unpack_round_trips_signs_exactly(n):
    x = randn(n, seed=n)
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 8)
    assert torch.equal(unpack_signs(packed, n), expected_signs(x))


def test_pack_sets_the_bit_for_non_negative_values_least_significant_first():
    x = torch.tensor([1.0, -1.0, 0.0, -0.0, -2.0, -3.0, -4.0, 5.0, -1.0, 2.0])
    # bits 0, 2, 3, 7 of byte 0; bit 1 of byte 1 (zero and negative zero count as non-negative)
    assert pack_signs(x).tolist() == [1 + 4 + 8 + 128, 2]


def test_pack_flattens_any_shape():
    x = randn(24).view(2, 3, 4)
    assert torch.equal(pack_signs(x), pack_signs(x.reshape(-1)))


# --------------------------------------------------------------------------------------------
# 1-bit compression with error feedback


@pytest.mark.parametrize("n,chunk_size", [(1, 8), (9, 8), (1000, 64), (4099, 64), (17, 5), (7, 1)])
def test_onebit_decodes_to_plus_minus_chunk_rms_with_the_sign_of_x_plus_error(n, chunk_size):
    x, error = randn(n, seed=1), randn(n, seed=2, scale=0.3)
    c = x + error
    packed, scales = onebit_compress(x, error, chunk_size)
    assert scales.shape == (math.ceil(n / chunk_size),) and scales.dtype == torch.float32
    decoded = onebit_decompress(packed, scales, n, chunk_size)
    for c_chunk, d_chunk, s in zip(per_chunk(c, chunk_size), per_chunk(decoded, chunk_size), scales):
        rms = c_chunk.double().square().mean().sqrt()
        # the scale is computed on absmax-normalised values: a few fp32 roundings of relative size
        # 2^-24 each over a sum of <= 64 terms stay below 1e-6 relative
        assert abs(s.item() - rms.item()) <= 1e-6 * rms.item()
        assert torch.equal(d_chunk, expected_signs(c_chunk) * s)


@pytest.mark.parametrize("n,chunk_size", [(1000, 64), (4099, 64), (17, 5)])
def test_error_feedback_keeps_the_exact_residual(n, chunk_size):
    """x + old_error == decoded + new_error up to one rounding: the codec forms c = x + old_error
    in fp32 (the test forms the same fp32 sum, bitwise), then stores fl(c - decoded); rounding to
    nearest makes |fl(c - d) - (c - d)| <= 2^-24 |c - d|, and the float64 check adds no error."""
    x, error = randn(n, seed=3), randn(n, seed=4, scale=0.5)
    c = x + error
    packed, scales = onebit_compress(x, error, chunk_size)
    decoded = onebit_decompress(packed, scales, n, chunk_size)
    gap = (decoded.double() + error.double() - c.double()).abs()
    assert torch.all(gap <= U32 * (c.double() - decoded.double()).abs())


def test_error_feedback_makes_the_running_average_converge():
    """After T calls on a fixed x, sum of decoded = T x + e_0 - e_T, so the average misses x by
    |e_T| / T; e_T stays bounded (it saturates near 4 |x| for Gaussian data), so at T = 400 the
    relative error is ~1%, against ~60% for a single call. 5% leaves room for the bound."""
    x, error = randn(4096, seed=5), torch.zeros(4096)
    total = torch.zeros(4096, dtype=torch.float64)
    for t in range(400):
        packed, scales = onebit_compress(x, error, 256)
        decoded = onebit_decompress(packed, scales, 4096, 256)
        if t == 0:
            one_shot = ((decoded - x).norm() / x.norm()).item()
        total += decoded.double()
    averaged = ((total / 400 - x.double()).norm() / x.double().norm()).item()
    assert one_shot > 0.3
    assert averaged < 0.05


def test_onebit_zero_chunk_has_scale_zero_and_decodes_to_zeros():
    x = torch.cat([torch.zeros(64), randn(64, seed=6)])
    error = torch.zeros(128)
    packed, scales = onebit_compress(x, error, 64)
    decoded = onebit_decompress(packed, scales, 128, 64)
    assert scales[0].item() == 0.0 and torch.all(decoded[:64] == 0)
    assert torch.all(torch.isfinite(decoded)) and torch.all(error[:64] == 0)


@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
def test_onebit_scale_survives_tiny_and_huge_chunks(magnitude):
    """Squares of 1e-30 underflow and of 1e30 overflow fp32; the scale must not."""
    x = randn(64, seed=7, scale=magnitude)
    packed, scales = onebit_compress(x, torch.zeros(64), 64)
    rms = x.double().square().mean().sqrt().item()
    assert math.isfinite(scales.item()) and abs(scales.item() - rms) <= 1e-6 * rms


def test_onebit_compression_of_a_constant_chunk_is_exact():
    """All-equal values: the RMS is the value itself, so the residual is exactly zero."""
    x = torch.full((40,), -0.375)
    error = torch.zeros(40)
    packed, scales = onebit_compress(x, error, 8)
    assert torch.equal(onebit_decompress(packed, scales, 40, 8), x)
    assert torch.all(error == 0)


def test_onebit_rejects_a_mis_sized_error_buffer():
    with pytest.raises(ValueError, match="error must be fp32"):
        onebit_compress(torch.zeros(10), torch.zeros(9), 4)


# --------------------------------------------------------------------------------------------
# 4-bit quantizers


def roundtrip(x: torch.Tensor, kind: str, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes, scales = quantize_4bit(x, kind, chunk_size)
    return codes, scales, dequantize_4bit(codes, scales, x.numel(), kind, chunk_size)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", LENGTHS)
def test_4bit_output_sizes(kind, n):
    codes, scales, y = roundtrip(randn(n, seed=n), kind, 64)
    assert codes.dtype == torch.uint8 and codes.numel() == math.ceil(n / 2)
    assert scales.dtype == torch.float32 and scales.numel() == math.ceil(n / 64)
    assert y.dtype == torch.float32 and y.numel() == n


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,chunk_size", [(1000, 64), (4099, 64), (17, 5)])
def test_4bit_scale_is_the_chunk_absmax(kind, n, chunk_size):
    x = randn(n, seed=8)
    _, scales, _ = roundtrip(x, kind, chunk_size)
    assert torch.equal(scales, torch.stack([c.abs().max() for c in per_chunk(x, chunk_size)]))


@pytest.mark.parametrize("n,chunk_size", [(1000, 64), (4099, 64), (17, 5), (9, 1)])
def test_int4_error_is_at_most_half_a_level(n, chunk_size):
    """|x - q(x)| <= scale / (2 * levels); x / scale and q / levels * scale each round once in
    fp32, so allow 4 half-ulps of the scale on top."""
    x = randn(n, seed=9)
    _, scales, y = roundtrip(x, "int4", chunk_size)
    for xc, yc, s in zip(per_chunk(x, chunk_size), per_chunk(y, chunk_size), scales):
        assert torch.all((xc - yc).abs() <= s / (2 * INT4_LEVELS) + 4 * U32 * s)


def test_int4_decodes_to_integer_multiples_of_scale_over_levels():
    x = randn(640, seed=10)
    codes, scales, y = roundtrip(x, "int4", 64)
    q = y.view(10, 64) / scales[:, None] * INT4_LEVELS
    # q is an integer in [-7, 7] up to the two fp32 roundings of decode and this division
    assert torch.all((q - q.round()).abs() < 1e-5) and torch.all(q.round().abs() <= INT4_LEVELS)


@pytest.mark.parametrize("n,chunk_size", [(1000, 64), (4099, 64), (17, 5), (9, 1)])
def test_fp4_error_is_within_a_third_relative_or_scale_over_128_absolute(n, chunk_size):
    """Nearest of {0, 2^-6 .. 2^0} x scale: the worst relative error is at the midpoint 1.5 * 2^k
    between powers of two (0.5 / 1.5 = 1/3), and below the smallest level it is 2^-7 absolute.
    x / scale rounds once in fp32 and may land on the far side of a midpoint, so allow 1e-6."""
    x = randn(n, seed=11) ** 3  # heavy-tailed: many values far below the chunk absmax
    _, scales, y = roundtrip(x, "fp4", chunk_size)
    for xc, yc, s in zip(per_chunk(x, chunk_size), per_chunk(y, chunk_size), scales):
        bound = torch.maximum(xc.abs() / 3, s / 128 * torch.ones_like(xc)) * (1 + 1e-6)
        assert torch.all((xc - yc).abs() <= bound)


def test_fp4_decodes_only_to_the_code_table_times_scale():
    x = randn(640, seed=12)
    codes, scales, y = roundtrip(x, "fp4", 64)
    levels = torch.tensor(FP4_MAGNITUDES)
    ratios = (y.view(10, 64) / scales[:, None]).abs()  # exact: levels are powers of two
    assert torch.all(torch.isin(ratios, levels))


def test_fp4_code_table_is_sign_plus_three_exponent_bits():
    # one chunk of 16 with absmax 1: the exact levels, each sign, and their codes
    x = torch.tensor(
        [
            0.0,
            1 / 64,
            1 / 32,
            1 / 16,
            1 / 8,
            1 / 4,
            1 / 2,
            1.0,
            -0.0,
            -1 / 64,
            -1 / 32,
            -1 / 16,
            -1 / 8,
            -1 / 4,
            -1 / 2,
            -1.0,
        ]
    )
    codes, scales, y = roundtrip(x, "fp4", 16)
    nibbles = torch.stack([codes & 0xF, codes >> 4], dim=1).view(-1).tolist()
    assert nibbles == [0, 1, 2, 3, 4, 5, 6, 7, 0, 9, 10, 11, 12, 13, 14, 15]  # -0.0 is code 0
    assert torch.equal(y, x) and scales.tolist() == [1.0]


def test_fp4_rounds_to_the_nearest_level_with_ties_down():
    x = torch.tensor([1.0, 0.75, 0.7501, 0.7499, 1 / 128, 1 / 127, 1 / 129])
    _, _, y = roundtrip(x, "fp4", 8)
    assert y.tolist() == [1.0, 0.5, 1.0, 0.5, 0.0, 1 / 64, 0.0]


@pytest.mark.parametrize("kind", KINDS)
def test_4bit_zero_chunk_decodes_to_zeros_without_nan(kind):
    x = torch.cat([torch.zeros(64), randn(64, seed=13)])
    codes, scales, y = roundtrip(x, kind, 64)
    assert scales[0].item() == 0.0 and torch.all(y[:64] == 0) and torch.all(torch.isfinite(y))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
def test_4bit_keeps_the_relative_error_on_tiny_and_huge_chunks(kind, magnitude):
    """Scaling a chunk by a power of ten leaves x / scale (almost) unchanged, so the error relative
    to the scale matches the unit-scale bound: int4 <= 1/14, fp4 <= 1/3 of the chunk absmax."""
    x = randn(64, seed=14, scale=magnitude)
    _, scales, y = roundtrip(x, kind, 64)
    bound = (1 / (2 * INT4_LEVELS) if kind == "int4" else 1 / 3) * (1 + 1e-5)
    assert torch.all(torch.isfinite(y)) and torch.all((x - y).abs() <= bound * scales[0])


@pytest.mark.parametrize("kind", KINDS)
def test_4bit_quantization_is_idempotent(kind):
    """The absmax element decodes to exactly the scale, so re-quantizing decoded values finds the
    same scale; every decoded value sits on a level, so it maps back to its own code."""
    x = randn(4099, seed=15)
    codes, scales, y = roundtrip(x, kind, 64)
    codes2, scales2, y2 = roundtrip(y, kind, 64)
    assert torch.equal(codes2, codes) and torch.equal(scales2, scales) and torch.equal(y2, y)


@pytest.mark.parametrize("kind", KINDS)
def test_4bit_is_deterministic(kind):
    x = randn(1000, seed=16)
    assert all(torch.equal(a, b) for a, b in zip(quantize_4bit(x, kind, 64), quantize_4bit(x.clone(), kind, 64)))


def test_4bit_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        quantize_4bit(torch.zeros(4), "nf4", 4)
