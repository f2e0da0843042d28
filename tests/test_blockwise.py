"""8-bit blockwise codes for optimizer state (descend.optim._blockwise): bounds, unbiasedness, range."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from descend.optim._blockwise import BLOCK, dequantize, dynamic_code, quantize, round_trip


def tensors(draw: st.DrawFn) -> torch.Tensor:
    n = draw(st.sampled_from([1, 5, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 7]))
    decades = draw(st.integers(0, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(n, generator=gen) * 10.0 ** (decades * torch.rand(n, generator=gen) - decades / 2)
    return x


@settings(max_examples=20, deadline=None)
@given(st.composite(tensors)(), st.sampled_from(["linear", "dynamic"]), st.booleans())
def test_a_value_is_stored_as_one_of_the_two_codes_around_it(x: torch.Tensor, code: str, stochastic: bool) -> None:
    codes, scales = quantize(x, code, noise=torch.randint(0, 1 << 16, x.shape, dtype=torch.int32),
                             stochastic=stochastic)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert scales.dtype == torch.float32 and scales.numel() == -(-x.numel() // BLOCK)
    stored = dequantize(codes, scales, code)
    table = (torch.arange(256, dtype=torch.float32) - 128).div(127).clamp(-1, 1) if code == "linear" \
        else dynamic_code(True)
    block = torch.arange(x.numel()) // BLOCK
    y = x / scales[block]
    # the codes just below and above each value
    low = table[(torch.bucketize(y, table, right=True) - 1).clamp(0, 254)] * scales[block]
    high = table[(torch.bucketize(y, table, right=True)).clamp(1, 255)] * scales[block]
    tolerance = 1e-6 * scales[block]
    assert bool(((stored >= low - tolerance) & (stored <= high + tolerance)).all())
    assert torch.equal(round_trip(torch.zeros(7), code), torch.zeros(7))


@pytest.mark.parametrize("code", ["linear", "dynamic"])
def test_stochastic_rounding_is_unbiased(code: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BLOCK, generator=gen)
    draws = torch.stack([round_trip(x, code) for _ in range(1000)])
    spacing = x.abs().max() / 127 if code == "linear" else x.abs() / 8 + 1e-6
    # the mean of 1000 draws is within 5 standard errors (at most half a spacing / sqrt(4000)) of x
    assert bool(((draws.mean(0) - x).abs() <= 5 * spacing / 2 / 1000**0.5 + 1e-7).all())


def test_the_dynamic_code_keeps_the_range_of_a_second_moment_that_the_linear_code_loses() -> None:
    # a running mean of squared gradients spans many decades within a block
    v = torch.logspace(-9, 0, BLOCK)
    linear = round_trip(v, "linear", signed=False, stochastic=False)
    dynamic = round_trip(v, "dynamic", signed=False, stochastic=False)
    assert (linear == 0).float().mean() > 0.7  # most of the block becomes 0
    assert bool((dynamic > 0).all())
    assert float(((dynamic - v).abs() / v).max()) <= 1 / 16 + 1e-6  # half a mantissa step of 3 bits


def test_an_unknown_code_is_refused() -> None:
    with pytest.raises(ValueError, match="code must be one of linear, dynamic"):
        quantize(torch.ones(3), "nf4")


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("stochastic", [True, False])
def test_the_dynamic_code_of_a_value_is_the_one_a_search_of_the_grid_finds(signed: bool, stochastic: bool) -> None:
    """quantize reads the code from the float's bits; an oracle searches the grid in float64 instead: the
    magnitude below z = |x|/s * TOP, the fraction of the way to the next (in units of 2^-20, the noise's
    resolution times 16), up if 16 * noise is below it (or it is at least a half). On every code value,
    its float32 neighbours, values over 40 octaves, +-0, subnormal floats and values outside the code."""
    from descend.optim._blockwise import TOP, dynamic_grid

    grid = dynamic_grid(signed).double()
    magnitudes = grid[grid >= 0].unique()  # ascending, +0 once
    gen = torch.Generator().manual_seed(0)
    octaves = torch.randint(0, 40, (100_000,), generator=gen).float()
    spread = (torch.rand(100_000, generator=gen) * 2 - 1) * torch.exp2(-octaves)
    codes = dynamic_grid(signed) / TOP
    raw = torch.cat([codes, torch.nextafter(codes, torch.tensor(2.0)), torch.nextafter(codes, torch.tensor(-2.0)),
                     spread, torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, -3e-39])]).clamp(-1, 1)
    # blocks that each start with 1.0: every scale is 1
    body = raw[: raw.numel() // (BLOCK - 1) * (BLOCK - 1)].view(-1, BLOCK - 1)
    x = torch.cat([torch.ones(body.shape[0], 1), body], dim=1).reshape(-1)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, generator=gen)
    q, scales = quantize(x, "dynamic", signed, noise, stochastic=stochastic)
    assert torch.equal(scales, torch.ones_like(scales))

    z = (x.abs() * TOP).double()  # what quantize rounds: |x|/1 * TOP in float32
    k = (torch.bucketize(z, magnitudes, right=True) - 1).clamp(max=magnitudes.numel() - 1)
    upper = magnitudes[(k + 1).clamp(max=magnitudes.numel() - 1)]
    fraction = torch.where(k == magnitudes.numel() - 1, 0.0, (z - magnitudes[k]) / (upper - magnitudes[k]))
    r = torch.round(fraction * 2**20)
    up = (noise.double() * 16 < r) if stochastic else (r >= 2**19)
    magnitude = k + up
    if signed:
        expected = torch.where(x.view(torch.int32) < 0, 127 - magnitude, 128 + magnitude)
    else:
        expected = torch.where(x.view(torch.int32) < 0, 0, magnitude)
    assert torch.equal(q.long(), expected)
