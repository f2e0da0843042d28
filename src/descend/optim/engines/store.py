"""How optimizer state is kept in memory: loaded to float32 for the rules, stored back after.

Every engine runs a rule's :meth:`update <descend.optim.rules.base.Rule.update>` on *working* state and
then stores it: ``work = store.load(stored)``, the rule updates ``work`` in place, then
``store.store_(stored, work, seed, offset)``. The store is chosen once per optimizer from its
``state_dtype`` (:func:`store_for`) and is the one place that says how state is kept; the native
loop emits the same operations in C from the same class (:meth:`Store.c_load`, :meth:`Store.c_store`).

:class:`Store` (every ``state_dtype`` but bfloat16): the state tensor is its own working copy; the
rules update it in place and storing does nothing.

:class:`StochasticBF16` (``state_dtype=torch.bfloat16``): 2 bytes per value, updated in float32 and
rounded stochastically on store. bfloat16 is float32 with the low 16 bits of the mantissa dropped.
Rounding to nearest loses any update smaller than half a bf16 ulp (``m <- 0.99*m + 0.01*g`` stalls
once ``|0.01*(g - m)|`` is below ``|m|/256``), so an EMA stored in bf16 stops following its input.
Stochastic rounding adds 16 uniform random bits to the low 16 bits, then truncates: the rounded value
is unbiased, ``E[round(x)] = x``, and small updates survive on average.

The random bits are not drawn from a generator: they are a hash of *where* the value is, with
``index`` the element's position in its tensor and a per-tensor ``seed``:

    h = (index ^ seed) * 0x7feb352d;  h ^= h >> 15;  h *= 0x846ca68b;  noise = h >> 16   (uint32)

``seed = rounding_seeds(step, parameter ordinal, state slot)`` is the full "lowbias32" hash
(:func:`mix32`), computed once per tensor and step. The elementwise part is one round, with the high
16 bits of the last product as noise (they depend on every input bit); a deeper per-element hash
makes inductor's compile time explode, because each xorshift reads its input twice and inductor
re-expands such expressions rather than keeping a temporary. A hash is elementwise, so
``torch.compile`` fuses it into the step's one vectorised pass (a random-number call keeps inductor's
CPU loop scalar), every engine draws the same bits for the same element, and a resumed run draws what
an uninterrupted one draws, with no generator state to checkpoint.

A new storage format is one more subclass of :class:`Store` (its attributes and methods are what
the engines use) and one more case in :func:`store_for`; the engines do not change.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

# lowbias32's odd multipliers, as unsigned 32-bit words (C) and as wrapping int32 constants (torch).
HASH_MUL1 = 0x7FEB352D
HASH_MUL2 = 0x846CA68B
_MUL1 = HASH_MUL1
_MUL2 = HASH_MUL2 - (1 << 32)
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


def state_slot(rule_index: int, key_index: int) -> int:
    """The slot number of a rule's state tensor in the chain (it seeds the tensor's rounding noise)."""
    return 16 * rule_index + key_index


def rounding_seeds(step: Tensor, ordinals: Tensor, slot: int) -> Tensor:
    """int32 seeds, one per parameter: a hash of the step, each parameter's ordinal and the state slot.

    Args:
        step: the 0-d step counter (any dtype; its value is used as an integer).
        ordinals: int32 ``[n]``, each parameter's position in the optimizer (over all groups).
        slot: which state tensor of the parameter (:func:`state_slot`).
    """
    step_hash = mix32(step.to(torch.int32) * _STEP_MUL + slot * _SLOT_MUL)
    return mix32(ordinals.to(torch.int32) * _ORDINAL_MUL + step_hash)


def element_noise(seed: Tensor | int, like: Tensor, offset: int = 0, lanes: Tensor | None = None) -> Tensor:
    """16 random bits per element of ``like`` (int32 in ``[0, 65536)``), a hash of index and seed.

    ``offset`` is the flat index of ``like``'s first element in its whole tensor (a chunk of it).
    ``lanes``: ``arange(L)`` (int32) for a 2-D ``like`` of ``L`` columns, to build the index as
    ``offset + L*row + lanes[column]`` (the same values). Inside ``torch.compile`` this matters: an
    index from ``arange`` is assembled lane by lane in every vector iteration of inductor's CPU loop,
    while a row's base plus a loaded ``lanes`` vector is one add.
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


class Store:
    """State kept in its own dtype (``dtype``; None: each parameter's own): the rules update the stored
    tensor itself; storing does nothing."""

    #: :meth:`load` returns the stored tensor itself (torch's fused kernels may then update it); engines
    #: call :meth:`store_` only for a working copy that is not it.
    as_is = True
    #: :meth:`store_` takes noise: engines compute :meth:`seeds` per tensor and state slot, and offsets.
    stochastic = False
    #: C functions that :meth:`c_load` and :meth:`c_store` call; ``c_type`` is the C element type
    #: (None: the native engine leaves such state to the foreach engine).
    c_helpers = ""

    def __init__(self, dtype: torch.dtype | None) -> None:
        self.dtype = dtype
        self.c_type: str | None = "float" if dtype in (None, torch.float32) else None

    def load(self, stored: Any) -> Any:
        """The working value the rules update in place (a tensor or a ``TensorList``)."""
        return stored

    def store_(self, stored: Tensor, work: Tensor, seed: Tensor | int = 0, offset: int = 0, *,
               lanes: Tensor | None = None, buffers: Sequence[Tensor] | None = None) -> None:
        """Write ``work`` (from :meth:`load`, updated) back into ``stored``.

        ``seed``, ``offset``: the noise of this tensor and state slot (:meth:`seeds`), and the flat index
        of ``stored``'s first element in the whole tensor; ``lanes`` as in :func:`element_noise`;
        ``buffers``: tensors shaped like ``work`` of :meth:`scratch_dtypes`, overwritten.
        """

    def scratch_dtypes(self) -> tuple[torch.dtype, ...]:
        """The dtypes of the ``buffers`` :meth:`store_` can use instead of allocating."""
        return ()

    def seeds(self, step: Tensor, ordinals: Sequence[int], layout: Sequence[Sequence[str]],
              device: torch.device) -> list[list[Tensor]]:
        """``seeds[r][j]``: int32 ``[n]`` noise seeds (one per ordinal) of rule ``r``'s ``j``-th state tensor
        this step, on ``device``; empty where storing takes no noise."""
        if not self.stochastic:
            return []
        ordinal = torch.tensor(list(ordinals), dtype=torch.int32)
        step = step.cpu()
        return [[rounding_seeds(step, ordinal, state_slot(r, j)).to(device) for j in range(len(names))]
                for r, names in enumerate(layout)]

    def c_load(self, element: str) -> str:
        """C: the float32 value of the stored ``element`` (e.g. ``P2[i]``)."""
        return element

    def c_store(self, element: str, value: str, index: str, seed: str) -> str:
        """C: the statement that stores the float ``value`` into ``element``; ``index`` (uint32) and ``seed``
        are the element's flat index and its tensor's seed, as :meth:`store_` takes them."""
        return f"{element} = {value};"


class StochasticBF16(Store):
    """bfloat16 state, loaded to float32 and stored rounded stochastically with the element's hash noise."""

    as_is = False
    stochastic = True
    c_helpers = f"""
static inline float descend_bf16_load(uint16_t b) {{
  const uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}}

static inline uint16_t descend_bf16_round(float x, uint32_t index, uint32_t seed) {{
  if (x != x) return 0x7FC0;  /* a NaN, as torch converts one */
  uint32_t h = (index ^ seed) * 0x{HASH_MUL1:X}u;
  h = (h ^ (h >> 15)) * 0x{HASH_MUL2:X}u;
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return (uint16_t)(((u + (h >> 16)) & 0xFFFF0000u) >> 16);
}}
"""

    def __init__(self) -> None:
        super().__init__(torch.bfloat16)
        self.c_type = "uint16_t"

    def load(self, stored: Any) -> Any:
        return stored.to(torch.float32)

    def store_(self, stored: Tensor, work: Tensor, seed: Tensor | int = 0, offset: int = 0, *,
               lanes: Tensor | None = None, buffers: Sequence[Tensor] | None = None) -> None:
        if buffers is None:
            stored.copy_(stochastic_round(work, torch.bfloat16, element_noise(seed, work, offset, lanes)))
            return
        # the same bits as element_noise and stochastic_round, computed in the caller's buffers
        noise, spare, nan = buffers
        torch.arange(offset, offset + work.numel(), dtype=torch.int32, out=noise.view(-1))
        x = noise.bitwise_xor_(seed).mul_(_MUL1)
        torch.bitwise_right_shift(x, 15, out=spare)
        x.bitwise_xor_(spare.bitwise_and_(0x1FFFF)).mul_(_MUL2)
        x.bitwise_right_shift_(16).bitwise_and_(0xFFFF).add_(work.view(torch.int32)).bitwise_and_(-65536)
        rounded = x.view(torch.float32)
        torch.ne(work, work, out=nan)
        torch.where(nan, work, rounded, out=rounded)
        stored.copy_(rounded)

    def scratch_dtypes(self) -> tuple[torch.dtype, ...]:
        return torch.int32, torch.int32, torch.bool

    def c_load(self, element: str) -> str:
        return f"descend_bf16_load({element})"

    def c_store(self, element: str, value: str, index: str, seed: str) -> str:
        return f"{element} = descend_bf16_round({value}, {index}, {seed});"


_BF16 = StochasticBF16()


@functools.cache
def store_for(state_dtype: torch.dtype | None) -> Store:
    """The store of an optimizer's ``state_dtype`` (None: the parameter's dtype); one object per dtype (a
    compiled step specialises on it)."""
    return _BF16 if state_dtype == torch.bfloat16 else Store(state_dtype)


class NoisePositions:
    """Where each parameter's rounding noise comes from: ``(ordinal, offset)``.

    The ordinal is the parameter's position among the optimizer's parameters (over all groups), the
    offset the flat index of its first element. A parameter in a flat buffer (``flat=True``) takes the
    buffer's ordinal and its offset in the buffer, so stepping it alone draws the noise that stepping
    the whole buffer draws.
    """

    def __init__(self, source: Any, layout: Any) -> None:
        self.source, self.layout = source, layout
        self.ordinals: dict[Tensor, int] = {}

    def __call__(self, p: Tensor) -> tuple[int, int]:
        if self.layout is not None:
            found = self.layout.position(p)
            if found is not None:
                return found
        if p not in self.ordinals:
            params = (q for group in self.source.param_groups for q in group["params"])
            self.ordinals = {q: i for i, q in enumerate(params)}
        return self.ordinals[p], 0


# -- bfloat16 parameters ------------------------------------------------------------------------------------------
#
# A bfloat16 parameter is stepped like bfloat16 state: its new value ``factor*w + u`` is computed in float32
# and stored rounded stochastically, with the element's hash noise (:func:`element_noise`) under a seed of its
# own (:data:`PARAM_SLOT`, apart from every :func:`state_slot`), at the position :class:`NoisePositions` gives.
# Rounding to nearest loses every update below half a bf16 ulp (``|u| < |w|/256``): a pure-bf16 model whose
# updates have become small stops training. ``param_rounding="nearest"`` keeps torch.optim's arithmetic.

#: The seed slot of a parameter's own rounding noise (state slots, :func:`state_slot`, are 0 and up).
PARAM_SLOT = -1
#: The values of an optimizer's ``param_rounding``: how a new bfloat16 parameter value is rounded.
PARAM_ROUNDINGS = ("stochastic", "nearest")


def rounds_params(param_rounding: str, dtype: torch.dtype) -> bool:
    """Whether parameters of ``dtype`` are stepped in float32 and stored with stochastic rounding: bfloat16
    ones under ``param_rounding="stochastic"`` (float16 keeps torch's arithmetic: its 10-bit mantissa loses
    far fewer updates, and float16 training keeps float32 master weights anyway)."""
    return param_rounding == "stochastic" and dtype == torch.bfloat16


def param_seeds(step: Tensor, ordinals: Sequence[int], device: torch.device) -> Tensor:
    """int32 ``[n]``: this step's rounding seed of each parameter (by ordinal), on ``device``."""
    return rounding_seeds(step.cpu(), torch.tensor(list(ordinals), dtype=torch.int32), PARAM_SLOT).to(device)


def param_store() -> StochasticBF16:
    """How a bfloat16 parameter's new value is stored (and its C: ``c_load``, ``c_store``, ``c_helpers``): as
    bfloat16 state is."""
    return _BF16
