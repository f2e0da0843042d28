"""``TensorList``: many same-dtype tensors that do arithmetic together, through ``torch._foreach_*``.

The update rules (:mod:`descend.optim.rules.base`) are written for one tensor. A ``TensorList`` answers
every operator, method and ``torch`` function those rules use (``+ - * /``, unary minus, ``abs``,
``sqrt``, ``lerp_``, ``mul_``, ``add_``, ``copy_``, ``clamp_``, ``to``, ``torch.sign``,
``torch.lerp``, ``torch.maximum(out=)``) with one multi-tensor kernel launch for the whole list, so
the *same* ``Rule.update`` runs over every parameter of a bucket at once.

``torch`` functions reach the class through ``__torch_function__`` (torch's protocol for
tensor-like objects), so ``torch.sign(u)`` in a rule becomes ``torch._foreach_sign(u.tensors)``.
Scalars may be Python numbers or 0-d tensors (one value for the whole list).
Out-of-place results come from ``torch._foreach_*`` (fresh tensors), or from a :class:`Scratch`'s buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

Operand = "TensorList | Tensor | float | int"


class Scratch:
    """Reusable buffers for a ``TensorList``'s temporaries, ``limit`` elements each.

    :meth:`take` hands out the next free buffer (carved into views shaped like the given tensors);
    :meth:`reset` makes every buffer free again. The owner calls ``reset`` before each piece of
    work whose temporaries are all dead by the next ``reset``, so the scratch holds at most as many
    buffers as one piece has temporaries alive at once, however many pieces there are.

    Writing into a scratch buffer costs one ``torch.<op>(..., out=)`` call per tensor, against one
    ``torch._foreach_*`` call for the whole list. That pays only for large tensors, whose fresh
    temporaries would be fresh ``mmap`` calls; small ones come from the allocator's free lists. So
    :meth:`take` declines (returns None) when the tensors average fewer than ``min_mean`` elements.
    """

    def __init__(self, limit: int, min_mean: int = 1 << 14) -> None:
        self.limit = limit
        self.min_mean = min_mean
        self.buffers: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        self.used: dict[tuple[torch.dtype, torch.device], int] = {}

    def reset(self) -> None:
        self.used.clear()

    def take(self, like: list[Tensor], dtype: torch.dtype | None = None) -> list[Tensor] | None:
        """Views of one free buffer shaped like ``like`` (in ``dtype``), or None if they do not fit."""
        if not like:
            return None
        dtype = dtype or like[0].dtype
        sizes = [t.numel() for t in like]
        total = sum(sizes)
        if total > self.limit or total < self.min_mean * len(sizes):
            return None
        key = (dtype, like[0].device)
        pool = self.buffers.setdefault(key, [])
        i = self.used.get(key, 0)
        if i == len(pool):
            pool.append(torch.empty(self.limit, dtype=dtype, device=like[0].device))
        self.used[key] = i + 1
        out, start = [], 0
        for t, n in zip(like, sizes):
            out.append(pool[i][start:start + n].view(t.shape))
            start += n
        return out


class TensorList:
    """A list of tensors of one dtype and device, with elementwise arithmetic over all of them.

    Args:
        tensors: the tensors (any shapes); they are not copied, so in-place methods act on them.
        scratch: where out-of-place results go (default: fresh tensors); results inherit it.
    """

    __slots__ = ("scratch", "tensors")

    def __init__(self, tensors: Sequence[Tensor], scratch: Scratch | None = None) -> None:
        self.tensors: list[Tensor] = list(tensors)
        self.scratch = scratch

    def _new(self, tensors: list[Tensor]) -> TensorList:
        return TensorList(tensors, self.scratch)

    def _apply(self, out_op: Callable[..., Any], foreach_op: Callable[..., list[Tensor]], *args: Any,
               dtype: torch.dtype | None = None) -> TensorList:
        """``foreach_op(self.tensors, *args)``, or ``out_op(t, *args_i, out=o)`` into scratch buffers."""
        per = [a if isinstance(a, list) else None for a in args]
        mixed = any(p is not None and p and p[0].dtype != self.dtype for p in per)  # result dtype differs
        out = self.scratch.take(self.tensors, dtype) if self.scratch is not None and not mixed else None
        if out is None:
            return self._new(foreach_op(self.tensors, *args))
        for i, (t, o) in enumerate(zip(self.tensors, out)):
            out_op(t, *(a if p is None else p[i] for a, p in zip(args, per)), out=o)
        return self._new(out)

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
        out = self.scratch.take(self.tensors, dtype) if self.scratch is not None else None
        if out is None:
            return self._new([t.to(dtype) for t in self.tensors])
        torch._foreach_copy_(out, self.tensors)
        return self._new(out)

    # -- out-of-place arithmetic ------------------------------------------------------------------
    def _binary(self, other: Any, out_op: Callable[..., Any], op: Callable[..., list[Tensor]]) -> TensorList:
        other = other.tensors if isinstance(other, TensorList) else other
        return self._apply(out_op, op, other)

    def __add__(self, other: Any) -> TensorList:
        return self._binary(other, torch.add, torch._foreach_add)

    __radd__ = __add__

    def __sub__(self, other: Any) -> TensorList:
        return self._binary(other, torch.sub, torch._foreach_sub)

    def __rsub__(self, other: Any) -> TensorList:
        out = -self
        torch._foreach_add_(out.tensors, other.tensors if isinstance(other, TensorList) else other)
        return out

    def __mul__(self, other: Any) -> TensorList:
        return self._binary(other, torch.mul, torch._foreach_mul)

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> TensorList:
        return self._binary(other, torch.div, torch._foreach_div)

    def __rtruediv__(self, other: Any) -> TensorList:
        out = self._apply(torch.reciprocal, torch._foreach_reciprocal)
        torch._foreach_mul_(out.tensors, other.tensors if isinstance(other, TensorList) else other)
        return out

    def __neg__(self) -> TensorList:
        return self._apply(torch.neg, torch._foreach_neg)

    def abs(self) -> TensorList:
        return self._apply(torch.abs, torch._foreach_abs)

    def sqrt(self) -> TensorList:
        return self._apply(torch.sqrt, torch._foreach_sqrt)

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
        if isinstance(other, (int, float)) and self.dtype in (torch.float16, torch.bfloat16):
            # torch 2.13's in-place _foreach_mul_ by a Python number rounds the number to the tensors' half
            # precision first (Tensor.mul_ does not); as a 0-d tensor it multiplies as Tensor.mul_ does
            other = torch.tensor(float(other), dtype=torch.float64)
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


def _lerp(start: TensorList, end: TensorList, weight: Any) -> TensorList:
    return start._apply(torch.lerp, torch._foreach_lerp, end.tensors, weight)


def _maximum(a: TensorList, b: TensorList, *, out: TensorList | None = None) -> TensorList:
    if out is None:
        return a._apply(torch.maximum, torch._foreach_maximum, b.tensors)
    if out is a:
        torch._foreach_maximum_(a.tensors, b.tensors)
    elif out is b:
        torch._foreach_maximum_(b.tensors, a.tensors)
    else:
        torch._foreach_copy_(out.tensors, torch._foreach_maximum(a.tensors, b.tensors))
    return out


_TORCH_FUNCTIONS: dict[Any, Callable[..., Any]] = {
    torch.sign: lambda x: x._apply(torch.sign, torch._foreach_sign),
    torch.lerp: _lerp,
    torch.maximum: _maximum,
    torch.abs: TensorList.abs,
    torch.sqrt: TensorList.sqrt,
}
