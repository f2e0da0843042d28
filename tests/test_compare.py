"""descend compare: tasks, fair tuning, seed statistics, ties, the performance profile and the known results."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time

import pytest

from descend._options import CompareSpec, OptionError
from descend.compare import Task, compare, resolve_plan
from descend.compare._compare import performance_profile, time_to_target
from descend.compare._tasks import TASKS, make_badly_scaled
from descend.compare._tuning import seed_stats, tie_groups
from descend.report import write_outputs
from descend.runs import RunError


def test_tie_groups_share_a_rank_only_where_intervals_overlap() -> None:
    intervals = {
        "a": (0.90, 0.88, 0.92),
        "b": (0.89, 0.87, 0.91),  # overlaps a
        "c": (0.80, 0.79, 0.81),  # clearly below a
        "d": (0.795, 0.78, 0.805),  # overlaps c
        "e": None,  # every seed diverged
    }
    groups = tie_groups(intervals, higher_is_better=True)
    assert groups == [
        {"rank": 1, "members": ["a", "b"]},
        {"rank": 3, "members": ["c", "d"]},
        {"rank": 5, "members": ["e"]},
    ]
    lower = tie_groups({"x": (1.0, 0.9, 1.1), "y": (2.0, 1.95, 2.05)}, higher_is_better=False)
    assert lower == [{"rank": 1, "members": ["x"]}, {"rank": 2, "members": ["y"]}]


def test_performance_profile_counts_tasks_within_a_factor_of_the_best() -> None:
    times = {
        "t1": {"a": 10.0, "b": 20.0},
        "t2": {"a": 30.0, "b": 15.0},
        "t3": {"a": 5.0, "b": math.inf},  # b never reached the target
        "t4": {"a": math.inf, "b": math.inf},  # nobody did: counts against both
    }
    rho = performance_profile(times, [1.0, 1.9, 2.0, 100.0])
    assert rho["a"] == [0.5, 0.5, 0.75, 0.75]  # best on t1, t3; within 2x on t2
    assert rho["b"] == [0.25, 0.25, 0.5, 0.5]


def _history(values: list[float]) -> list[dict]:
    return [{"step": 10 * (i + 1), "seconds": float(i + 1), "val_accuracy": v} for i, v in enumerate(values)]


def test_time_to_target_needs_the_target_to_hold_until_the_end() -> None:
    task = TASKS["digits-mlp"]  # accuracy >= 0.95
    assert time_to_target(_history([0.5, 0.96, 0.97]), task) == (20, 2.0)
    assert time_to_target(_history([0.96, 0.90, 0.95, 0.97]), task) == (30, 3.0)  # touched once, lost, regained
    assert time_to_target(_history([0.97, 0.96, 0.53]), task) == (None, None)  # touched, then fell back: not reached


def test_quick_suite_defaults_and_bad_names() -> None:
    plan = resolve_plan(CompareSpec())
    assert plan["suite"] == "quick" and "text-lm" in plan["tasks"] and len(plan["tasks"]) >= 3
    assert plan["label"] == "quick suite"
    assert resolve_plan(CompareSpec(suite="full", task="all"))["label"] == "full suite"  # exactly the suite's
    custom = resolve_plan(CompareSpec(optimizers="sgd,adam"))  # the quick suite's tasks, other optimizers
    assert custom["suite"] is None and custom["label"] == f"{', '.join(plan['tasks'])}: sgd, adam"
    assert plan["seeds"] >= 3 and plan["tune_seeds"] >= 1
    full = resolve_plan(CompareSpec(suite="full"))
    assert full["seeds"] >= 5 and set(full["tasks"]) == set(TASKS)
    assert resolve_plan(CompareSpec(task="all"))["tasks"] == list(TASKS)
    with pytest.raises(RunError, match="unknown task 'nope'"):
        resolve_plan(CompareSpec(task="digits-mlp,nope"))
    with pytest.raises(RunError, match="unknown optimizer 'rmsprop'"):
        resolve_plan(CompareSpec(optimizers="sgd,rmsprop"))
    with pytest.raises(OptionError):
        CompareSpec(suite="huge")


def test_badly_scaled_features_span_four_decades() -> None:
    bundle = make_badly_scaled(0)
    x = bundle.train.inputs[0]
    spread = x.std(0)
    assert 5e-3 < float(spread.min()) < 2e-2 and 50 < float(spread.max()) < 200
    assert bundle.task == "regression" and isinstance(TASKS["badly-scaled"], Task)


@pytest.fixture(scope="module")
def tiny() -> dict:
    spec = CompareSpec(task="digits-mlp,badly-scaled", optimizers="sgd,adam", seeds=2, tune_seeds=1, steps=20)
    return compare(spec)


def test_tiny_comparison_tunes_fairly_and_reuses_the_tuning_seed(tiny) -> None:
    assert list(tiny["tasks"]) == ["digits-mlp", "badly-scaled"]
    for task in tiny["tasks"].values():
        assert sorted(task["optimizers"]) == ["adam", "sgd"]
        for entry in task["optimizers"].values():
            tuning = entry["tuning"]
            assert len(tuning["grid"]) == 3 + tuning["extended"]  # same start grid and rule for everyone
            assert entry["lr"] in tuning["grid"]
            best = min(range(len(tuning["grid"])), key=lambda i: tuning["mean_val_loss"][i])
            assert tuning["grid"][best] == entry["lr"]  # chosen by mean final validation loss
            runs = entry["runs"]
            assert [r["seed"] for r in runs] == [0, 1]
            if not runs[0]["diverged"]:
                assert runs[0]["val"]["loss"] == tuning["mean_val_loss"][best]  # seed 0 is the tuning run
            s = entry["summary"]
            finals = [r["test"][task["metric"]] for r in runs if not r["diverged"]]
            if finals:
                assert s["test"]["mean"] == pytest.approx(seed_stats(finals).mean)
            else:  # every seed diverged: no interval, counted instead
                assert s["test"] is None and s["diverged"] == len(runs)
            assert s["reached"] == sum(r["reached"] for r in runs)
        members = [n for g in task["ranking"] for n in g["members"]]
        assert sorted(members) == ["adam", "sgd"]
    assert set(tiny["profile"]["seconds_to_target"]) == {"sgd", "adam"}
    assert len(tiny["profile"]["taus"]) == len(tiny["profile"]["steps_to_target"]["sgd"])


def test_outputs_csv_json_and_a_self_contained_report(tiny, tmp_path) -> None:
    import base64
    import re

    paths = write_outputs(tiny, tmp_path)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 4 and {r["task"] for r in rows} == {"digits-mlp", "badly-scaled"}
    for r in rows:
        if r["test_mean"]:
            assert float(r["test_ci_low"]) <= float(r["test_mean"]) <= float(r["test_ci_high"])
        else:  # every seed diverged
            assert r["diverged"] == r["seeds"]
    data = json.loads(paths["json"].read_text())  # strict JSON: no NaN/Infinity
    assert data["tasks"]["digits-mlp"]["optimizers"]["sgd"]["runs"][0]["history"]
    text = paths["report"].read_text()
    assert not re.search(r'(src|href)="(https?:|//)', text)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 1 + 2 * 2  # the profile, then curves and lr sweep per task
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert text.index("Performance profile") < text.index('id="digits-mlp"')  # the profile comes first
    assert "95% Student-t" in text and "Update equations" in text and "←" in text


def _descend(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "descend", *args], capture_output=True, text=True, timeout=timeout, env=os.environ
    )


def test_cli_lists_tasks_and_rejects_bad_ones(tmp_path) -> None:
    listed = _descend("compare", "--list")
    assert listed.returncode == 0 and "text-lm" in listed.stdout and "quick" in listed.stdout
    for args, expected in (
        (["--task", "nope"], "unknown task 'nope'"),
        (["--suite", "huge"], "huge"),
        (["--optimizers", "sgd,foo"], "unknown optimizer 'foo'"),
    ):
        result = _descend("compare", *args, "--out", str(tmp_path / "x"))
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "x").exists()


# ---- known results, on the real quick suite (slow) ---------------------------------------------
@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, float]:
    out = tmp_path_factory.mktemp("quick") / "c"
    started = time.perf_counter()
    result = _descend("compare", "--out", str(out), timeout=900)
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    return json.loads((out / "results.json").read_text()), seconds


def _test(results: dict, task: str, name: str) -> dict:
    return results["tasks"][task]["optimizers"][name]["summary"]["test"]


@pytest.mark.slow
def test_quick_suite_runs_as_the_demo_within_3_minutes(quick) -> None:
    results, seconds = quick
    print(f"descend compare (quick suite): {seconds:.1f}s wall, environment {results['environment']}")
    assert "text-lm" in results["tasks"] and len(results["tasks"]) >= 3
    assert seconds < 180


@pytest.mark.slow
def test_text_lm_adam_beats_sgd_by_a_clear_margin(quick) -> None:
    results, _ = quick
    sgd = _test(results, "text-lm", "sgd")
    for name in ("adam", "adamw"):
        if name in results["tasks"]["text-lm"]["optimizers"]:
            adaptive = _test(results, "text-lm", name)
            assert adaptive["high"] < sgd["low"] and sgd["mean"] - adaptive["mean"] > 0.1, (name, adaptive, sgd)


@pytest.mark.slow
def test_badly_scaled_sign_methods_and_adam_beat_gradient_descent(quick) -> None:
    results, _ = quick
    task = results["tasks"]["badly-scaled"]
    assert task["batch_size"] is None  # full batch: sgd here is gradient descent
    gd = _test(results, "badly-scaled", "sgd")
    for name in ("signum", "adam"):
        other = _test(results, "badly-scaled", name)
        assert other["high"] < gd["low"], (name, other, gd)


@pytest.mark.slow
def test_digits_mlp_is_reported_as_a_tie(quick) -> None:
    results, _ = quick
    task = results["tasks"]["digits-mlp"]
    top = task["ranking"][0]["members"]
    assert len(top) >= 2, task["ranking"]  # the seeds cannot separate the best optimizers on digits
    stats = {n: _test(results, "digits-mlp", n) for n in top}
    leader = stats[top[0]]
    assert all(s["low"] <= leader["high"] and leader["low"] <= s["high"] for s in stats.values())
