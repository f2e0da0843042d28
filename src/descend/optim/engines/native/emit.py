"""The C source of a chain's step: one loop over a bucket's elements, traced from the rules themselves.

    load w, g and the state;  u = g (−g when maximising);  for each rule: u = rule(u, w, state)
    w = weight_factor·w + u;  store w and the state

The loop runs over every tensor of a bucket in one call (OpenMP threads share the elements), on
float32 CPU tensors; state is loaded and stored as the optimizer's store says
(:class:`~descend.optim.engines.store.Store`: its ``c_load`` and ``c_store``), bfloat16 state with
the stochastic rounding every engine uses, 8-bit state block by block (the store's block hooks: the
reference's codes). A bfloat16 parameter rounded stochastically is loaded and stored the same way
(:func:`~descend.optim.engines.store.param_store`), under its own seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from descend.optim.engines.native.tracer import (
    Code,
    Element,
    NotTraceable,
    Scalar,
    State,
    flatten_hyper,
    symbolic_hyper,
)
from descend.optim.engines.plan import ActiveRules, scales_weights, with_scalars
from descend.optim.engines.store import Store, param_store

#: Fewest elements (over a bucket's tensors) for which the loop uses more than the calling thread, as
#: torch's own ``at::parallel_for`` grain: below it, waking threads costs more than the work (and the
#: woken threads' spinning shows as CPU time).
PARALLEL_MIN = 32768

def trace_chain(rules: Sequence[Any], state_keys: Sequence[Sequence[str]], shapes: Sequence[tuple[Any, ...]],
                maximize: bool, decays: bool, store: Store, rounded: bool = False, grad_bf16: bool = False) -> str:
    """The C source of the chain's step for one bucket layout.

    Args:
        rules: the active update rules, in order.
        state_keys: per rule, the names of its state tensors (the order of the pointers per tensor).
        shapes: per rule, its hyperparameters' shape from :func:`flatten_hyper` (scalars come in that order).
        maximize: whether the step ascends (``u = -g``).
        decays: whether the weight factor (decoupled decay) is the last scalar: ``w <- weight_factor*w + u``.
        store: how state is loaded and stored (its ``c_arrays``, ``c_load``, ``c_store``; for a store of
            blocks, ``granule`` > 1, its block hooks); a stochastic store takes ``seeds`` (per tensor and
            state slot) and ``offsets[t] + i``, the element's flat index.
        rounded: the parameters are bfloat16, stored rounded stochastically with the seed in the column after
            the state's (:func:`~descend.optim.engines.store.param_store`).
        grad_bf16: the gradients are bfloat16 (widened to float on load).

    Per tensor the pointers are ``w``, ``g``, then each state tensor's arrays (:attr:`Store.c_arrays`). A
    store of blocks is stepped block by block, threads taking whole blocks: each block's state is loaded,
    the rules run element by element into a float buffer per state tensor, and each buffer is stored whole.
    """
    weight = param_store()
    blocks = store.granule > 1
    arrays = len(store.c_arrays)
    code = Code()
    w = Element(code, "w")
    g = Element(code, "g")
    u: Any = -g if maximize else g
    loads, opens, stores, index = [], [], [], 0
    states: list[tuple[list[str], bool]] = []  # per state tensor: its arrays' names, whether it is signed
    for rule, names, shape in zip(rules, state_keys, shapes):
        hp, index = symbolic_hyper(code, shape, index)
        state = {}
        for name in names:
            slot = 2 + arrays * len(states)
            names_c = [f"P{slot}"] + [f"P{slot}_{a}" for a in range(1, arrays)]
            signed = name not in rule.nonnegative_state
            var = f"m{len(states) + 2}"
            if blocks:
                opens.append(store.c_block_open(names_c, signed))
                loads.append(f"const float {var} = {store.c_block_load(names_c, signed)};")
            else:
                loads.append(f"const float {var} = {store.c_load(f'{names_c[0]}[i]')};")
            state[name] = State(code, var)
            states.append((names_c, signed))
        u = rule.update(u, w, state, hp, None)
        if not isinstance(u, Element):
            raise NotTraceable(f"{rule.name}.update returned a {type(u).__name__}")
        stores += [state[name] for name in names]
    state_seeds = len(states) if store.stochastic else 0
    columns = state_seeds + rounded  # seeds per tensor: the state's, then the weight's

    def seed(k: int) -> str:
        return f"seeds[t * {columns} + {k}]"

    if decays:
        factor = Scalar(code, f"s{index}")
        code.prologue.append(f"const double s{index} = s[{index}];")
        index += 1
        w_new = code.element(f"{code.as_float(factor)} * w")._binary("+", u)
    else:
        w_new = w + u
    pointers = 2 + arrays * len(states)
    helpers = store.c_helpers
    if (rounded or grad_bf16) and weight.c_helpers not in helpers:
        helpers += weight.c_helpers
    write_w = (weight.c_store("P0[i]", w_new.name, "(uint32_t)(offset + i)", seed(state_seeds))
               if rounded else f"P0[i] = {w_new.name};")
    if blocks:  # the rules' new state values into each state tensor's buffer, stored whole after the block
        keep = [f"B{k}[i - b0] = {value.name};" for k, value in enumerate(stores)]
        after = [store.c_block_store(names_c, signed, f"B{k}", "b1 - b0", "(uint32_t)(offset + b0)", seed(k))
                 for k, (names_c, signed) in enumerate(states)]
    else:
        keep = [store.c_store(f"{names_c[0]}[i]", value.name, "(uint32_t)(offset + i)", seed(k))
                for k, (value, (names_c, _)) in enumerate(zip(stores, states))]
    declared = [f"{ctype} *restrict {names_c[a]} = ptrs[t * {pointers} + {2 + arrays * k + a}];"
                for k, (names_c, _) in enumerate(states) for a, ctype in enumerate(store.c_arrays)]
    element_loop = [
        f"const float w = {weight.c_load('P0[i]') if rounded else 'P0[i]'};",
        f"const float g = {weight.c_load('P1[i]') if grad_bf16 else 'P1[i]'};",
        *loads,
        *code.body,
        *keep,
        write_w,
    ]
    if blocks:
        granule = store.granule
        split = [
            f"/* The tensors' blocks of {granule} elements (the last of a tensor may be shorter), end to end, are",
            "   cut into one contiguous range per thread; each thread walks its blocks. A small bucket runs on",
            "   the calling thread alone: waking others would cost more than its work. */",
        ]
        units = f"(sizes[t] + {granule - 1}) / {granule}"
        align = ""
        walk = [
            f"      const int64_t n = sizes[t], units = (n + {granule - 1}) / {granule};",
            "      if (base + units <= lo) continue;",
            f"      const int64_t start = (lo > base ? lo - base : 0) * {granule};",
            f"      const int64_t stop = hi < base + units ? (hi - base) * {granule} : n;",
        ]
        body = [
            *(f"      float B{k}[{granule}];" for k in range(len(states))),
            f"      for (int64_t b0 = start; b0 < stop; b0 += {granule}) {{",
            f"        const int64_t blk = b0 / {granule}, b1 = b0 + {granule} < stop ? b0 + {granule} : stop;",
            *(f"        {line}" for line in opens),
            "        for (int64_t i = b0; i < b1; i++) {",
            *(f"          {line}" for line in element_loop),
            "        }",
            *(f"        {line}" for line in after),
            "      }",
        ]
    else:
        split = [
            "/* The tensors' elements, end to end, are cut into one contiguous range per thread (at multiples",
            "   of 16 elements, so no two threads write one cache line); each thread walks its range. A small",
            "   bucket runs on the calling thread alone: waking others would cost more than its work. */",
        ]
        units = "sizes[t]"
        align = " & ~(int64_t)15"
        walk = [
            "      const int64_t n = sizes[t], units = n;",
            "      if (base + units <= lo) continue;",
            "      const int64_t start = lo > base ? lo - base : 0, stop = hi < base + n ? hi - base : n;",
        ]
        body = [
            "      for (int64_t i = start; i < stop; i++) {",
            *(f"        {line}" for line in element_loop),
            "      }",
        ]
    lines = [
        "#include <math.h>",
        "#include <stdint.h>",
        "#include <string.h>",
        "#ifdef _OPENMP",
        "#include <omp.h>",
        "#endif",
        "",
        *split,
        *helpers.splitlines(),
        "void descend_step(int64_t count, void *const *ptrs, const int64_t *sizes, const double *s, int threads,",
        "                  const int64_t *offsets, const uint32_t *seeds, void *counters, int64_t ncounters,",
        "                  int counters_double) {",
        "  /* the bucket's step counters, +1 (float32, or float64 where that is torch's default dtype) */",
        "  for (int64_t c = 0; c < ncounters; c++) {",
        "    if (counters_double) ((double *)counters)[c] += 1.0; else ((float *)counters)[c] += 1.0f;",
        "  }",
        *(f"  {line}" for line in code.prologue),
        "  int64_t elements = 0, total = 0;",
        f"  for (int64_t t = 0; t < count; t++) elements += sizes[t], total += {units};",
        f"  #pragma omp parallel num_threads(threads) if(elements >= {PARALLEL_MIN})",
        "  {",
        "#ifdef _OPENMP",
        "    const int64_t id = omp_get_thread_num(), nt = omp_get_num_threads();",
        "#else",
        "    const int64_t id = 0, nt = 1;",
        "#endif",
        f"    const int64_t lo = (total * id / nt){align};",
        f"    const int64_t hi = id == nt - 1 ? total : (total * (id + 1) / nt){align};",
        "    int64_t base = 0;",
        f"    for (int64_t t = 0; t < count && base < hi; base += {units}, t++) {{",
        *walk,
        f"      {weight.c_type if rounded else 'float'} *restrict P0 = ptrs[t * {pointers}];",
        f"      const {weight.c_type if grad_bf16 else 'float'} *restrict P1 = ptrs[t * {pointers} + 1];",
        *(f"      {line}" for line in declared),
        *(["      const int64_t offset = offsets[t];"] if store.stochastic or rounded else []),
        *body,
        "    }",
        "  }",
        "}",
        "",
    ]
    return "\n".join(lines)


def step_scalars(active: ActiveRules, factor: Any, step: int) -> tuple[list[float], tuple[Any, ...], bool]:
    """The native loop's scalars at step number ``step``: the active rules' hyperparameters and per-step
    scalars in trace order, then the weight factor if the weights decay; the hyperparameters' shapes
    (which select the kernel); whether the weights decay. Raises ``NotTraceable`` for a value that is
    no number."""
    flat = [flatten_hyper(hp, rule.static) for rule, hp in with_scalars(active, step)]
    decays = scales_weights(factor)
    scalars = [x for numbers, _ in flat for x in numbers] + ([float(factor)] if decays else [])
    return scalars, tuple(shape for _, shape in flat), decays
