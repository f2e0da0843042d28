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


def block_scales(x: Tensor) -> Tensor:
    """Per block, ``max|x|`` (float32); 1 for an all-zero block, so that dividing by it is safe; NaN for a block
    holding a NaN (``amax`` propagates it), so the whole block reads back as NaN rather than as values clipped
    to a scale that ignores it.

    The whole blocks and the shorter last one are reduced apart rather than padded to whole blocks:
    inductor mis-compiles the padding when ``x`` was updated in place in the same graph (an optimizer step).
    """
    flat = x.reshape(-1).float().abs()
    whole = flat.numel() - flat.numel() % BLOCK
    scales = flat[:whole].view(-1, BLOCK).amax(dim=1)
    if whole < flat.numel():
        scales = torch.cat([scales, flat[whole:].amax().reshape(1)])
    return torch.where(scales == 0, torch.ones_like(scales), scales)


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


#: Leading bits of a float32 (sign, exponent, 3 of the mantissa) that :func:`index_below` reads.
PREFIX_BITS = 12


@functools.cache
def _prefix_guesses(code: str, signed: bool, device: torch.device) -> tuple[Tensor, int]:
    """Per leading-bits prefix of a float32 in ``[-1, 1]``, the index of the largest code value at or below the
    smallest float with that prefix; and how many code values at most lie between a prefix's smallest and
    largest float (the corrections :func:`index_below` needs)."""
    table = code_table(code, signed)
    shift = 32 - PREFIX_BITS
    prefixes = torch.arange(1 << PREFIX_BITS, dtype=torch.int64)
    ends = [(prefixes << shift) | fill for fill in (0, (1 << shift) - 1)]
    a, b = (torch.where(e >= 1 << 31, e - (1 << 32), e).to(torch.int32).view(torch.float32) for e in ends)
    low, high = torch.minimum(a, b), torch.maximum(a, b)  # NaN where either is
    first = torch.bucketize(low, table, right=True) - 1
    inside = (low.abs() <= 1) & (high.abs() <= 1)
    spread = int((torch.bucketize(high, table, right=True) - 1 - first)[inside].max())
    return first.to(device, torch.int32), spread


def prefix_search(code: str, signed: bool) -> tuple[Tensor, int]:
    """What :func:`index_below` starts from (int32 ``[2**PREFIX_BITS]`` on the CPU, one index per leading-bits
    prefix of a float32) and how many corrections it makes: the native loop's quantiser takes both as constants."""
    return _prefix_guesses(code, signed, torch.device("cpu"))


def index_below(y: Tensor, table: Tensor, code: str, signed: bool) -> Tensor:
    """Per element of ``y`` (float32 in ``[-1, 1]``, or NaN), the index of the largest value of ``table`` (the
    code's) at or below it: ``torch.bucketize(y, table, right=True) - 1``, exactly.

    A binary search per element is most of the quantiser's time on the CPU; instead the float's leading bits
    give the index at the bottom of their range, and one comparison per code value that range can hold
    moves it up (two at most for the dynamic codes).
    """
    guesses, spread = _prefix_guesses(code, signed, y.device)
    if spread > 2:  # a finer code (linear): the search is cheaper than the corrections
        return torch.bucketize(y, table, right=True, out_int32=True) - 1
    prefix = (y.view(torch.int32) >> (32 - PREFIX_BITS)) & ((1 << PREFIX_BITS) - 1)
    low = lookup(guesses, prefix)
    last = table.numel() - 1
    for _ in range(spread):
        low = (low + (lookup(table, (low + 1).clamp(max=last)) <= y)).clamp(max=last)
    return low


def quantize(x: Tensor, code: str, signed: bool = True, noise: Tensor | None = None,
             stochastic: bool = True, table: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``x`` (float32) as ``(codes, scales)``: uint8 codes shaped like ``x`` and float32 block scales.

    Each value rounds to one of the two codes around it: stochastically (``stochastic``, up with the
    probability of its distance from the lower one, so that the stored value is unbiased) using
    ``noise``, 16 random bits per element (int32 in ``[0, 65536)`` shaped like ``x``:
    :func:`descend.optim.engines.store.element_noise`; drawn from torch's generator if omitted), or to
    the nearest. ``table``: :func:`code_table` of ``code`` already on ``x``'s device (else copied there).
    """
    if table is None:
        table = code_table(code, signed).to(x.device)
    scales = block_scales(x)
    flat = x.reshape(-1)
    y = flat.float() / per_element(scales, flat.numel())  # in [-1, 1]
    if not signed:
        y = y.clamp(min=0)
    # the code at or below each value, and the one above it
    low = index_below(y, table, code, signed).clamp(0, table.numel() - 2)
    below, above = lookup(table, low), lookup(table, low + 1)
    # a gap of 0 (the repeated code values: -0 and +0, the linear code's -1) is never below a value: the index is
    # that of the last of equal values
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
    """The float32 values ``scales[block] * code[q]`` of ``(codes, scales)``, shaped like ``codes``
    (``table`` as in :func:`quantize`), a fresh contiguous tensor."""
    if table is None:
        table = code_table(code, signed).to(codes.device)
    flat = codes.reshape(-1)
    return (lookup(table, flat.int()) * per_element(scales, flat.numel())).view(codes.shape)


def round_trip(x: Tensor, code: str, signed: bool = True, noise: Tensor | None = None,
               stochastic: bool = True) -> Tensor:
    """``dequantize(quantize(x))``: the float32 values ``x`` takes when stored in ``code``."""
    codes, scales = quantize(x, code, signed, noise, stochastic)
    return dequantize(codes, scales, code, signed)
