"""``TensorList``: many same-dtype tensors that do arithmetic together, through ``torch._foreach_*``.

The update rules (:mod:`descend.optim._rules`) are written for one tensor. A ``TensorList`` answers
every operator, method and ``torch`` function those rules use (``+ - * /``, unary minus, ``abs``,
``sqrt``, ``lerp_``, ``mul_``, ``add_``, ``copy_``, ``clamp_``, ``to``, ``torch.sign``,
``torch.lerp``, ``torch.maximum(out=)``) with one multi-tensor kernel launch for the whole list, so
the *same* ``Rule.update`` runs over every parameter of a bucket at once.

``torch`` functions reach the class through ``__torch_function__`` (torch's protocol for
tensor-like objects), so ``torch.sign(u)`` in a rule becomes ``torch._foreach_sign(u.tensors)``.
Scalars may be Python numbers or 0-d tensors (one value for the whole list).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

Operand = "TensorList | Tensor | float | int"


class TensorList:
    """A list of tensors of one dtype and device, with elementwise arithmetic over all of them.

    Args:
        tensors: the tensors (any shapes); they are not copied, so in-place methods act on them.
    """

    __slots__ = ("tensors",)

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors: list[Tensor] = list(tensors)

    # -- what rules read ---------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[0].dtype if self.tensors else torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device if self.tensors else torch.device("cpu")

    def __len__(self) -> int:
        return len(self.tensors)

    def __repr__(self) -> str:
        return f"TensorList({len(self.tensors)} tensors, dtype={self.dtype})"

    def to(self, dtype: torch.dtype) -> TensorList:
        """``self`` when the dtype already matches (no copy, as ``Tensor.to``), else converted copies."""
        if all(t.dtype == dtype for t in self.tensors):
            return self
        return TensorList([t.to(dtype) for t in self.tensors])

    # -- out-of-place arithmetic ------------------------------------------------------------------
    def _binary(self, other: Any, op: Callable[..., list[Tensor]]) -> TensorList:
        other = other.tensors if isinstance(other, TensorList) else other
        return TensorList(op(self.tensors, other))

    def __add__(self, other: Any) -> TensorList:
        return self._binary(other, torch._foreach_add)

    __radd__ = __add__

    def __sub__(self, other: Any) -> TensorList:
        return self._binary(other, torch._foreach_sub)

    def __rsub__(self, other: Any) -> TensorList:
        return TensorList(torch._foreach_add(torch._foreach_neg(self.tensors), other))

    def __mul__(self, other: Any) -> TensorList:
        return self._binary(other, torch._foreach_mul)

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> TensorList:
        return self._binary(other, torch._foreach_div)

    def __rtruediv__(self, other: Any) -> TensorList:
        out = torch._foreach_reciprocal(self.tensors)
        torch._foreach_mul_(out, other)
        return TensorList(out)

    def __neg__(self) -> TensorList:
        return TensorList(torch._foreach_neg(self.tensors))

    def abs(self) -> TensorList:
        return TensorList(torch._foreach_abs(self.tensors))

    def sqrt(self) -> TensorList:
        return TensorList(torch._foreach_sqrt(self.tensors))

    def float(self) -> TensorList:
        return self.to(torch.float32)

    # -- in-place methods (return self, as Tensor's do) --------------------------------------------
    def add_(self, other: Any, *, alpha: float | None = None) -> TensorList:
        other = other.tensors if isinstance(other, TensorList) else other
        if alpha is None:
            torch._foreach_add_(self.tensors, other)
        else:
            torch._foreach_add_(self.tensors, other, alpha=alpha)
        return self

    def sub_(self, other: Any) -> TensorList:
        torch._foreach_sub_(self.tensors, other.tensors if isinstance(other, TensorList) else other)
        return self

    def mul_(self, other: Any) -> TensorList:
        torch._foreach_mul_(self.tensors, other.tensors if isinstance(other, TensorList) else other)
        return self

    def div_(self, other: Any) -> TensorList:
        torch._foreach_div_(self.tensors, other.tensors if isinstance(other, TensorList) else other)
        return self

    def lerp_(self, end: TensorList, weight: Any) -> TensorList:
        torch._foreach_lerp_(self.tensors, end.tensors, weight)
        return self

    def copy_(self, src: TensorList) -> TensorList:
        torch._foreach_copy_(self.tensors, src.tensors)
        return self

    def clamp_(self, min: Any = None, max: Any = None) -> TensorList:
        if min is not None:
            torch._foreach_clamp_min_(self.tensors, min)
        if max is not None:
            torch._foreach_clamp_max_(self.tensors, max)
        return self

    # -- torch functions ----------------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        impl = _TORCH_FUNCTIONS.get(func)
        if impl is None:
            name = getattr(func, "__name__", repr(func))
            raise TypeError(f"TensorList does not implement torch.{name}; the foreach engine supports "
                            f"{sorted(f.__name__ for f in _TORCH_FUNCTIONS)} (use engine='reference' or "
                            "write the rule with those)")
        return impl(*args, **kwargs)


def _sign(x: TensorList) -> TensorList:
    return TensorList(torch._foreach_sign(x.tensors))


def _lerp(start: TensorList, end: TensorList, weight: Any) -> TensorList:
    return TensorList(torch._foreach_lerp(start.tensors, end.tensors, weight))


def _maximum(a: TensorList, b: TensorList, *, out: TensorList | None = None) -> TensorList:
    if out is None:
        return TensorList(torch._foreach_maximum(a.tensors, b.tensors))
    if out is a:
        torch._foreach_maximum_(a.tensors, b.tensors)
    elif out is b:
        torch._foreach_maximum_(b.tensors, a.tensors)
    else:
        torch._foreach_copy_(out.tensors, torch._foreach_maximum(a.tensors, b.tensors))
    return out


def _abs(x: TensorList) -> TensorList:
    return x.abs()


def _sqrt(x: TensorList) -> TensorList:
    return x.sqrt()


_TORCH_FUNCTIONS: dict[Any, Callable[..., Any]] = {
    torch.sign: _sign,
    torch.lerp: _lerp,
    torch.maximum: _maximum,
    torch.abs: _abs,
    torch.sqrt: _sqrt,
}
