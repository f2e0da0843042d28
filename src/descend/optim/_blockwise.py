"""8-bit blockwise codes for optimizer state: one byte per element and one float32 scale per block.

A state tensor is read as a flat sequence cut into blocks of :data:`BLOCK` consecutive elements (the
last one may be shorter). A block keeps its absolute maximum ``s = max|x|`` as a float32 scale and each
element a byte ``q``; the element's value is ``s * code[q]`` for a table ``code`` of 256 values in
``[-1, 1]``. Per element that is 1 + 4/BLOCK bytes instead of 4. Small blocks bound the damage of one
outlier to its own block.

Two codes:

``linear``
    ``code[q] = (q - 128) / 127``: evenly spaced values. A value below ``s/127`` is stored as 0 or
    ``s/127``.

``dynamic``
    A floating-point byte relative to the block's maximum: ``q = sign | exponent | mantissa`` with
    ``exponent`` bits counting halvings from 1 and ``mantissa`` bits within each halving (subnormal
    at the bottom), rounded to the nearest code. For a signed code (Adam's first moment) 1 + 4 + 3
    bits span ``[2^-18, 1]``; for a non-negative code (Adam's second moment, a running mean of
    squares whose values span many decades) 5 + 3 bits span ``[2^-34, 1]``. The values a
    linear code rounds to 0 keep their magnitude here: ``docs/design/state-codes.md`` has the measurement.

Either code rounds stochastically (unbiased: an exponential moving average keeps following its input,
as with bfloat16 state, where rounding to nearest makes it stall once a step's change is below half
the gap between two codes) or to the nearest code.

The functions are pure tensor code: quantise a float32 tensor to ``(codes, scales)`` and back.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

#: Elements per block (one float32 scale each).
BLOCK = 256

CODES = ("linear", "dynamic")


@functools.cache
def dynamic_code(signed: bool) -> Tensor:
    """The 256 values (float32, ascending) of the dynamic code in ``[-1, 1]`` (``[0, 1]`` if not ``signed``),
    built once and shared: read it, never write to it.

    Exponent bits ``e`` (4 signed, 5 unsigned; ``E`` their largest value) and 3 mantissa bits ``m``:
    ``2^(e - E) * (1 + m/8)`` for ``e > 0`` and the subnormals ``2^(1 - E) * m/8`` (0 among them) for
    ``e = 0``, all divided by the largest, ``1 + 7/8``, so that the top code is exactly 1.
    """
    exponent_bits = 4 if signed else 5
    top = (1 << exponent_bits) - 1
    values = []
    for e in range(top + 1):
        for m in range(8):
            if e == 0:
                values.append(2.0 ** (1 - top) * m / 8)
            else:
                values.append(2.0 ** (e - top) * (1 + m / 8))
    magnitudes = torch.tensor(values, dtype=torch.float64)
    magnitudes = magnitudes / magnitudes.max()
    if not signed:
        return magnitudes.float()
    return torch.cat([-magnitudes.flip(0), magnitudes]).float()  # -0 and +0 both present: 256 entries


@functools.cache
def linear_code() -> Tensor:
    """The 256 values of the linear code: ``(q - 128) / 127``, clamped to ``[-1, 1]`` (q = 0 repeats -1); shared, as
    :func:`dynamic_code`."""
    return ((torch.arange(256, dtype=torch.float32) - 128) / 127).clamp(-1, 1)


def _blocks(x: Tensor) -> Tensor:
    """``x`` flattened and zero-padded to whole blocks, as ``[blocks, BLOCK]``."""
    flat = x.reshape(-1)
    pad = (-flat.numel()) % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK)


def block_scales(x: Tensor) -> Tensor:
    """Per block, ``max|x|`` (float32); 1 for an all-zero block, so that dividing by it is safe."""
    scales = _blocks(x.float()).abs().amax(dim=1)
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def quantize(x: Tensor, code: str, signed: bool = True, noise: Tensor | None = None,
             stochastic: bool = True) -> tuple[Tensor, Tensor]:
    """``x`` (float32) as ``(codes, scales)``: uint8 codes shaped like ``x`` and float32 block scales.

    Each value rounds to one of the two codes around it: stochastically (``stochastic``, up with the
    probability of its distance from the lower one, so that the stored value is unbiased) using
    ``noise``, 16 random bits per element (int32 in ``[0, 65536)`` shaped like ``x``:
    :func:`descend.optim.engines.store.element_noise`; drawn from torch's generator if omitted), or to
    the nearest.
    """
    if code not in CODES:
        raise ValueError(f"code must be one of {', '.join(CODES)}, got {code!r}")
    scales = block_scales(x)
    y = _blocks(x.float()) / scales[:, None]  # in [-1, 1]
    if not signed:
        y = y.clamp(min=0)
    table = (linear_code() if code == "linear" else dynamic_code(signed)).to(x.device)
    # the code at or below each value, and the one above it
    low = (torch.bucketize(y, table, right=True) - 1).clamp(0, table.numel() - 2)
    below, above = table[low], table[low + 1]
    gap = above - below
    position = torch.where(gap > 0, (y - below) / torch.where(gap > 0, gap, torch.ones_like(gap)), torch.zeros_like(y))
    if stochastic:
        if noise is None:
            noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device)
        up = _blocks(noise.float()) / 65536.0 < position
    else:
        up = position >= 0.5
    q = low + up.long()
    codes = q.to(torch.uint8).reshape(-1)[: x.numel()].view(x.shape)
    return codes, scales


def dequantize(codes: Tensor, scales: Tensor, code: str, signed: bool = True) -> Tensor:
    """The float32 values ``scales[block] * code[q]`` of ``(codes, scales)``, shaped like ``codes``."""
    table = (linear_code() if code == "linear" else dynamic_code(signed)).to(codes.device)
    values = _blocks(table[codes.long()])
    return (values * scales[:, None]).reshape(-1)[: codes.numel()].view(codes.shape)


def round_trip(x: Tensor, code: str, signed: bool = True, noise: Tensor | None = None,
               stochastic: bool = True) -> Tensor:
    """``dequantize(quantize(x))``: the float32 values ``x`` takes when stored in ``code``."""
    codes, scales = quantize(x, code, signed, noise, stochastic)
    return dequantize(codes, scales, code, signed)
