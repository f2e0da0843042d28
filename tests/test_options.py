"""One options model: each hyperparameter has one home, one default and one validation.

Checked against independent sources: the library's own registries (activations, optimizers,
experiments), the dataclasses that must agree, and a property-based drive of `descend train`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from descend._options import (
    DEFAULT_LR,
    FULL_BATCH,
    MODELS,
    OPTIMIZER_NAMES,
    OPTIONS,
    CompareSpec,
    OptionError,
    RunSpec,
    TrainConfig,
    option_of,
)
from descend.cli import EXPERIMENT_NAMES, build_parser, main


def test_names_match_the_library() -> None:
    from descend import experiments

    assert tuple(EXPERIMENT_NAMES) == tuple(experiments.EXPERIMENTS)
    assert {"linear", "mlp", "resmlp", "pointset"} <= set(MODELS)


def test_one_default_per_option() -> None:
    """A field named after a shared option has that option's default in every dataclass."""
    for cls in (TrainConfig, RunSpec, CompareSpec):
        for f in fields(cls):
            option = option_of(f)
            if option is not None and f.name in OPTIONS and option is OPTIONS[f.name]:
                assert f.default == OPTIONS[f.name].default, (cls.__name__, f.name)
            if option is not None:
                assert option.check(f.default) == f.default  # every default passes its own validation
    run, config = RunSpec(), TrainConfig()
    for name in {f.name for f in fields(TrainConfig)} & {f.name for f in fields(RunSpec)}:
        assert getattr(run, name) == getattr(config, name), name
    assert run.l2 == 1e-3 and config.batch_size == 32 and run.width == 128  # the three disagreements
    assert run.restore_best and config.restore_best


def test_the_default_lr_is_the_one_the_optimizer_gets() -> None:
    import torch

    from descend.train import make_optimizer

    for name in OPTIMIZER_NAMES:
        opt = make_optimizer(name, [torch.zeros(1, requires_grad=True)])
        assert opt.param_groups[0]["lr"] == DEFAULT_LR[name]
        assert RunSpec(optimizer=name).resolved_lr == DEFAULT_LR[name]
    with pytest.raises(OptionError, match="--lr must be a finite number > 0, got nan"):
        make_optimizer("adam", [torch.zeros(1, requires_grad=True)], lr=float("nan"))


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("lr", 0.0), ("lr", -1.0), ("lr", math.inf), ("lr", math.nan),
        ("clip_grad_norm", -1.0), ("clip_grad_norm", 0.0), ("clip_grad_norm", math.nan),
        ("gamma", 0.0), ("gamma", 1.5), ("gamma", math.nan),
        ("l2", -1e-3), ("l2", math.inf), ("weight_decay", math.nan), ("min_lr_factor", 2.0),
        ("epochs", 0.0), ("epochs", math.inf), ("steps", 0), ("batch_size", 0), ("accumulation", 0),
        ("depth", 100_000), ("depth", -1), ("width", 0), ("seed", -1), ("eval_every", 0),
        ("optimizer", "rmsprop"), ("schedule", "exp"), ("device", "tpu"), ("device", "cuda:x"),
    ],
)  # fmt: skip
def test_bad_values_are_refused_naming_the_flag(field: str, bad: object) -> None:
    with pytest.raises(OptionError) as error:
        RunSpec(**{field: bad})
    message = str(error.value)
    assert OPTIONS[field].flag in message and "\n" not in message


def test_good_edge_values_are_accepted() -> None:
    spec = RunSpec(gamma=1.0, lr=1e-12, clip_grad_norm=1e-9, depth=0, device="cuda:3", batch_size=None)
    assert spec.gamma == 1.0 and spec.train_config().batch_size is None
    assert TrainConfig(steps=5, epochs=None).steps == 5
    with pytest.raises(OptionError, match="--steps or --epochs"):
        TrainConfig(steps=None, epochs=None)


#: The options of a config.json that ``descend train --steps 2 --width 8 --depth 1 --optimizer sgd --lr 0.05``
#: wrote (descend 0.1.0): a run directory of that version must resume with the same options.
_CONFIG_JSON = """{"descend_version": "0.1.0", "data": "digits", "target": null, "task": "classification",
"encoding": null, "delimiter": null, "missing": "error", "normalize_points": true, "model": "mlp", "depth": 1,
"width": 8, "heads": 4, "context": 64, "activation": "relu", "checkpoint_activations": false, "optimizer": "sgd",
"lr": 0.05, "weight_decay": 0.0, "state_dtype": "float32", "l2": 0.001, "clip_grad_norm": null,
"schedule": "constant", "warmup_steps": 0, "min_lr_factor": 0.0, "step_size": 1000, "gamma": 0.1, "steps": 2,
"epochs": null, "batch_size": 32, "replacement": false, "accumulation": 1, "chunk_size": null, "loss": "auto",
"bf16": false, "param_dtype": "float32", "step_in_backward": false, "seed": 0, "device": "auto", "threads": 1,
"strategy": "ddp",
"eval_every": null, "eval_size": 16384, "patience": null, "restore_best": true, "log_every": null,
"checkpoint_every": null, "keep_checkpoints": 2, "progress": false, "tensorboard": false,
"resolved": {"task": "classification"}}"""


def test_a_config_json_of_version_0_1_0_loads_the_same(tmp_path) -> None:
    from descend.train import load_run_spec

    (tmp_path / "config.json").write_text(_CONFIG_JSON)
    spec = load_run_spec(tmp_path)
    written = json.loads(_CONFIG_JSON)
    del written["descend_version"], written["resolved"]
    assert asdict(spec) == written
    assert list(asdict(spec)) == list(written)  # a new config.json lists the options in the same order
    assert spec.resolved_lr == 0.05 and spec.train_config().steps == 2 and spec.train_config().epochs is None


def test_model_size_is_refused_before_allocation() -> None:
    import torch

    from descend.data._base import DataBundle, Split
    from descend.train import build_model

    split = Split((torch.zeros(4, 3),), torch.zeros(4, dtype=torch.long))
    bundle = DataBundle("t", "classification", "vector", split, split, split, out_features=2, in_features=3)
    started = time.perf_counter()
    with pytest.raises(OptionError, match="choose a smaller --depth or --width"):
        build_model("mlp", bundle, depth=1024, width=65536)
    assert time.perf_counter() - started < 1.0


def _parse(tmp_path: Path, *argv: str) -> RunSpec:
    from descend.cli._options import collect

    args = build_parser().parse_args(["train", *argv])
    values, _ = collect(RunSpec, args)
    return RunSpec.from_dict(values)


def test_precedence_flags_over_set_over_config_over_default(tmp_path) -> None:
    (tmp_path / "c.toml").write_text('lr = 0.5\nwidth = 7\nbatch-size = "full"\noptimizer = "sgd"\n')
    spec = _parse(tmp_path, "--config", str(tmp_path / "c.toml"), "--set", "lr=0.25", "--set", "depth=3",
                  "--depth", "4")  # fmt: skip
    assert (spec.lr, spec.width, spec.batch_size, spec.optimizer, spec.depth, spec.seed) == (
        0.25, 7, None, "sgd", 4, 0,
    )  # fmt: skip
    from descend.cli._options import UsageError

    for bad in (["--set", "lr="], ["--set", "lr=abc"], ["--set", "nope=1"]):
        with pytest.raises(UsageError):
            _parse(tmp_path, *bad)
    with pytest.raises(OptionError, match="--lr must be"):
        _parse(tmp_path, "--set", "lr=nan")


@pytest.mark.parametrize("value", ["1.5", "true", "0", '"many"'])
def test_a_config_files_wrong_value_is_refused_even_when_a_flag_overrides_it(tmp_path, value) -> None:
    (tmp_path / "c.toml").write_text(f"steps = {value}\n")
    with pytest.raises(OptionError, match=r"--config c\.toml: .*steps"):
        _parse(tmp_path, "--config", str(tmp_path / "c.toml"), "--steps", "3")
    with pytest.raises(OptionError, match="--set steps"):
        _parse(tmp_path, "--set", f"steps={value.strip(chr(34))}", "--steps", "3")
    (tmp_path / "ok.toml").write_text("steps = 2.0\nepochs = 3\n")  # whole numbers are integers
    assert _parse(tmp_path, "--config", str(tmp_path / "ok.toml"), "--steps", "3").steps == 3


def test_the_library_and_the_command_line_agree_on_every_default_learning_rate() -> None:
    import inspect

    import torch

    from descend import optim
    from descend.train import optimizer_class

    for name in OPTIMIZER_NAMES:
        cls = optimizer_class(name)
        if name not in FULL_BATCH:  # gd is the command line's name for SGD fed the whole-set gradient
            assert optim.OPTIMIZERS[name] is cls and cls.__name__.lower() == name
            assert inspect.signature(cls).parameters["lr"].default == DEFAULT_LR[name], name
            opt = cls([torch.zeros(1, requires_grad=True)])  # the library's default, no lr given
            assert opt.param_groups[0]["lr"] == DEFAULT_LR[name], name
    listed = subprocess.run([sys.executable, "-m", "descend", "optimizers"], capture_output=True, text=True, timeout=60)
    shown = dict(line.split("  default lr ") for line in listed.stdout.splitlines() if "  default lr " in line)
    assert {k: float(v.split()[0]) for k, v in shown.items()} == DEFAULT_LR


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_explains_itself(capsys) -> None:
    commands = _subparsers(build_parser())
    assert set(commands) == {"train", "predict", "generate", "compare", "gradflow", "optimizers", "experiments"}
    for name, parser in commands.items():
        assert parser.description and parser.epilog and "example:" in parser.epilog, name
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert f"usage: descend {name}" in text and " VALUE" not in text, name
        for action in parser._actions:
            assert (action.help or "").count("(default:") <= 1, (name, action.dest)
            if action.option_strings and action.nargs != 0 and action.dest != "help":
                assert action.metavar not in (None, "VALUE"), (name, action.dest)
    train = " ".join(_subparsers(build_parser())["train"].format_help().split())
    assert "--lr LR" in train and "one of gd, sgd, momentum" in train and "--out PATH" in train


def test_the_parser_and_listing_do_not_import_torch() -> None:
    code = (
        "import sys; from descend.cli import build_parser, main; build_parser(); main(['optimizers']); "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "adamw  default lr 0.001" in result.stdout


def _median_seconds(argv: list[str], n: int = 5) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        subprocess.run([sys.executable, *argv], capture_output=True, check=True, timeout=120)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def test_help_is_fast_against_importing_torch() -> None:
    torch_import = _median_seconds(["-c", "import torch"])
    for argv in (["--help"], ["train", "--help"], ["optimizers"]):
        seconds = _median_seconds(["-m", "descend", *argv])
        print(f"descend {' '.join(argv)}: {seconds:.3f}s (import torch: {torch_import:.3f}s)")
        assert seconds < max(0.3, 0.5 * torch_import)


# ---- the property-based drive of `descend train` ------------------------------------------------


def _number(kind: str) -> st.SearchStrategy[str]:
    floats = st.floats(allow_nan=True, allow_infinity=True).map(repr)
    ints = st.integers(-(10**20), 10**20).map(str)
    junk = st.sampled_from(["", "abc", "1e3", "0x10", "none", "full", "-0"])
    return st.one_of(floats if kind == "float" else ints, junk, floats, ints)


_SMALL = {  # options whose valid values must stay small so that a case finishes in seconds
    "steps": st.one_of(st.integers(-3, 3).map(str), st.sampled_from(["many", "nan", "1e9x"])),
    "depth": st.one_of(st.integers(-3, 2), st.integers(1025, 10**7)).map(str),
    "width": st.one_of(st.integers(-3, 8), st.integers(65537, 10**9)).map(str),
    "batch_size": st.one_of(st.integers(-2, 40).map(str), st.just("full"), st.just("")),
    "chunk_size": st.one_of(st.integers(-2, 40).map(str), st.just("none")),
    "accumulation": st.integers(-2, 3).map(str),
    "keep_checkpoints": st.integers(-2, 3).map(str),
}
_FREE = ["lr", "weight_decay", "l2", "clip_grad_norm", "gamma", "min_lr_factor", "warmup_steps", "step_size",
         "eval_every", "log_every", "checkpoint_every", "patience", "seed"]  # fmt: skip
_CHOICES = ["optimizer", "schedule", "activation", "model", "loss", "task", "device"]


@st.composite
def _train_argv(draw: st.DrawFn) -> list[str]:
    argv: list[str] = []
    for name in draw(st.lists(st.sampled_from([*_SMALL, *_FREE, *_CHOICES]), unique=True, max_size=8)):
        option = OPTIONS[name]
        if name in _SMALL:
            value = draw(_SMALL[name])
        elif name in _FREE:
            value = draw(_number("float" if option.kind is float else "int"))
        else:
            valid = list(option.choices or ["auto", "cpu", "cuda", "cuda:0", "mps"])
            value = draw(st.sampled_from([*valid, "bogus", ""]))
        via_set = draw(st.booleans())
        argv += ["--set", f"{name}={value}"] if via_set else [f"{option.flag}={value}"]
    for flag in draw(st.lists(st.sampled_from(["bf16", "replacement", "no-progress"]), unique=True)):
        argv.append(f"--{flag}")
    return argv


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.csv"
    rows = [f"{i % 7 / 7:.3f},{(i * 3) % 5 / 5:.3f},{i % 2}" for i in range(30)]
    path.write_text("a,b,y\n" + "\n".join(rows) + "\n")
    return path


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=_train_argv())
def test_random_options_exit_cleanly_with_one_line(argv: list[str], tiny_csv: Path, capfd) -> None:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        base = ["train", "--data", str(tiny_csv), "--target", "y", "--threads", "1", "--no-progress"]
        defaults = [] if any("steps" in a for a in argv) else ["--steps", "2"]
        code = main([*base, *defaults, *argv, "--out", str(Path(out) / "run")])
        seconds = time.perf_counter() - started
        _, err = capfd.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("descend: error")]
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 1:  # only a run that failed as training (diverged, loss NaN/inf), never an unexpected error
        assert len(errors) == 1 and ("the run diverged" in errors[0] or "the loss became" in errors[0]), (argv, err)
    if code == 2:
        assert len(errors) == 1 and len(err.strip().splitlines()) == 1, (argv, err)
    assert seconds < 60, (argv, seconds)
