"""The native engine's param-group cache: a group stepped by one loop, checked instead of sorted again."""

from __future__ import annotations

import array
from itertools import chain, repeat
from operator import attrgetter, is_, itemgetter
from typing import TYPE_CHECKING, Any

from torch import Tensor

from descend.optim.engines.bucket import SortedGroup, grad_of, tensor_version
from descend.optim.engines.native.compiler import Kernel
from descend.optim.engines.native.emit import step_scalars
from descend.optim.engines.plan import ActiveRules, Plan, active_rules, state_keys, weight_factor
from descend.optim.rules.base import Rule

if TYPE_CHECKING:
    from descend.optim.engines.native.engine import NativeEngine


def _is_number(value: Any) -> bool:
    """A hyperparameter that cannot change in place: a Python number, flag, string or None, or a tuple of them."""
    if isinstance(value, tuple):
        return all(map(_is_number, value))
    return value is None or isinstance(value, (int, float, str))



_nbytes_of = attrgetter("nbytes")


class NativeGroup:
    """A param group whose last step was one native loop over all its parameters.

    Holds the group's parameters, their state dicts and state tensors, the parameters' addresses and
    sizes, the loop's address table (gradients left to fill in), the packed step counter, and the
    kernel and scalars of the group's hyperparameters as last read. Gradients are never held: they
    are read afresh every step. State tensors are checked by identity, not address; their storage is
    held (by aliases) so that the loop never writes to freed memory even if a state tensor's
    ``.data`` were replaced (optimizer state is the optimizer's: to change it, put another tensor in
    the state dict, which the next step notices).
    """

    __slots__ = ("active", "factor", "held", "hyper_keys", "kernel", "keys", "members", "nbytes", "params",
                 "params_list", "per_step", "pointers", "runner", "scalars", "sizes", "state_of", "state_tensors",
                 "states", "step", "stride", "values", "version", "w_pointers", "without_grad")

    def __init__(self, runner: NativeEngine, group: dict[str, Any], stepped: SortedGroup) -> None:
        keys, items, params, states, step = stepped.keys, stepped.items, stepped.params, stepped.states, stepped.step
        self.runner = runner
        self.params_list: list[Tensor] = group["params"]
        self.members = list(self.params_list)  # the group's parameters, as they were
        self.params = params  # those the loop steps, in its order
        self.without_grad = stepped.without_grad  # the others, which had no gradient (frozen)
        self.keys = list(keys)
        self.states = states
        # a tuple of a state dict's tensors: the step counter and the active rules' state
        self.state_of = itemgetter("step", *keys) if keys else itemgetter("step", "step")
        self.state_tensors = list(chain.from_iterable(map(self.state_of, states)))
        self.held = [t.detach() for t in self.state_tensors]
        # int64 arrays, not lists of ints: comparing them reads two buffers, not 200 scattered objects
        self.w_pointers = array.array("q", [p.data_ptr() for p in self.params])
        self.nbytes = array.array("q", [p.nbytes for p in self.params])
        _, pointers, sizes, _ = runner.split(items)  # per item: w, g, then its state tensors; its size
        self.pointers, self.sizes = array.array("q", pointers), array.array("q", sizes)
        self.stride = 2 + len(keys)
        self.step = step
        self.version = tensor_version(step._base)  # the loop advances the counters without changing it
        self.hyper_keys = tuple(key for key in group if key != "params")
        self.values: list[Any] | None = None  # the hyperparameters the kernel and scalars were read from
        self.active: ActiveRules | None = None  # their active rules and weight factor, if they are all numbers
        self.factor: Any = None
        self.per_step = False  # a rule has per-step scalars
        self.kernel: Kernel | None = None
        self.scalars = array.array("d")

    def read_hyper(self, plan: Plan, group: dict[str, Any]) -> bool:
        """Whether the group's hyperparameters still run on the remembered loop (the same state keys). The
        kernel and scalars are read anew when they change, or every step where a hyperparameter is a
        tensor (it may change in place); per-step scalars (Adam's bias corrections) every step."""
        try:
            values = list(map(group.__getitem__, self.hyper_keys))
            same = self.active is not None and values == self.values
        except (KeyError, RuntimeError):  # a key deleted; a tensor that is not one number
            return False
        if same:
            if self.per_step:
                self.scalars = array.array("d", step_scalars(self.active, self.factor, int(self.step.item()) + 1)[0])
            return True
        active = active_rules(plan, group, None)
        if state_keys(active) != self.keys:
            return False
        factor = weight_factor(plan, group)
        prepared = self.runner.prepare(group, active, factor, int(self.step.item()) + 1)
        if prepared is None:
            return False
        self.kernel, scalars = prepared
        self.scalars = array.array("d", scalars)
        self.values = values
        # numbers cannot change in place: while they compare equal, only per-step scalars need reading
        self.active, self.factor = (active, factor) if all(map(_is_number, values)) else (None, None)
        self.per_step = any(type(rule).scalars is not Rule.scalars for rule, _ in active)
        return True

    def gradient_pointers(self, group: dict[str, Any], all_state: Any) -> array.array | None:
        """The addresses of this step's gradients if the group is as it was remembered (None otherwise):
        the same parameters, those without a gradient still without, the others each at the same
        address, of the same size and contiguous, each with a contiguous gradient of its size (torch
        keeps a gradient's dtype the parameter's); the same state dicts holding the same state tensors."""
        params, members = self.params, self.members
        if (group["params"] is not self.params_list or len(self.params_list) != len(members)
                or not all(map(is_, self.params_list, members))
                or (self.without_grad and not all(map(is_, map(grad_of, self.without_grad), repeat(None))))):
            return None
        grads = list(map(grad_of, params))
        try:  # a missing gradient (None) raises TypeError
            if not all(map(Tensor.is_contiguous, grads)) or array.array("q", map(_nbytes_of, grads)) != self.nbytes:
                return None
        except TypeError:
            return None
        if (array.array("q", map(Tensor.data_ptr, params)) != self.w_pointers
                or not all(map(Tensor.is_contiguous, params))
                or array.array("q", map(_nbytes_of, params)) != self.nbytes):
            return None
        try:
            if (not all(map(is_, map(all_state.__getitem__, params), self.states))
                    or not all(map(is_, chain.from_iterable(map(self.state_of, self.states)), self.state_tensors))):
                return None
        except KeyError:
            return None
        return array.array("q", map(Tensor.data_ptr, grads))

    def step_again(self, plan: Plan, group: dict[str, Any], all_state: Any) -> bool:
        """Run the remembered loop over the group with this step's gradients, if nothing it relied on has
        changed (a step counter changed in place, the hyperparameters' kind, the parameters, gradients or
        state); False (nothing done) otherwise."""
        if (tensor_version(self.step._base) != self.version or not self.read_hyper(plan, group)
                or (grads := self.gradient_pointers(group, all_state)) is None):
            return False
        pointers = self.pointers[:]
        pointers[1::self.stride] = grads
        assert self.kernel is not None
        self.kernel(pointers, self.sizes, self.scalars, counters=self.step._base)
        return True
