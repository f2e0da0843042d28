"""8-bit blockwise codes for optimizer state: one byte per element and one float32 scale per block.

A state tensor is read as a flat sequence cut into blocks of :data:`BLOCK` consecutive elements (the
last one may be shorter). A block keeps its absolute maximum ``s = max|x|`` as a float32 scale and each
element a byte ``q``; the element's value is ``s * code[q]`` for a table ``code`` of 256 values in
``[-1, 1]`` (computed as ``(s / TOP) * grid[q]`` in the dynamic code, :func:`dequantize`). Per element
that is 1 + 4/BLOCK bytes instead of 4. Small blocks bound the damage of one outlier to its own block.

Two codes:

``linear``
    ``code[q] = (q - 128) / 127``: evenly spaced values. A value below ``s/127`` is stored as 0 or
    ``s/127``.

``dynamic``
    A floating-point byte relative to the block's maximum: ``q = sign | exponent | mantissa`` with
    ``exponent`` bits counting halvings from 1 and ``mantissa`` bits within each halving (subnormal
    at the bottom). For a signed code (Adam's first moment) 1 + 4 + 3
    bits span ``[2^-18, 1]``; for a non-negative code (Adam's second moment, a running mean of
    squares whose values span many decades) 5 + 3 bits span ``[2^-34, 1]``. The values a
    linear code rounds to 0 keep their magnitude here: ``docs/design/state-codes.md`` has the measurement.
    A value's code is read off its float bits (:class:`DynamicLayout`), with no table search.

Either code rounds stochastically (unbiased: an exponential moving average keeps following its input,
as with bfloat16 state, where rounding to nearest makes it stall once a step's change is below half
the gap between two codes) or to the nearest code.

The functions are pure tensor code: quantise a float32 tensor to ``(codes, scales)`` and back.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

#: Elements per block (one float32 scale each).
BLOCK = 256

CODES = ("linear", "dynamic")
#: The dynamic code's largest magnitude, ``1 + 7/8``: a value ``x`` of a block of scale ``s`` is ``z = |x| * (TOP/s)``
#: in grid units (:func:`dynamic_grid`).
TOP = 1.875
#: The smallest block scale, float32's smallest normal number 2^-126: ``TOP / s`` stays finite.
MIN_SCALE = 2.0**-126


@functools.cache
def dynamic_grid(signed: bool) -> Tensor:
    """The 256 values (float32, ascending, exact) of the dynamic code in *grid units*, ``[-TOP, TOP]``
    (``[0, TOP]`` if not ``signed``), built once and shared: read it, never write to it.

    Exponent bits ``e`` (4 signed, 5 unsigned; ``E`` their largest value) and 3 mantissa bits ``m``:
    ``2^(e - E) * (1 + m/8)`` for ``e > 0`` and the subnormals ``2^(1 - E) * m/8`` (0 among them) for
    ``e = 0``; the largest is ``TOP = 1 + 7/8``. Code ``q`` of a signed code is ``128 + k`` for the ``k``-th
    magnitude and ``127 - k`` for minus it; of an unsigned code, ``k``.
    """
    exponent_bits = 4 if signed else 5
    top = (1 << exponent_bits) - 1
    values = []
    for e in range(top + 1):
        for m in range(8):
            values.append(2.0 ** (1 - top) * m / 8 if e == 0 else 2.0 ** (e - top) * (1 + m / 8))
    magnitudes = torch.tensor(values, dtype=torch.float32)
    if not signed:
        return magnitudes
    return torch.cat([-magnitudes.flip(0), magnitudes])  # -0 and +0 both present: 256 entries


@functools.cache
def dynamic_code(signed: bool) -> Tensor:
    """The 256 values of the dynamic code in ``[-1, 1]`` (``[0, 1]`` if not ``signed``): :func:`dynamic_grid`
    divided by its largest, ``TOP``; shared, as :func:`dynamic_grid`."""
    return dynamic_grid(signed) / TOP


@functools.cache
def linear_code() -> Tensor:
    """The 256 values of the linear code: ``(q - 128) / 127``, clamped to ``[-1, 1]`` (q = 0 repeats -1); shared, as
    :func:`dynamic_code`."""
    return ((torch.arange(256, dtype=torch.float32) - 128) / 127).clamp(-1, 1)


def block_scales(x: Tensor) -> Tensor:
    """Per block, ``max|x|`` (float32), at least :data:`MIN_SCALE` (an all-zero block's, so that ``TOP / s`` is
    finite); NaN for a block holding a NaN (``amax`` propagates it), so the whole block reads back as NaN rather
    than as values clipped to a scale that ignores it.

    The whole blocks and the shorter last one are reduced apart rather than padded to whole blocks:
    inductor mis-compiles the padding when ``x`` was updated in place in the same graph (an optimizer step).
    """
    flat = x.reshape(-1).float().abs()
    whole = flat.numel() - flat.numel() % BLOCK
    scales = flat[:whole].view(-1, BLOCK).amax(dim=1)
    if whole < flat.numel():
        scales = torch.cat([scales, flat[whole:].amax().reshape(1)])
    return torch.where(scales < MIN_SCALE, torch.full_like(scales, MIN_SCALE), scales)


def per_element(scales: Tensor, n: int) -> Tensor:
    """The block scale of each of ``n`` elements: ``scales[i // BLOCK]``."""
    return scales[:, None].expand(-1, BLOCK).reshape(-1)[:n]


def code_table(code: str, signed: bool = True) -> Tensor:
    """The 256 values of ``code`` (:func:`linear_code` or :func:`dynamic_code`); shared: read it, never write to it."""
    if code not in CODES:
        raise ValueError(f"code must be one of {', '.join(CODES)}, got {code!r}")
    return linear_code() if code == "linear" else dynamic_code(signed)


def lookup(table: Tensor, index: Tensor) -> Tensor:
    """``table[index]`` for a 1-D ``table`` and an integer ``index`` of any shape (``index_select``: on the CPU
    about ten times faster than indexing with a tensor)."""
    return torch.index_select(table, 0, index.reshape(-1)).view(index.shape)


class DynamicLayout(NamedTuple):
    """Where a value falls in the dynamic code, read from float32 bits (:func:`dynamic_layout`).

    In *grid units* ``z = |x| * (TOP / s)`` the code's magnitudes are exact floats with 3 mantissa bits,
    ``2^(e - E) * (1 + m/8)``, and below ``2^(1 - E)`` the subnormals ``2^(1 - E) * m/8``. So a normal
    ``z``'s bits say which two magnitudes it lies between and how far up: ``(bits >> 20) - bias`` is the
    index of the one at or below it (its exponent and leading 3 mantissa bits) and ``bits & 0xFFFFF`` the
    way to the next in units of 2^-20 (the other 20 mantissa bits). A subnormal ``z`` is first moved to
    ``z * subnormal_scale + 8`` in ``[8, 16)`` (rounded to a multiple of 2^-20: the 16-bit noise never
    resolves finer), whose bits say the same with the bias :data:`SUBNORMAL_BIAS`.
    """

    last: int  # the largest magnitude index (127 signed, 255 unsigned)
    bias: int  # (bits(z) >> 20) - bias is a normal z's magnitude index
    normal_min_bits: int  # the float32 bits of 2^(1 - E): a z below them is subnormal in the code
    subnormal_scale: float  # 2^(E + 2): a subnormal z times it is its index plus its fraction


#: ``(bits(y + 8) >> 20) - SUBNORMAL_BIAS`` is ``floor(y)`` for ``y`` in ``[0, 8)`` (8 is 2^3: biased exponent 130).
SUBNORMAL_BIAS = 130 << 3


@functools.cache
def dynamic_layout(signed: bool) -> DynamicLayout:
    """The constants of :class:`DynamicLayout` for the signed (4 exponent bits) or unsigned (5) dynamic code."""
    exponent_bits = 4 if signed else 5
    top = (1 << exponent_bits) - 1
    return DynamicLayout(last=(8 << exponent_bits) - 1, bias=(127 - top) << 3,
                         normal_min_bits=(128 - top) << 23, subnormal_scale=2.0 ** (top + 2))


def _dynamic_codes(flat: Tensor, scales: Tensor, signed: bool, noise: Tensor | None, stochastic: bool) -> Tensor:
    """The dynamic code of each value of ``flat`` (float32) under its block's scale (int32 codes).

    ``z = |x| * (TOP / s)`` (two float32 roundings, ``TOP / s`` once per block) lies between the magnitudes of
    index ``k`` and ``k + 1``, ``r / 2^20`` of the way up (:class:`DynamicLayout`); the magnitude is ``k + 1`` if
    ``16 * noise < r`` (``stochastic``: with probability ``r / 2^20``) or ``r >= 2^19`` (nearest), else ``k``.
    ``z`` at or above the top (the block's largest value may round just above it; NaN: a block whose scale is
    NaN) takes the top. A negative value takes the code of minus its magnitude; in the unsigned code every
    negative value takes 0. A NaN counts as positive, whatever its sign bit (which engines need not agree on).
    """
    layout = dynamic_layout(signed)
    bits = flat.view(torch.int32)
    inverse = torch.div(torch.full_like(scales, TOP), scales)  # a true division (``TOP / scales`` is TOP * 1/s)
    z = flat.abs() * per_element(inverse, flat.numel())
    zbits = z.view(torch.int32) & 0x7FFFFFFF
    moved = (z * layout.subnormal_scale + 8.0).view(torch.int32)
    small = zbits < layout.normal_min_bits
    k = torch.where(small, (moved >> 20) - SUBNORMAL_BIAS, (zbits >> 20) - layout.bias)
    r = torch.where(small, moved, zbits) & 0xFFFFF
    if stochastic:
        if noise is None:
            noise = torch.randint(0, 1 << 16, flat.shape, dtype=torch.int32, device=flat.device)
        up = (noise.reshape(-1) << 4) < r
    else:
        up = r >= 1 << 19
    magnitude = k.clamp(max=layout.last) + (up & (k < layout.last))
    negative = (bits < 0) & ~flat.isnan()
    if signed:
        return torch.where(negative, 127 - magnitude, 128 + magnitude)
    return torch.where(negative, 0, magnitude)


def quantize(x: Tensor, code: str, signed: bool = True, noise: Tensor | None = None,
             stochastic: bool = True, table: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``x`` (float32) as ``(codes, scales)``: uint8 codes shaped like ``x`` and float32 block scales.

    Each value rounds to one of the two codes around it: stochastically (``stochastic``, away from the
    lower one with the probability of its distance from it, so that the stored value is unbiased) using
    ``noise``, 16 random bits per element (int32 in ``[0, 65536)`` shaped like ``x``:
    :func:`descend.optim.engines.store.element_noise`; drawn from torch's generator if omitted), or to
    the nearest. The dynamic code rounds magnitudes, from the float's bits (:func:`_dynamic_codes`); the
    linear code searches its table, ``table``: :func:`code_table` of ``code`` already on ``x``'s device
    (else copied there; the dynamic code needs none).
    """
    code_table(code, signed)  # refuses an unknown code
    scales = block_scales(x)
    flat = x.reshape(-1).float()
    if code == "dynamic":
        return _dynamic_codes(flat, scales, signed, noise, stochastic).to(torch.uint8).view(x.shape), scales
    if table is None:
        table = code_table(code, signed).to(x.device)
    y = flat / per_element(scales, flat.numel())  # in [-1, 1]
    if not signed:
        y = y.clamp(min=0)
    # the code at or below each value, and the one above it
    low = (torch.bucketize(y, table, right=True, out_int32=True) - 1).clamp(0, table.numel() - 2)
    below, above = lookup(table, low), lookup(table, low + 1)
    # a gap of 0 (the linear code's repeated -1) is never below a value: the index is that of the last of equal
    # values
    position = (y - below) / (above - below)
    if stochastic:
        if noise is None:
            noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device)
        up = noise.reshape(-1).float() / 65536.0 < position
    else:
        up = position >= 0.5
    q = low + up
    return q.to(torch.uint8).view(x.shape), scales


def dequantize(codes: Tensor, scales: Tensor, code: str, signed: bool = True, table: Tensor | None = None) -> Tensor:
    """The float32 values of ``(codes, scales)``, shaped like ``codes``, a fresh contiguous tensor:
    ``scales[block] * code[q]`` in the linear code; ``(scales[block] / TOP) * grid[q]`` in the dynamic code
    (:func:`dynamic_grid`: within an ulp of ``scales[block] * code[q]``, and the native loop computes
    ``grid[q]`` from ``q``'s bits, exactly, instead of looking it up). ``table``: ``code_table(code)``, or
    ``dynamic_grid`` for the dynamic code, already on ``codes``' device (else copied there)."""
    dynamic = code == "dynamic"
    if table is None:
        table = (dynamic_grid(signed) if dynamic else code_table(code, signed)).to(codes.device)
    flat = codes.reshape(-1)
    step = scales / TOP if dynamic else scales
    return (lookup(table, flat.int()) * per_element(step, flat.numel())).view(codes.shape)


def round_trip(x: Tensor, code: str, signed: bool = True, noise: Tensor | None = None,
               stochastic: bool = True) -> Tensor:
    """``dequantize(quantize(x))``: the float32 values ``x`` takes when stored in ``code``."""
    codes, scales = quantize(x, code, signed, noise, stochastic)
    return dequantize(codes, scales, code, signed)
