"""Stochastic rounding of float32 values to bfloat16, for optimizer state kept in 2 bytes.

bfloat16 is float32 with the low 16 bits of the mantissa dropped. Rounding to nearest loses any
update smaller than half a bf16 ulp (e.g. ``m <- 0.99*m + 0.01*g`` stalls once ``|0.01*(g - m)|``
is below ``|m|/256``), so an EMA stored in bf16 stops following its input. Stochastic rounding
rounds up with probability equal to the dropped fraction: add 16 uniform random bits to the low 16
bits, then truncate. The rounded value is then unbiased, ``E[round(x)] = x``, and small updates
survive on average.

The optimizer's random bits are not drawn from a generator: they are a hash of *where* the value
is, with ``index`` the element's position in its tensor and a per-tensor ``seed``:

    h = (index ^ seed) * 0x7feb352d;  h ^= h >> 15;  h *= 0x846ca68b;  noise = h >> 16   (uint32)

``seed = rounding_seeds(step, parameter ordinal, state slot)`` is the full "lowbias32" hash
(:func:`mix32`, two multiply-xorshift rounds), computed once per tensor and step. The elementwise
part is one round, with the *high* 16 bits of the last product as noise (they depend on every
input bit); a deeper per-element hash makes inductor's compile time explode, because each xorshift
reads its input twice and inductor re-expands such expressions rather than keeping a temporary.
A hash is elementwise, so ``torch.compile`` fuses it into the optimizer's one vectorised pass over
memory (a random-number call keeps inductor's CPU loop scalar), every engine draws the same bits
for the same element (the engines agree, up to the float32 rounding of the values being rounded),
and a resumed run draws what an uninterrupted one draws, with no generator state to checkpoint.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: State dtypes whose in-place updates are computed in float32 and written back stochastically.
LOW_PRECISION = (torch.bfloat16,)

# lowbias32's odd multipliers (0x7FEB352D, 0x846CA68B), as wrapping int32 constants.
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - (1 << 32)
# Odd constants that spread the step, the parameter's ordinal and the state slot over all 32 bits.
_STEP_MUL = 0x9E3779B1 - (1 << 32)
_ORDINAL_MUL = 0x85EBCA77 - (1 << 32)
_SLOT_MUL = 0x27D4EB2F


def mix32(x: Tensor) -> Tensor:
    """The lowbias32 hash of an int32 tensor, elementwise (wrapping int32 arithmetic, logical shifts).

    ``x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16`` on unsigned
    32-bit words; the masks turn int32's arithmetic shifts into logical ones.
    """
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _MUL1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _MUL2
    return x ^ ((x >> 16) & 0xFFFF)


def rounding_seeds(step: Tensor, ordinals: Tensor, slot: int) -> Tensor:
    """int32 seeds, one per parameter: a hash of the step, each parameter's ordinal and the state slot.

    Args:
        step: the 0-d step counter (any dtype; its value is used as an integer).
        ordinals: int32 ``[n]``, each parameter's position in the optimizer (over all groups).
        slot: which state tensor of the parameter (0, 1, ... in chain order).
    """
    step_hash = mix32(step.to(torch.int32) * _STEP_MUL + slot * _SLOT_MUL)
    return mix32(ordinals.to(torch.int32) * _ORDINAL_MUL + step_hash)


def element_noise(seed: Tensor | int, like: Tensor, offset: int = 0, lanes: Tensor | None = None) -> Tensor:
    """16 random bits per element of ``like`` (int32 in ``[0, 65536)``), a hash of index and seed.

    ``offset`` is the flat index of ``like``'s first element in its whole tensor (a chunk of it).
    ``lanes``: ``arange(L)`` (int32) for a 2-D ``like`` of ``L`` columns, to build the index as
    ``offset + L*row + lanes[column]`` (the same values). Inside ``torch.compile`` this matters: an
    index from ``arange`` is assembled lane by lane in every vector iteration of inductor's CPU loop
    (a third of a bfloat16 step's time), while a row's base plus a loaded ``lanes`` vector is one add.
    """
    if lanes is not None and like.dim() == 2 and like.shape[1] == lanes.numel():
        rows = torch.arange(like.shape[0], dtype=torch.int32, device=like.device) * like.shape[1] + offset
        index = rows[:, None] + lanes[None, :]
    else:
        index = torch.arange(offset, offset + like.numel(), dtype=torch.int32, device=like.device).view(like.shape)
    h = (index ^ seed) * _MUL1
    h = (h ^ ((h >> 15) & 0x1FFFF)) * _MUL2
    return (h >> 16) & 0xFFFF


def stochastic_round(x: Tensor, dtype: torch.dtype = torch.bfloat16, noise: Tensor | None = None) -> Tensor:
    """``x`` (float32) rounded stochastically to ``dtype`` (bfloat16), out of place, as a pure expression.

    ``noise``: int32 values in ``[0, 65536)`` shaped like ``x`` (e.g. :func:`element_noise`); drawn
    from torch's generator if omitted. Written without in-place ops or views of the input, so
    ``torch.compile`` fuses it into the surrounding kernel. Infinities come through the bit
    arithmetic unchanged (their low 16 bits are zero, so the carry never reaches the exponent);
    NaNs keep their value (a NaN's payload could carry into the sign bit).
    """
    if dtype != torch.bfloat16:
        return x.to(dtype)
    bits = x.view(torch.int32)
    if noise is None:
        noise = torch.randint_like(bits, 0, 1 << 16)
    rounded = torch.bitwise_and(bits + noise, -65536).view(torch.float32)  # -65536 == 0xFFFF0000
    return torch.where(x != x, x, rounded).to(dtype)


def stochastic_round_(x: Tensor) -> Tensor:
    """Round a float32 tensor in place to bfloat16-representable values, stochastically; returns ``x``.

    ``x`` (float32, any shape) afterwards holds values that convert to bfloat16 exactly. The bits
    come from torch's generator (the optimizers use :func:`element_noise` instead).
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_ takes a float32 tensor, got {x.dtype}")
    x.copy_(stochastic_round(x).float())
    return x


def write_back_(state: Tensor, value: Tensor, seed: Tensor | int = 0, offset: int = 0) -> None:
    """``state.copy_(value)``, rounding stochastically where ``state`` is bf16 and ``value`` wider.

    The noise is :func:`element_noise` of ``seed``, for a tensor whose first element has flat index ``offset``.
    """
    if state.dtype in LOW_PRECISION and value.dtype == torch.float32:
        state.copy_(stochastic_round(value, state.dtype, element_noise(seed, value, offset)))
    else:
        state.copy_(value)


def stochastic_round_into_(state: Tensor, value: Tensor, noise: Tensor, spare: Tensor, nan: Tensor, seed: int,
                           offset: int = 0) -> None:
    """``write_back_(state, value, seed)`` for a chunk at flat ``offset``, using caller-owned buffers.

    ``noise``, ``spare`` (int32) and ``nan`` (bool), all of ``value``'s shape, are overwritten;
    nothing is allocated, so the foreach engine reuses them for every chunk. Infinities survive the
    bit arithmetic unchanged (their low 16 bits are zero); NaNs are copied through as they are.
    """
    torch.arange(offset, offset + value.numel(), dtype=torch.int32, out=noise.view(-1))
    x = noise.bitwise_xor_(seed).mul_(_MUL1)
    torch.bitwise_right_shift(x, 15, out=spare)
    x.bitwise_xor_(spare.bitwise_and_(0x1FFFF)).mul_(_MUL2)
    x.bitwise_right_shift_(16).bitwise_and_(0xFFFF).add_(value.view(torch.int32)).bitwise_and_(-65536)
    rounded = x.view(torch.float32)
    torch.ne(value, value, out=nan)
    torch.where(nan, value, rounded, out=rounded)
    state.copy_(rounded)
