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

Where a format keeps more than one tensor per state (:class:`Blockwise8`: codes and block scales), the
engines reach it only through the store: :meth:`Store.stored` gathers what :meth:`Store.load` reads,
:meth:`Store.piece` cuts a part of it and :attr:`Store.granule` says where parts may start.

:class:`Blockwise8` (``state_dtype="int8"``): 1 byte per value plus one float32 scale per block of
:data:`~descend.optim._blockwise.BLOCK` = 256 values (1 + 4/256 bytes per value), in the dynamic code of
:mod:`descend.optim._blockwise`: signed for signed state, unsigned (twice the resolution) for the state a
rule declares non-negative (:attr:`Rule.nonnegative_state <descend.optim.rules.base.Rule.nonnegative_state>`).
Loading dequantises a state tensor to float32 (a transient working copy, 4 bytes per value of the tensor
or of the chunk an engine steps); storing takes each block's new ``max|x|`` as its scale and rounds each
value stochastically to one of the two codes around it, with the same hash noise as bfloat16 state.

A new storage format is one more subclass of :class:`Store` (its attributes and methods are what
the engines use) and one more case in :func:`store_for`; the engines do not change.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from descend.optim._blockwise import (
    BLOCK,
    MIN_SCALE,
    SUBNORMAL_BIAS,
    TOP,
    dequantize,
    dynamic_grid,
    dynamic_layout,
    quantize,
)
from descend.optim.engines.shards import DTensor, shard_offset
from descend.optim.engines.tensorlist import TensorList

#: The ``state_dtype`` of 8-bit blockwise state (:class:`Blockwise8`).
INT8 = "int8"

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


def mix32_word(x: int) -> int:
    """:func:`mix32` of one 32-bit word in Python integers (``x`` taken modulo 2^32; the result unsigned): the
    same bits, without the cost of a dozen tensor operations on a tensor of one element."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * HASH_MUL1) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * HASH_MUL2) & 0xFFFFFFFF
    return x ^ (x >> 16)


def rounding_seeds(step: Tensor, ordinals: Sequence[int], slot: int) -> Tensor:
    """int32 seeds, one per parameter: a hash of the step, each parameter's ordinal and the state slot,
    ``mix32(ordinal * c1 + mix32(step * c2 + slot * c3))`` in wrapping 32-bit arithmetic.

    Args:
        step: the 0-d step counter (any dtype; its value is used as an integer).
        ordinals: each parameter's position in the optimizer (over all groups).
        slot: which state tensor of the parameter (:func:`state_slot`).

    Returns an int32 ``[n]`` CPU tensor. Traced by ``torch.compile`` (the step a graph input) the hash runs as
    tensor operations (:func:`mix32`), otherwise on Python integers (:func:`mix32_word`).
    """
    if torch.compiler.is_compiling():
        step_hash = mix32(step.to(torch.int32) * _STEP_MUL + slot * _SLOT_MUL)
        return mix32(torch.tensor(list(ordinals), dtype=torch.int32) * _ORDINAL_MUL + step_hash)
    step_hash = mix32_word(int(step.item()) * _STEP_MUL + slot * _SLOT_MUL)
    words = [mix32_word(ordinal * _ORDINAL_MUL + step_hash) for ordinal in ordinals]
    return torch.tensor([w - (1 << 32) if w >> 31 else w for w in words], dtype=torch.int32)


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
    #: C functions that :meth:`c_load` and :meth:`c_store` (or the block hooks) call; ``c_type`` is the C element
    #: type (None: the native engine leaves such state, e.g. float16, to the foreach engine).
    c_helpers = ""

    #: ``torch.compile`` may trace :meth:`load` and :meth:`store_` (False: the compiled engine steps such state
    #: on the foreach engine, and a traced step runs them eagerly, outside its graph).
    traceable = True
    #: Parts of a state tensor that an engine steps separately (chunks) start at multiples of this many
    #: elements (a format of blocks keeps each block whole).
    granule = 1

    def __init__(self, dtype: torch.dtype | None) -> None:
        self.dtype = dtype
        self.c_type: str | None = "float" if dtype in (None, torch.float32) else None

    @property
    def init_dtype(self) -> torch.dtype | None:
        """The dtype a rule creates fresh state in (:meth:`Rule.init_state`), before :meth:`create`."""
        return self.dtype

    def parts(self, key: str, p: Tensor) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """What the optimizer state keeps for state ``key`` of parameter ``p``: ``(state key, shape, dtype)``
        of each tensor (the first shaped like ``p``)."""
        return [(key, tuple(p.shape), self.dtype or p.dtype)]

    def kept_keys(self, keys: Sequence[str]) -> list[str]:
        """Every optimizer-state key that ``keys`` (state tensors) are kept under, in the order
        :meth:`bind` takes their tensors."""
        return list(keys)

    def create(self, key: str, value: Tensor, signed: bool) -> dict[str, Tensor]:
        """The optimizer-state entries of a fresh state tensor ``value`` (from :meth:`Rule.init_state`)."""
        return {key: value}

    def bind(self, tensors: Sequence[Tensor], signed: Sequence[bool]) -> list[Any]:
        """What :meth:`load` and :meth:`store_` take for each state tensor, from the optimizer-state tensors
        of :meth:`kept_keys` (``signed[i]``: whether the ``i``-th state may be negative)."""
        return list(tensors)

    def stored(self, state: Mapping[str, Tensor], key: str, signed: bool) -> Any:
        """What :meth:`load` and :meth:`store_` take for state ``key`` of one parameter's ``state``."""
        return self.bind([state[k] for k in self.kept_keys([key])], [signed])[0]

    def map(self, stored: Any, fn: Callable[[Tensor], Tensor]) -> Any:
        """``stored`` with ``fn`` (a view: ``torch.atleast_1d``, a shard's local tensor) applied to its
        parameter-shaped tensor."""
        return fn(stored)

    def piece(self, stored: Any, start: int, stop: int) -> Any:
        """Elements ``start:stop`` of a contiguous ``stored`` (``start`` a multiple of :attr:`granule`)."""
        return stored.view(-1)[start:stop]

    def contiguous(self, stored: Any) -> bool:
        """Whether :meth:`piece` may cut ``stored``."""
        return stored.is_contiguous()

    def gather(self, stored: list[Any], scratch: Any = None) -> Any:
        """Many tensors' ``stored`` as one value :meth:`load` takes (the foreach engine's chunk)."""
        return TensorList(stored, scratch)

    def convert(self, saved: Mapping[str, Any], key: str, signed: bool, p: Tensor) -> dict[str, Tensor] | None:
        """The optimizer-state entries of state ``key`` of ``p`` from a loaded state dict's entries ``saved``
        (of any store: a state saved in another format is converted), or None if ``saved`` lacks it."""
        value = saved.get(key)
        if not torch.is_tensor(value) or not value.is_floating_point():
            value = blockwise_value(saved, key, signed)
            if value is None:
                return None
        return {key: value.to(device=p.device, dtype=self.dtype or p.dtype, copy=True)}

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
        step = step.cpu()
        return [[rounding_seeds(step, ordinals, state_slot(r, j)).to(device) for j in range(len(names))]
                for r, names in enumerate(layout)]

    @property
    def c_arrays(self) -> tuple[str, ...]:
        """The C element types of the arrays one state tensor is kept in (their addresses: :meth:`c_addresses`)."""
        return (self.c_type,) if self.c_type else ()

    def c_addresses(self, stored: Any) -> list[int] | None:
        """The addresses of ``stored``'s arrays (:attr:`c_arrays`), or None if the native loop cannot step it
        (another dtype, not contiguous)."""
        if stored.dtype != (self.dtype or torch.float32) or not stored.is_contiguous():
            return None
        return [stored.data_ptr()]

    def c_load(self, element: str) -> str:
        """C: the float32 value of the stored ``element`` (e.g. ``P2[i]``)."""
        return element

    def c_store(self, element: str, value: str, index: str, seed: str) -> str:
        """C: the statement that stores the float ``value`` into ``element``; ``index`` (uint32) and ``seed``
        are the element's flat index and its tensor's seed, as :meth:`store_` takes them."""
        return f"{element} = {value};"

    # A store of blocks (granule > 1) is stepped block by block: the loop opens each block of every state
    # tensor (``c_block_open``), loads each element (``c_block_load``), runs the rules, keeps the new values
    # in a float buffer per state tensor, then stores each buffer whole (``c_block_store``). In the C, ``blk``
    # is the block's number in its tensor, ``b0`` its first element, ``i`` the element's.
    def c_block_open(self, arrays: Sequence[str], signed: bool) -> str:
        """C: the statements that open block ``blk`` of the state tensor kept in ``arrays`` (pointers)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no blocks")

    def c_block_load(self, arrays: Sequence[str], signed: bool) -> str:
        """C: the float32 value of element ``i`` of the opened block."""
        raise NotImplementedError(f"{type(self).__name__} keeps no blocks")

    def c_block_store(self, arrays: Sequence[str], signed: bool, values: str, count: str, index: str,
                      seed: str) -> str:
        """C: the statement that stores ``values`` (``count`` floats) as block ``blk``; ``index`` (uint32) is the
        flat index of the block's first element and ``seed`` the tensor's, as :meth:`store_` takes them."""
        raise NotImplementedError(f"{type(self).__name__} keeps no blocks")


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


class Blocks(NamedTuple):
    """One 8-bit state tensor as :class:`Blockwise8` loads and stores it."""

    codes: Tensor  # uint8, shaped like the parameter (contiguous)
    scales: Tensor  # float32 [ceil(numel / BLOCK)]: each block's max |x|
    signed: bool  # the signed code (False: the state is non-negative)

    @property
    def dtype(self) -> torch.dtype:
        return self.codes.dtype


class Gathered(NamedTuple):
    """A chunk's :class:`Blocks` (:meth:`Blockwise8.gather`); ``tensors`` as a ``TensorList`` names them."""

    tensors: list[Blocks]
    scratch: Any


def scales_key(key: str) -> str:
    """The optimizer-state key of the block scales of 8-bit state ``key``."""
    return f"{key}_scales"


def state_family(key: str) -> tuple[str, ...]:
    """Every optimizer-state key that state ``key`` is kept under in some store (a converted state drops them)."""
    return key, scales_key(key)


def blockwise_value(saved: Mapping[str, Any], key: str, signed: bool) -> Tensor | None:
    """The float32 values of 8-bit state ``key`` in a state dict's entries ``saved``, or None if it has none."""
    codes, scales = saved.get(key), saved.get(scales_key(key))
    if not (torch.is_tensor(codes) and torch.is_tensor(scales) and codes.dtype == torch.uint8):
        return None
    return dequantize(codes, scales.float(), "dynamic", signed)


class Blockwise8(Store):
    """8-bit blockwise state (:mod:`descend.optim._blockwise`'s dynamic code, rounded stochastically with the
    element's hash noise): ``state[key]`` holds the uint8 codes shaped like the parameter and
    ``state[key + "_scales"]`` the float32 scale of each block of 256 values, both plain tensors.

    The native loop steps it block by block (:meth:`c_block_open`, :meth:`c_block_load`, :meth:`c_block_store`:
    the same codes, bit for bit). inductor (torch 2.13) mis-compiles its block maxima after the rules' in-place
    update (``traceable`` False): the compiled engine steps it on the foreach engine.
    """

    as_is = False
    stochastic = True
    traceable = False
    granule = BLOCK

    def __init__(self) -> None:
        super().__init__(torch.uint8)
        self.c_type = "uint8_t"
        self.tables: dict[tuple[bool, torch.device], Tensor] = {}

    @functools.cached_property
    def c_helpers(self) -> str:  # type: ignore[override]
        """The decoder of a code (its grid value from its bits) and the quantiser of a block:
        :func:`~descend.optim._blockwise.quantize` element for element (the dynamic code's magnitudes read
        from the float's bits, :class:`~descend.optim._blockwise.DynamicLayout`)."""
        parts = []
        for signed, tag in ((True, "s"), (False, "u")):
            layout = dynamic_layout(signed)
            # minus a magnitude is 127 - it, 255 - (128 + it); a negative value in the unsigned code is 0
            code = ("(uint32_t)(128 + magnitude) ^ (0u - negative)" if signed
                    else "(uint32_t)magnitude & (negative - 1u)")
            index = "q & 0x80u ? q & 0x7Fu : 0x7Fu - q" if signed else "q"
            sign = "(~q & 0x80u) << 24" if signed else "0u"
            parts.append(f"""
/* grid[q] (dynamic_grid): the magnitude of index k built from its bits, the inverse of the quantiser's
   (bits >> 20) - bias (the subnormals k < 8: k / subnormal_scale); negative for a signed q below 128 */
static inline float descend_q8_grid_{tag}(uint32_t q) {{
  const uint32_t k = {index};
  const float subnormal = (float)(int32_t)k * {(1 / layout.subnormal_scale).hex()}f;
  uint32_t subnormal_bits;
  memcpy(&subnormal_bits, &subnormal, sizeof subnormal_bits);
  const uint32_t bits = (k < 8 ? subnormal_bits : (k + {layout.bias}u) << 20) | {sign};
  float value;
  memcpy(&value, &bits, sizeof value);
  return value;
}}

/* values[0:n] (n <= {BLOCK}) as one block: scale max|x| (NaN if any is NaN, at least 2^-126), each value's
   magnitude z = |x|*({TOP}/scale) rounded stochastically to one of the two codes around it with the element's
   hash noise */
static void descend_q8_store_{tag}(const float *restrict values, int64_t n, uint8_t *restrict codes,
                                 float *scale, uint32_t index, uint32_t seed) {{
  /* max|x| on the bits: |x|'s bits order as its values do, a NaN's above the infinity's */
  uint32_t top = 0;
  for (int64_t i = 0; i < n; i++) {{
    uint32_t bits;
    memcpy(&bits, values + i, sizeof bits);
    bits &= 0x7FFFFFFFu;
    top = bits > top ? bits : top;
  }}
  float m;
  memcpy(&m, &top, sizeof m);
  if (top > 0x7F800000u) m = NAN;
  else if (top < 0x00800000u) m = {MIN_SCALE.hex()}f;
  *scale = m;
  const float inverse = {TOP}f / m;
  for (int64_t i = 0; i < n; i++) {{
    uint32_t bits, zbits, moved;
    memcpy(&bits, values + i, sizeof bits);
    const uint32_t abs_bits = bits & 0x7FFFFFFFu, negative = (bits >> 31) & (abs_bits <= 0x7F800000u);
    float a;
    memcpy(&a, &abs_bits, sizeof a);
    const float z = a * inverse, shifted = z * {layout.subnormal_scale:.1f}f + 8.0f;
    memcpy(&zbits, &z, sizeof zbits);
    memcpy(&moved, &shifted, sizeof moved);
    zbits &= 0x7FFFFFFFu;
    const int small = zbits < 0x{layout.normal_min_bits:X}u;
    const int32_t k = small ? (int32_t)(moved >> 20) - {SUBNORMAL_BIAS} : (int32_t)(zbits >> 20) - {layout.bias};
    const uint32_t r = (small ? moved : zbits) & 0xFFFFFu;
    uint32_t h = ((index + (uint32_t)i) ^ seed) * 0x{HASH_MUL1:X}u;
    h = (h ^ (h >> 15)) * 0x{HASH_MUL2:X}u;
    const int32_t magnitude = (k < {layout.last} ? k : {layout.last}) + (((h >> 16) << 4) < r && k < {layout.last});
    codes[i] = (uint8_t)({code});
  }}
}}
""")
        return "".join(parts)

    @property
    def c_arrays(self) -> tuple[str, ...]:
        return "uint8_t", "float"  # the codes, the block scales

    def c_addresses(self, stored: Any) -> list[int] | None:
        codes, scales = stored.codes, stored.scales
        if (codes.dtype != torch.uint8 or not codes.is_contiguous() or scales.dtype != torch.float32
                or not scales.is_contiguous() or scales.numel() != -(-codes.numel() // BLOCK)):
            return None
        return [codes.data_ptr(), scales.data_ptr()]

    def c_block_open(self, arrays: Sequence[str], signed: bool) -> str:
        return f"const float {arrays[0]}_step = {arrays[1]}[blk] / {TOP}f;"

    def c_block_load(self, arrays: Sequence[str], signed: bool) -> str:
        return f"descend_q8_grid_{'s' if signed else 'u'}({arrays[0]}[i]) * {arrays[0]}_step"

    def c_block_store(self, arrays: Sequence[str], signed: bool, values: str, count: str, index: str,
                      seed: str) -> str:
        codes, scales = arrays
        return (f"descend_q8_store_{'s' if signed else 'u'}({values}, {count}, {codes} + b0, {scales} + blk, "
                f"{index}, {seed});")

    def table(self, signed: bool, device: torch.device) -> Tensor:
        """The dynamic code's grid (:func:`~descend.optim._blockwise.dynamic_grid`) on ``device`` (copied there
        once): what :func:`~descend.optim._blockwise.dequantize` looks codes up in."""
        key = (signed, device)
        if key not in self.tables:
            self.tables[key] = dynamic_grid(signed).to(device)
        return self.tables[key]

    @property
    def init_dtype(self) -> torch.dtype:
        return torch.float32

    def parts(self, key: str, p: Tensor) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(key, tuple(p.shape), torch.uint8), (scales_key(key), (-(-p.numel() // BLOCK),), torch.float32)]

    def kept_keys(self, keys: Sequence[str]) -> list[str]:
        return [k for key in keys for k in (key, scales_key(key))]

    def create(self, key: str, value: Tensor, signed: bool) -> dict[str, Tensor]:
        if isinstance(value, DTensor):
            raise ValueError(
                "state_dtype='int8' keeps a scale per block of 256 consecutive values of a parameter, which "
                "FSDP2's shards would cut across: use state_dtype=torch.bfloat16 with FSDP, or DDP"
            )
        codes, scales = quantize(value.float(), "dynamic", signed, stochastic=False)
        return {key: codes, scales_key(key): scales}

    def bind(self, tensors: Sequence[Tensor], signed: Sequence[bool]) -> list[Any]:
        return [Blocks(tensors[2 * i], tensors[2 * i + 1], s) for i, s in enumerate(signed)]

    def map(self, stored: Any, fn: Callable[[Tensor], Tensor]) -> Any:
        return stored._replace(codes=fn(stored.codes))

    def piece(self, stored: Any, start: int, stop: int) -> Any:
        return Blocks(stored.codes.view(-1)[start:stop], stored.scales[start // BLOCK:-(-stop // BLOCK)],
                      stored.signed)

    def contiguous(self, stored: Any) -> bool:
        return stored.codes.is_contiguous()

    def gather(self, stored: list[Any], scratch: Any = None) -> Any:
        return Gathered(stored, scratch)

    def convert(self, saved: Mapping[str, Any], key: str, signed: bool, p: Tensor) -> dict[str, Tensor] | None:
        codes, scales = saved.get(key), saved.get(scales_key(key))
        if torch.is_tensor(codes) and torch.is_tensor(scales) and codes.dtype == torch.uint8:
            return {key: codes.to(device=p.device, copy=True),
                    scales_key(key): scales.to(device=p.device, dtype=torch.float32, copy=True)}
        if not torch.is_tensor(codes) or not codes.is_floating_point():
            return None
        return self.create(key, codes.to(device=p.device, dtype=torch.float32), signed)

    @torch.compiler.disable
    def load(self, stored: Any) -> Any:
        if isinstance(stored, Gathered):
            return TensorList([self.load(b) for b in stored.tensors], stored.scratch)
        return dequantize(stored.codes, stored.scales, "dynamic", stored.signed,
                          table=self.table(stored.signed, stored.codes.device))

    @torch.compiler.disable
    def store_(self, stored: Any, work: Tensor, seed: Tensor | int = 0, offset: int = 0, *,
               lanes: Tensor | None = None, buffers: Sequence[Tensor] | None = None) -> None:
        codes, scales = quantize(work, "dynamic", stored.signed, element_noise(seed, work, offset, lanes))
        stored.codes.copy_(codes)
        stored.scales.copy_(scales)


_BF16 = StochasticBF16()
_INT8 = Blockwise8()

#: The names ``state_dtype`` accepts besides a floating ``torch.dtype`` (and None).
STATE_DTYPES = ("float32", "bfloat16", "float16", "float64", INT8)


def resolve_state_dtype(state_dtype: Any) -> torch.dtype | str | None:
    """An optimizer's ``state_dtype`` as the store takes it: None, a floating ``torch.dtype`` (also by name, e.g.
    ``"bfloat16"``) or ``"int8"``; ``ValueError`` naming the accepted values otherwise."""
    if state_dtype is None or state_dtype == INT8:
        return state_dtype
    if isinstance(state_dtype, str) and state_dtype in STATE_DTYPES:
        return getattr(torch, state_dtype)
    if isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point:
        return state_dtype
    names = ", ".join(map(repr, STATE_DTYPES))
    raise ValueError(f"state_dtype must be None, a floating torch.dtype or one of {names}; got {state_dtype!r}")


@functools.cache
def store_for(state_dtype: torch.dtype | str | None) -> Store:
    """The store of an optimizer's ``state_dtype`` (None: the parameter's dtype; ``"int8"``: 8-bit blocks);
    one object per dtype (a compiled step specialises on it)."""
    if state_dtype == INT8:
        return _INT8
    return _BF16 if state_dtype == torch.bfloat16 else Store(state_dtype)  # type: ignore[arg-type]


class NoisePositions:
    """Where each parameter's rounding noise comes from: ``(ordinal, offset)``.

    The ordinal is the parameter's position among the optimizer's parameters (over all groups), the
    offset the flat index of its first element. A parameter in a flat buffer (``flat=True``) takes the
    buffer's ordinal and its offset in the buffer, so stepping it alone draws the noise that stepping
    the whole buffer draws. A sharded parameter (DTensor) steps its local shard, whose offset is where the
    shard starts in the whole tensor: each element draws the noise it draws unsharded.
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
        return self.ordinals[p], shard_offset(p)


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
    return rounding_seeds(step.cpu(), ordinals, PARAM_SLOT).to(device)


def param_store() -> StochasticBF16:
    """How a bfloat16 parameter's new value is stored (and its C: ``c_load``, ``c_store``, ``c_helpers``): as
    bfloat16 state is."""
    return _BF16
