"""Native kernels: a chain's step as one C loop, generated from the rules themselves.

The rules are written once, as tensor code (:meth:`Rule.update <descend.optim._rules.Rule.update>`).
To run a chain natively, :func:`trace_chain` calls those same methods on *symbols* instead of
tensors: every arithmetic operation, ``torch.sign``, ``torch.lerp``, ``lerp_``, ``mul_``, ``add_``,
``sqrt``, ``abs``, ``torch.maximum(..., out=)`` records one line of C, and an in-place operation
on a state symbol rebinds that state's variable. The result is the body of a loop over elements:

    load w, g and the state;  u = g (−g when maximising);  for each rule: u = rule(u, w, state)
    w = keep·w + u;  store w and the state

Hyperparameters enter as ``double`` scalars, combined in double precision outside the loop and
converted to ``float`` where they meet the elements, as the tensor code does. ``lerp`` uses torch's
formula (``start + w·(end − start)`` for ``|w| < 0.5``, else ``end − (1 − w)·(end − start)``, both as
one fused multiply-add, as torch's vectorised kernel computes it); nothing else is contracted
(``-ffp-contract=off``), so every other operation rounds as torch's does.

The loop runs over every tensor of a bucket in one call (OpenMP threads share the elements), on
float32 CPU tensors; state may be bfloat16, widened on load and rounded stochastically on store.
The C source is compiled once per machine with the system C compiler (``$CC``, split as a shell
splits it, else ``cc``) and cached by its hash under ``$DESCEND_CACHE_DIR`` (default
``~/.cache/descend/kernels``; never a directory other users can write to); a process that finds the
library there loads it only if its bytes match the SHA-256 sealed onto it when it was built. A rule
that uses an operation the tracer does not know raises :class:`NotTraceable`, and the engine runs
that chain another way.
"""

from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from descend._io import atomic_write, umask_mode

__all__ = ["Kernel", "NotTraceable", "compile_kernel", "flatten_hyper", "kernel_cache_dir", "trace_chain"]


#: Fewest elements (over a bucket's tensors) for which the loop uses more than the calling thread, as
#: torch's own ``at::parallel_for`` grain: below it, waking threads costs more than the work (and the
#: woken threads' spinning shows as CPU time).
PARALLEL_MIN = 32768


class NotTraceable(TypeError):
    """A rule did something the native tracer cannot express (the engine then runs the chain another way)."""


def _literal(x: float) -> str:
    if math.isnan(x):
        return "NAN"
    if math.isinf(x):
        return "HUGE_VAL" if x > 0 else "(-HUGE_VAL)"
    return repr(float(x))


class _Code:
    """The C being written: scalar lines (before the loop) and element lines (its body)."""

    def __init__(self) -> None:
        self.prologue: list[str] = []
        self.body: list[str] = []
        self.count = 0
        self.floats: dict[str, str] = {}  # double scalar name -> its float copy

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def scalar(self, expr: str) -> Scalar:
        name = self.fresh("d")
        self.prologue.append(f"const double {name} = {expr};")
        return Scalar(self, name)

    def element(self, expr: str) -> Element:
        name = self.fresh("t")
        self.body.append(f"const float {name} = {expr};")
        return Element(self, name)

    def as_float(self, value: Any) -> str:
        """An operand of element arithmetic: a float variable, or a scalar converted once, outside the loop."""
        if isinstance(value, Element):
            return value.name
        if isinstance(value, Scalar):
            if value.name not in self.floats:
                name = self.fresh("f")
                self.prologue.append(f"const float {name} = (float){value.name};")
                self.floats[value.name] = name
            return self.floats[value.name]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"(float){_literal(float(value))}"
        raise NotTraceable(f"the native tracer cannot use a {type(value).__name__} here")


class _Operand:
    """Python's arithmetic operators, each one line of C through ``_binary`` (``reflected``: ``other op self``)."""

    def _binary(self, op: str, other: Any, reflected: bool = False) -> Any:
        raise NotImplementedError

    def __add__(self, o: Any) -> Any:
        return self._binary("+", o)

    def __radd__(self, o: Any) -> Any:
        return self._binary("+", o, True)

    def __sub__(self, o: Any) -> Any:
        return self._binary("-", o)

    def __rsub__(self, o: Any) -> Any:
        return self._binary("-", o, True)

    def __mul__(self, o: Any) -> Any:
        return self._binary("*", o)

    def __rmul__(self, o: Any) -> Any:
        return self._binary("*", o, True)

    def __truediv__(self, o: Any) -> Any:
        return self._binary("/", o)

    def __rtruediv__(self, o: Any) -> Any:
        return self._binary("/", o, True)


class Scalar(_Operand):
    """A hyperparameter, or an expression of hyperparameters: a ``double`` computed outside the loop."""

    def __init__(self, code: _Code, name: str) -> None:
        self.code, self.name = code, name

    def _operand(self, other: Any) -> str:
        if isinstance(other, Scalar):
            return other.name
        if isinstance(other, (int, float)) and not isinstance(other, bool):
            return _literal(float(other))
        raise NotTraceable(f"the native tracer cannot combine a hyperparameter with a {type(other).__name__}")

    def _binary(self, op: str, other: Any, reflected: bool = False) -> Any:
        if isinstance(other, Element):
            return other._binary(op, self, reflected=not reflected)
        a, b = self.name, self._operand(other)
        return self.code.scalar(f"({b} {op} {a})" if reflected else f"({a} {op} {b})")

    def __neg__(self) -> Scalar:
        return self.code.scalar(f"(-{self.name})")

    def __float__(self) -> float:
        raise NotTraceable("a rule converted a hyperparameter to a Python number inside update()")

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        return Element.__torch_function__(func, types, args, kwargs)  # a hyperparameter as a torch argument

    __bool__ = __float__  # type: ignore[assignment]


class Element(_Operand):
    """One element of a float32 tensor inside the loop (a C ``float``)."""

    dtype = torch.float32

    def __init__(self, code: _Code, name: str) -> None:
        self.code, self.name = code, name

    # -- value operations ---------------------------------------------------------------------
    def _binary(self, op: str, other: Any, reflected: bool = False) -> Element:
        a, b = self.name, self.code.as_float(other)
        return self.code.element(f"{b} {op} {a}" if reflected else f"{a} {op} {b}")

    def __neg__(self) -> Element:
        return self.code.element(f"-{self.name}")

    def abs(self) -> Element:
        return self.code.element(f"fabsf({self.name})")

    def sqrt(self) -> Element:
        return self.code.element(f"sqrtf({self.name})")

    def sign(self) -> Element:
        x = self.name  # as torch.sign: (0 < x) - (x < 0), so +0 for -0 and for NaN
        return self.code.element(f"(float)({x} > 0.0f) - (float)({x} < 0.0f)")

    def lerp(self, end: Any, weight: Any) -> Element:
        start, stop = self.name, self.code.as_float(end)
        w = self.code.as_float(weight)
        diff = self.code.element(f"{stop} - {start}").name
        if isinstance(weight, Element):
            small = f"fabsf({w}) < 0.5f"
            return self.code.element(f"{small} ? fmaf({w}, {diff}, {start}) : fmaf({w} - 1.0f, {diff}, {stop})")
        # a scalar weight: which form applies is decided once, outside the loop; per element one fma
        small, coeff = self.code.fresh("k"), self.code.fresh("c")
        self.code.prologue += [f"const int {small} = fabsf({w}) < 0.5f;",
                               f"const float {coeff} = {small} ? {w} : {w} - 1.0f;"]
        return self.code.element(f"fmaf({coeff}, {diff}, {small} ? {start} : {stop})")

    def maximum(self, other: Any) -> Element:
        o = self.code.as_float(other)  # torch.maximum propagates NaN
        return self.code.element(f"({self.name} != {self.name} || {o} != {o}) ? NAN : fmaxf({self.name}, {o})")

    def to(self, *args: Any, **kwargs: Any) -> Element:
        dtype = kwargs.get("dtype", args[0] if args else None)
        if dtype not in (None, torch.float32) or kwargs.get("device") is not None:
            raise NotTraceable(f"the native tracer runs float32 only; a rule asked for {dtype}")
        return self

    def float(self) -> Element:
        return self

    def _new(self, value: Element) -> Element:
        """An in-place operation's result: a state rebinds its variable; a value cannot be written."""
        raise NotTraceable("a rule modified a value in place that is not optimizer state")

    def lerp_(self, end: Any, weight: Any) -> Element:
        return self._new(self.lerp(end, weight))

    def mul_(self, other: Any) -> Element:
        return self._new(self * other)

    def div_(self, other: Any) -> Element:
        return self._new(self / other)

    def sub_(self, other: Any) -> Element:
        return self._new(self - other)

    def clamp(self, min: Any = None, max: Any = None) -> Element:  # torch's argument names
        out = self
        if min is not None:  # NaN stays NaN, as torch.clamp
            lo = self.code.as_float(min)
            out = self.code.element(f"{out.name} < {lo} ? {lo} : {out.name}")
        if max is not None:
            hi = self.code.as_float(max)
            out = self.code.element(f"{out.name} > {hi} ? {hi} : {out.name}")
        return out

    def clamp_(self, min: Any = None, max: Any = None) -> Element:
        return self._new(self.clamp(min, max))

    def add_(self, other: Any, *, alpha: Any = None) -> Element:
        return self._new(self + (other if alpha is None else other * alpha))

    def copy_(self, other: Any) -> Element:
        return self._new(other if isinstance(other, Element) else self.code.element(self.code.as_float(other)))

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = dict(kwargs or {})
        out = kwargs.pop("out", None)
        if func is torch.sign and not kwargs:
            result = _as_element(args[0]).sign()
        elif func is torch.lerp and not kwargs:
            result = _as_element(args[0]).lerp(args[1], args[2])
        elif func is torch.maximum and not kwargs:
            result = _as_element(args[0]).maximum(args[1])
        elif func is torch.abs and not kwargs:
            result = _as_element(args[0]).abs()
        elif func is torch.sqrt and not kwargs:
            result = _as_element(args[0]).sqrt()
        else:
            raise NotTraceable(f"the native tracer does not know {getattr(func, '__name__', func)}")
        if out is None:
            return result
        if not isinstance(out, State):
            raise NotTraceable("out= must be optimizer state")
        return out._new(result)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # protocol probes (hasattr(x, "__index__"), copy, pickle): plain absence
            raise AttributeError(name)
        raise NotTraceable(f"the native tracer does not know Tensor.{name}")

    def __bool__(self) -> bool:
        raise NotTraceable("a rule branched on a tensor's value")


class State(Element):
    """A state tensor's element: loaded before the rules run, stored after; in-place ops rebind it."""

    def _new(self, value: Element) -> Element:
        self.name = value.name
        return self


def _as_element(x: Any) -> Element:
    if not isinstance(x, Element):
        raise NotTraceable(f"the native tracer expected a tensor, got {type(x).__name__}")
    return x


# ------------------------------------------------------------------------------------------------
# hyperparameters
# ------------------------------------------------------------------------------------------------


def flatten_hyper(hp: dict[str, Any], static: tuple[str, ...]) -> tuple[list[float], tuple[Any, ...]]:
    """``hp``'s numbers in order (0-d tensors read as numbers) and its shape: static values, tuple lengths.

    Raises :class:`NotTraceable` for a value that is neither a number, a 0-d tensor nor a tuple of them.
    """
    numbers: list[float] = []
    return numbers, tuple((key, _shape(key, value, key in static, numbers)) for key, value in hp.items())


def _shape(key: str, value: Any, static: bool, numbers: list[float]) -> Any:
    """The shape of one hyperparameter's value; its numbers appended to ``numbers``."""
    if static or isinstance(value, bool):
        return ("static", value)
    if isinstance(value, (int, float)):
        numbers.append(float(value))
        return "number"
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        numbers.append(float(value))
        return "number"
    if isinstance(value, tuple):
        return tuple(_shape(key, v, False, numbers) for v in value)
    raise NotTraceable(f"hyperparameter {key}={value!r} is not a number")


def _symbolic_hyper(code: _Code, shape: tuple[Any, ...], first: int) -> tuple[dict[str, Any], int]:
    """Hyperparameters as scalar symbols ``s[first], s[first+1], ...`` in :func:`flatten_hyper`'s order."""
    index = first

    def build(kind: Any) -> Any:
        nonlocal index
        if kind == "number":
            name = f"s{index}"
            code.prologue.append(f"const double {name} = s[{index}];")
            index += 1
            return Scalar(code, name)
        if isinstance(kind, tuple) and len(kind) == 2 and kind[0] == "static":
            return kind[1]
        return tuple(build(k) for k in kind)

    return {key: build(kind) for key, kind in shape}, index


# ------------------------------------------------------------------------------------------------
# tracing and code
# ------------------------------------------------------------------------------------------------


#: bfloat16 state: widened to float32 on load; on store rounded stochastically with the noise of
#: :func:`descend.optim.engines.store.element_noise` (the same bits every engine draws for the element).
_BF16 = """
static inline float descend_bf16_load(uint16_t b) {
  const uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint16_t descend_bf16_round(float x, uint32_t index, uint32_t seed) {
  if (x != x) return 0x7FC0;  /* a NaN, as torch converts one */
  uint32_t h = (index ^ seed) * 0x7FEB352Du;
  h = (h ^ (h >> 15)) * 0x846CA68Bu;
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return (uint16_t)(((u + (h >> 16)) & 0xFFFF0000u) >> 16);
}
"""


def trace_chain(rules: Sequence[Any], state_keys: Sequence[Sequence[str]], shapes: Sequence[tuple[Any, ...]],
                maximize: bool, decays: bool, bf16_state: bool = False) -> str:
    """The C source of the chain's step for one bucket layout.

    Args:
        rules: the live update rules, in order.
        state_keys: per rule, the names of its state tensors (the order of the pointers per tensor).
        shapes: per rule, its hyperparameters' shape from :func:`flatten_hyper` (scalars come in that order).
        maximize: whether the step ascends (``u = -g``).
        decays: whether ``keep`` (decoupled decay) is the last scalar, applied as ``w <- keep*w + u``.
        bf16_state: the state tensors are bfloat16: the rules run on their float32 values, which are
            written back rounded stochastically (seed per tensor and state slot, ``offsets[t] + i`` the
            element's index), as :func:`descend.optim.engines.store.write_back_` does.
    """
    code = _Code()
    w = Element(code, "w")
    g = Element(code, "g")
    u: Any = -g if maximize else g
    loads, stores, index = [], [], 0
    slot = 2
    for rule, names, shape in zip(rules, state_keys, shapes):
        hp, index = _symbolic_hyper(code, shape, index)
        state = {}
        for name in names:
            var = f"m{slot}"
            loads.append(f"const float {var} = descend_bf16_load(P{slot}[i]);" if bf16_state
                         else f"const float {var} = P{slot}[i];")
            state[name] = State(code, var)
            slot += 1
        u = rule.update(u, w, state, hp, None)
        if not isinstance(u, Element):
            raise NotTraceable(f"{rule.name}.update returned a {type(u).__name__}")
        stores += [(f"P{slot - len(names) + j}", state[name]) for j, name in enumerate(names)]
    states = slot - 2

    def store(pointer: str, value: Element, k: int) -> str:
        if not bf16_state:
            return f"{pointer}[i] = {value.name};"
        return f"{pointer}[i] = descend_bf16_round({value.name}, (uint32_t)(offset + i), seeds[t * {states} + {k}]);"

    if decays:
        keep = Scalar(code, f"s{index}")
        code.prologue.append(f"const double s{index} = s[{index}];")
        index += 1
        w_new = code.element(f"{code.as_float(keep)} * w")._binary("+", u)
    else:
        w_new = w + u
    pointers = slot
    lines = [
        "#include <math.h>",
        "#include <stdint.h>",
        "#include <string.h>",
        "#ifdef _OPENMP",
        "#include <omp.h>",
        "#endif",
        "",
        "/* The tensors' elements, end to end, are cut into one contiguous range per thread (at multiples",
        "   of 16 elements, so no two threads write one cache line); each thread walks its range. A small",
        "   bucket runs on the calling thread alone: waking others would cost more than its work. */",
        *(_BF16.splitlines() if bf16_state else []),
        "void descend_step(int64_t count, void *const *ptrs, const int64_t *sizes, const double *s, int threads,",
        "                  const int64_t *offsets, const uint32_t *seeds, void *counters, int64_t ncounters,",
        "                  int counters_double) {",
        "  /* the bucket's step counters, +1 (float32, or float64 where that is torch's default dtype) */",
        "  for (int64_t c = 0; c < ncounters; c++) {",
        "    if (counters_double) ((double *)counters)[c] += 1.0; else ((float *)counters)[c] += 1.0f;",
        "  }",
        *(f"  {line}" for line in code.prologue),
        "  int64_t total = 0;",
        "  for (int64_t t = 0; t < count; t++) total += sizes[t];",
        f"  #pragma omp parallel num_threads(threads) if(total >= {PARALLEL_MIN})",
        "  {",
        "#ifdef _OPENMP",
        "    const int64_t id = omp_get_thread_num(), nt = omp_get_num_threads();",
        "#else",
        "    const int64_t id = 0, nt = 1;",
        "#endif",
        "    const int64_t lo = (total * id / nt) & ~(int64_t)15;",
        "    const int64_t hi = id == nt - 1 ? total : (total * (id + 1) / nt) & ~(int64_t)15;",
        "    int64_t base = 0;",
        "    for (int64_t t = 0; t < count && base < hi; base += sizes[t], t++) {",
        "      const int64_t n = sizes[t];",
        "      if (base + n <= lo) continue;",
        "      const int64_t start = lo > base ? lo - base : 0, stop = hi < base + n ? hi - base : n;",
        f"      float *restrict P0 = ptrs[t * {pointers}];",
        f"      const float *restrict P1 = ptrs[t * {pointers} + 1];",
        *(f"      {'uint16_t' if bf16_state else 'float'} *restrict P{k} = ptrs[t * {pointers} + {k}];"
          for k in range(2, pointers)),
        *(["      const int64_t offset = offsets[t];"] if bf16_state else []),
        "      for (int64_t i = start; i < stop; i++) {",
        "        const float w = P0[i];",
        "        const float g = P1[i];",
        *(f"        {line}" for line in loads),
        *(f"        {line}" for line in code.body),
        *(f"        {store(ptr, value, k)}" for k, (ptr, value) in enumerate(stores)),
        f"        P0[i] = {w_new.name};",
        "      }",
        "    }",
        "  }",
        "}",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# compiling and loading
# ------------------------------------------------------------------------------------------------


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept: ``$DESCEND_CACHE_DIR`` or ``$XDG_CACHE_HOME/descend`` (``~/.cache``)."""
    root = os.environ.get("DESCEND_CACHE_DIR")
    if root:
        return Path(root) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "descend" / "kernels"


@functools.cache
def _machine_tag() -> str:
    """The CPU the kernels are built for (``-march=native``): its model and instruction-set flags."""
    text = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    text += line
                if line.strip() == "":
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.system()}|{text}"


def _compiler() -> list[str] | None:
    """The C compiler's command: ``$CC`` split as a shell splits it (``CC="gcc -O2"``), else cc, gcc or clang."""
    configured = shlex.split(os.environ.get("CC", ""))
    if configured:
        return configured
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return [found] if found else None


_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]
#: Tried in order: this CPU's instruction set (full-width vectors on x86), then the portable build.
_TUNING = [["-march=native", "-mprefer-vector-width=512"] if platform.machine().lower() in ("x86_64", "amd64")
           else ["-mcpu=native"], []]
_lock = threading.Lock()
logger = logging.getLogger("descend.optim")


def _as_array(values: Sequence[Any], typecode: str) -> array.array:
    """``values`` as an ``array`` of ``typecode`` (``"q"`` int64, ``"d"`` double), as they are if they are one."""
    return values if isinstance(values, array.array) and values.typecode == typecode else array.array(typecode, values)


class Kernel:
    """A loaded native step: ``kernel(pointers, sizes, scalars)`` over ``count`` tensors."""

    def __init__(self, path: Path, pointers: int) -> None:
        self.library = ctypes.CDLL(str(path))
        self.function = self.library.descend_step
        self.function.restype = None
        self.function.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
        self.pointers = pointers  # per tensor: w, g, then the state tensors
        self.path = path

    def __call__(self, pointers: Sequence[int], sizes: Sequence[int], scalars: Sequence[float],
                 offsets: Sequence[int] | None = None, seeds: torch.Tensor | None = None,
                 counters: torch.Tensor | None = None) -> None:
        """Step ``len(sizes)`` tensors: ``pointers`` holds, per tensor, the addresses of ``w``, ``g`` and its
        state (contiguous, ``sizes[t]`` elements each); ``scalars`` the hyperparameters in trace order.

        With bfloat16 state: ``offsets[t]``, the flat index of tensor ``t``'s first element in what its
        rounding noise is drawn over, and ``seeds`` (int32 ``[count, states]``, contiguous) its seeds.
        ``counters`` (a contiguous float32 or float64 CPU tensor: step counters) is incremented by 1
        first, in the same call.
        """
        if len(pointers) != self.pointers * len(sizes):
            raise ValueError(f"expected {self.pointers} pointers per tensor, got {len(pointers)} for {len(sizes)}")
        ptrs, counts = _as_array(pointers, "q"), _as_array(sizes, "q")
        values = _as_array(scalars or [0.0], "d")  # a chain without hyperparameters still passes one
        starts = _as_array(offsets, "q") if offsets is not None else None
        if seeds is not None and (seeds.dtype != torch.int32 or not seeds.is_contiguous()
                                  or seeds.numel() != len(counts) * (self.pointers - 2)):
            raise ValueError("seeds must be a contiguous int32 tensor of one seed per tensor and state")
        wide = False
        if counters is not None:
            wide = counters.dtype == torch.float64
            if not (wide or counters.dtype == torch.float32) or not counters.is_contiguous() or not counters.is_cpu:
                raise ValueError("counters must be a contiguous float32 or float64 CPU tensor")
        self.function(len(counts), ptrs.buffer_info()[0], counts.buffer_info()[0], values.buffer_info()[0],
                      torch.get_num_threads(), starts.buffer_info()[0] if starts is not None else None,
                      seeds.data_ptr() if seeds is not None else None,
                      counters.data_ptr() if counters is not None else None,
                      counters.numel() if counters is not None else 0, wide)


def compile_kernel(source: str, pointers: int) -> Kernel:
    """Compile ``source`` (or load it from the cache) and return the kernel.

    A cached library is loaded only if its bytes match the SHA-256 written after them when it was
    built (:func:`_sealed`), and it exports the step; one that does not (truncated, damaged, from
    elsewhere) is built again, and the log says so once. A cache directory that is not this user's
    alone is not used (logged, with the reason), nor one that cannot be written to when a kernel must
    be stored there: the private directory under the temporary directory takes their place.

    Raises ``RuntimeError`` (one line, with the compiler's first error) when no C compiler works.
    """
    command = _compiler()
    if command is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    flags = [*_FLAGS, *(f for tuning in _TUNING for f in tuning)]
    key = "\0".join([_FORMAT, source, *command, *flags, _machine_tag()])
    name = f"step_{hashlib.sha256(key.encode()).hexdigest()[:24]}.so"
    with _lock:
        directories = list(_cache_directories())
        for directory in directories:
            kernel = _cached(directory / name, pointers)
            if kernel is not None:
                return kernel
        kernel, binary = _build(command, source, pointers)
        for directory in directories:
            try:
                atomic_write(directory / name, _sealed(binary), mode=umask_mode() & ~0o022)
                return kernel
            except OSError as err:  # e.g. a read-only cache: the next directory
                _log_once(f"descend: cannot store compiled kernels in {directory} ({err})")
        _log_once("descend: no cache directory can be written to; compiled kernels are rebuilt in each process")
        return kernel


#: Bumped when what the cache holds changes form (a library without the seal is never looked up).
_FORMAT = "sealed-1"
#: What precedes the hex SHA-256 of the library's bytes appended to each cached library.
_SEAL = b"\0descend-sha256:"
_SEAL_LENGTH = len(_SEAL) + 64
_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


def _sealed(binary: bytes) -> bytes:
    """The library as cached: its bytes, then the SHA-256 of those bytes (the loader ignores what
    follows the sections an ELF or Mach-O file describes)."""
    return binary + _SEAL + hashlib.sha256(binary).hexdigest().encode()


def _seal_broken(data: bytes) -> str | None:
    """Why a cached file is not the library that was built and sealed, or None if it is."""
    body, seal = data[:-_SEAL_LENGTH], data[-_SEAL_LENGTH:]
    if len(data) <= _SEAL_LENGTH or not seal.startswith(_SEAL):
        return "carries no record of what was built (truncated or not written by descend)"
    if hashlib.sha256(body).hexdigest().encode() != seal[len(_SEAL):]:
        return "does not match the SHA-256 recorded when it was built (damaged)"
    return None


def _cached(path: Path, pointers: int) -> Kernel | None:
    """The kernel at ``path`` if it is there, this user's alone and what was built; None otherwise (a
    present file that is not is logged, once)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        why: str | None = f"cannot be read ({err})"
    else:
        why = _refusal(path) or _seal_broken(data)
    if why is None:
        try:
            return Kernel(path, pointers)
        except (OSError, AttributeError) as err:  # not a library here, or one without the step
            why = f"does not load ({err})"
    _log_once(f"descend: the compiled kernel {path} {why}; building it again")
    return None


def _cache_directories() -> Iterator[Path]:
    """The cache directory, then a private one under the temporary directory; a directory this user does
    not own alone is skipped, and the log says why (once)."""
    user = os.getuid() if hasattr(os, "getuid") else os.getpid()
    for directory in (kernel_cache_dir(), Path(tempfile.gettempdir()) / f"descend-kernels-{user}"):
        why = _refusal(directory, create=True)
        if why is None:
            yield directory
        else:
            _log_once(f"descend: not keeping compiled kernels in {directory}: {why}")


def _refusal(path: Path, create: bool = False) -> str | None:
    """Why ``path`` cannot hold libraries this process loads, or None: it must belong to this user and no
    other user may write to it (a library loaded from there runs as this user). ``create``: make the
    directory (mode 0700) if it is missing."""
    try:
        if create and not path.exists():
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = path.stat()
    except OSError as err:
        return f"it cannot be created or read ({err})"
    if hasattr(os, "getuid") and status.st_uid != os.getuid():
        return f"it belongs to user {status.st_uid}, not to this user"
    if status.st_mode & 0o022:
        return f"other users can write to it (mode {stat.S_IMODE(status.st_mode):o})"
    return None


def _build(command: list[str], source: str, pointers: int) -> tuple[Kernel, bytes]:
    """Compile ``source``; the kernel, loaded from what the compiler wrote, and the library's bytes."""
    with tempfile.TemporaryDirectory(prefix="descend-kernel-") as tmp:
        c_file, library = Path(tmp) / "step.c", Path(tmp) / "step.so"
        c_file.write_text(source)
        errors = ""
        # without OpenMP (e.g. clang lacking libomp) the loop runs on one thread
        for tuning, openmp in [(t, o) for t in _TUNING for o in (["-fopenmp"], [])]:
            try:
                result = subprocess.run([*command, *_FLAGS, *tuning, *openmp, str(c_file), "-o", str(library), "-lm"],
                                        capture_output=True, text=True)
            except OSError as err:  # the compiler is not there or cannot run
                raise RuntimeError(f"the C compiler {shlex.join(command)!r} cannot run ({err})") from err
            if result.returncode != 0:
                errors = errors or (result.stderr.strip().splitlines() or ["(no message)"])[0]
                continue
            binary = library.read_bytes()
            # named by its content: the loader takes a name it has loaded before for that library again
            loaded = library.rename(Path(tmp) / f"{hashlib.sha256(binary).hexdigest()}.so")
            try:
                return Kernel(loaded, pointers), binary
            except (OSError, AttributeError) as err:
                errors = errors or f"the library it built does not load ({err})"
    raise RuntimeError(f"the C compiler could not build a native optimizer step: {errors}")
