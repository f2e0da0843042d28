"""Stochastic rounding of float32 values to bfloat16, for optimizer state kept in 2 bytes.

bfloat16 is float32 with the low 16 bits of the mantissa dropped. Rounding to nearest loses any
update smaller than half a bf16 ulp (e.g. ``m <- 0.99*m + 0.01*g`` stalls once ``|0.01*(g - m)|``
is below ``|m|/256``), so an EMA stored in bf16 stops following its input. Stochastic rounding
rounds up with probability equal to the dropped fraction: add uniform random bits to the low 16
bits, then truncate. The rounded value is then unbiased, ``E[round(x)] = x``, and small updates
survive on average.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: State dtypes whose in-place updates are computed in float32 and written back stochastically.
LOW_PRECISION = (torch.bfloat16,)


def stochastic_round_(x: Tensor) -> Tensor:
    """Round a float32 tensor in place to bfloat16-representable values, stochastically; returns ``x``.

    ``x`` (float32, any shape) afterwards holds values that convert to bfloat16 exactly. Non-finite
    values are left as they are (their conversion then rounds to nearest, keeping inf and nan).
    """
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_ takes a float32 tensor, got {x.dtype}")
    bits = x.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    rounded = (bits + noise).bitwise_and_(-65536)  # -65536 == 0xFFFF0000 as int32: drop the low 16 bits
    bits.copy_(torch.where(torch.isfinite(x), rounded, bits))
    return x


def stochastic_round(x: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``x`` (float32) rounded stochastically to ``dtype`` (bfloat16), out of place, as a pure expression.

    Written without in-place ops or views of the input, so ``torch.compile`` fuses it into the
    surrounding kernel: the random bits come from the compiled kernel's own generator.
    """
    if dtype != torch.bfloat16:
        return x.to(dtype)
    bits = x.view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    rounded = torch.bitwise_and(bits + noise, -65536).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).to(dtype)


def write_back_(state: Tensor, value: Tensor) -> None:
    """``state.copy_(value)``, rounding stochastically where ``state`` is bfloat16 and ``value`` wider."""
    if state.dtype in LOW_PRECISION and value.dtype == torch.float32:
        state.copy_(stochastic_round(value, state.dtype))
    else:
        state.copy_(value)


def stochastic_round_into_(state: Tensor, value: Tensor, noise: Tensor, nan: Tensor) -> None:
    """``state.copy_(stochastic_round(value))`` for bfloat16 ``state``, using caller-owned buffers.

    ``noise`` (int32) and ``nan`` (bool) have ``value``'s shape and are overwritten; nothing is
    allocated, so the foreach engine can reuse them for every chunk. Infinities survive the bit
    arithmetic unchanged (their low 16 bits are zero); NaNs are copied through as they are.
    """
    noise.random_(0, 1 << 16)
    noise.add_(value.view(torch.int32)).bitwise_and_(-65536)
    rounded = noise.view(torch.float32)
    torch.ne(value, value, out=nan)
    torch.where(nan, value, rounded, out=rounded)
    state.copy_(rounded)
