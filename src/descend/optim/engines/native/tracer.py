"""Symbols a rule's tensor code runs on to write one C loop: :class:`Element`, :class:`State`, :class:`Scalar`.

The rules are written once, as tensor code (:meth:`Rule.update <descend.optim.rules.base.Rule.update>`).
To run a chain natively, :func:`~descend.optim.engines.native.emit.trace_chain` calls those same
methods on *symbols* instead of tensors: every arithmetic operation, ``torch.sign``, ``torch.lerp``,
``lerp_``, ``mul_``, ``add_``, ``sqrt``, ``abs``, ``torch.maximum(..., out=)`` records one line of C,
and an in-place operation on a state symbol rebinds that state's variable.

Hyperparameters enter as ``double`` scalars, combined in double precision outside the loop and
converted to ``float`` where they meet the elements, as the tensor code does. ``lerp`` uses torch's
formula (``start + w·(end − start)`` for ``|w| < 0.5``, else ``end − (1 − w)·(end − start)``, both as
one fused multiply-add, as torch's vectorised kernel computes it); nothing else is contracted
(``-ffp-contract=off``), so every other operation rounds as torch's does. A rule that uses an
operation the tracer does not know raises :class:`NotTraceable`, and the engine runs that chain
another way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


class NotTraceable(TypeError):
    """A rule did something the native tracer cannot express (the engine then runs the chain another way)."""


def _literal(x: float) -> str:
    if math.isnan(x):
        return "NAN"
    if math.isinf(x):
        return "HUGE_VAL" if x > 0 else "(-HUGE_VAL)"
    return repr(float(x))


class Code:
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
    """A C variable (``name``) of the loop being written (``code``), with Python's arithmetic operators, each
    one line of C through ``_binary`` (``reflected``: ``other op self``)."""

    def __init__(self, code: Code, name: str) -> None:
        self.code, self.name = code, name

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


def symbolic_hyper(code: Code, shape: tuple[Any, ...], first: int) -> tuple[dict[str, Any], int]:
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
