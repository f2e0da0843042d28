"""Experiment ``scale``: its fits and frontier against closed forms, and part 1's numbers against its own data."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest

from descend.experiments import _scale
from descend.nn import TransformerLM, count_parameters


def test_fit_recovers_a_line() -> None:
    a, b = _scale._fit([1.0, 2.0, 4.0, 8.0], [3.0 + 2.5 * x for x in (1.0, 2.0, 4.0, 8.0)])
    assert a == pytest.approx(3.0) and b == pytest.approx(2.5)
    assert math.isnan(_scale._fit([2.0, 2.0], [1.0, 3.0])[1])  # no spread in x: no slope


def test_shape_params_counts_what_the_model_allocates() -> None:
    for shape in (_scale.SHAPES[0], _scale.LM_SHAPES[0], _scale.LM_SHAPES[-1]):
        width, depth, heads = shape
        built = TransformerLM(256, 64, width=width, depth=depth, heads=heads)
        assert _scale._shape_params(shape, 64) == count_parameters(built)


def test_ladder_spans_1m_to_2b_2x_to_4x_apart() -> None:
    params = [_scale._shape_params(s, _scale.STEP_CONTEXT) for s in _scale.SHAPES]
    assert 0.5e6 < params[0] < 1.5e6 and params[-1] > 1.9e9
    assert all(1.9 < b / a < 4.5 for a, b in pairwise(params))


def test_frontier_is_the_lower_envelope_of_the_curves_in_log_compute() -> None:
    curves = {"small": {"flops": [1.0, 4.0], "val_loss": [3.0, 2.0]},
              "big": {"flops": [2.0, 8.0], "val_loss": [4.0, 1.0]}}
    front = _scale._frontier(curves, [1.0, 2.0, 4.0, 8.0])
    # at 2 the small model is halfway (in log compute) from 3 to 2; the big one starts at 4; at 4 it is at 2.5
    assert front == [(3.0, "small"), (2.5, "small"), (2.0, "small"), (1.0, "big")]
    assert _scale._at(curves["small"], 8.0) == math.inf  # never trained that far


def test_a_size_over_the_memory_limit_is_reported_not_crashed() -> None:
    # 25M parameters need well over 0.9 GiB of address space beside torch's own: the child reports it
    rows = _scale._step_costs([3], [0], 1, limit=900 * 2**20, configs=["AdamW, float32 state"])
    (only,) = rows.values()
    assert len(only) == 1 and not only[0]["fits"] and only[0]["error"]
    table = _scale._summarise(rows, [0, 0, 0, 25_000_000], [0])
    assert table["AdamW, float32 state"]["does_not_fit"] == [25_000_000]


def test_summary_fits_slope_and_bytes_per_parameter_from_the_rows() -> None:
    # time 2e-8 * p^1 and memory 3e8 + 16 p: slope 1 and 16 bytes per parameter, from the rows alone
    params = [1e6, 3e6, 1e7, 3e7]
    rows = {"c": [{"size": i, "seed": s, "fits": True, "seconds": 2e-8 * p * (1 + 0.01 * s),
                   "peak_bytes": 3e8 + 16 * p} for i, p in enumerate(params) for s in (0, 1)]}
    table = _scale._summarise(rows, params, [0, 1])["c"]
    assert table["params"] == params and table["does_not_fit"] == []
    assert table["slope"] == pytest.approx([1.0, 1.0]) and table["bytes_per_parameter"] == pytest.approx([16.0, 16.0])


@pytest.mark.slow
def test_slope_and_bytes_per_parameter_come_from_the_measured_steps() -> None:
    outcome = _scale.scale(quick=True, seeds=[0], max_params=3e6, compute=2e9)
    table = outcome.numbers["step_costs"]
    for config, row in table.items():
        params, seconds, peak = row["params"], row["seconds"]["0"], row["peak_bytes"]["0"]
        assert len(params) == 2 and params[0] < params[1] and not row["does_not_fit"], config
        expected_slope = math.log(seconds[1] / seconds[0]) / math.log(params[1] / params[0])
        assert row["slope"][0] == pytest.approx(expected_slope)
        assert row["bytes_per_parameter"][0] == pytest.approx((peak[1] - peak[0]) / (params[1] - params[0]))
        assert row["bytes_per_parameter"][0] > 4  # at least the float32 weights themselves
    keys = {f.key for f in outcome.findings}
    assert {"time_grows_with_parameters", "lean_state_saves_memory", "optimal_size_grows_with_compute"} <= keys
    lm = outcome.numbers["lm"]
    for runs in lm["runs"].values():  # every size is trained to the same compute, within one step
        per_step = 6 * runs[0]["params"] * lm["batch"] * lm["context"]
        assert abs(runs[0]["flops"][-1] - lm["compute"]) <= per_step
