"""What each subcommand does once its arguments are parsed: call the library and print the result."""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from descend._io import atomic_write, write_json
from descend._options import DEFAULT_LR, FULL_BATCH, OPTIMIZER_NAMES, OPTIMIZER_SUMMARY, CompareSpec, RunSpec
from descend.cli._options import UsageError, collect


def _out_dir(args: argparse.Namespace, command: str) -> Path:
    from descend.cli import default_out

    return Path(args.out or default_out(command))


def _write_csv(path: Path, rows: list[list[Any]]) -> None:
    """``rows`` (the first one the header) as a CSV file, written atomically."""
    text = io.StringIO(newline="")
    csv.writer(text).writerows(rows)
    atomic_write(path, text.getvalue())


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less ``--nproc N`` / ``--nproc=N`` (the workers must not launch again)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = i + 1 < len(argv)
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _launch_train(args: argparse.Namespace) -> int:
    """``descend train --nproc N``: start N local ranks of ``descend train`` with torchrun."""
    from descend import distributed as dd

    argv = list(args.argv)
    argv.remove("train")  # the first one is the command; options such as --debug may come before it
    argv = _without_nproc(argv)
    if not args.resume and not args.out:  # one directory for all ranks, named here
        argv += ["--out", str(_out_dir(args, "train"))]
    code = dd.launch(args.nproc, ["-m", "descend", "train", *argv])
    if code != 0:
        print(
            f"descend: error: the {args.nproc}-process run failed (exit code {code}); "
            "the failing rank and its error are printed above",
            file=sys.stderr,
        )
    return code


def train(args: argparse.Namespace) -> int:
    values, given = collect(RunSpec, args)
    if args.nproc is not None and not 1 <= args.nproc <= 1024:
        raise UsageError(f"--nproc must be between 1 and 1024, got {args.nproc}")
    new_spec = None if args.resume else RunSpec.from_dict(values)  # a bad option fails here, before torch loads

    from descend import distributed as dd
    from descend.runs import load_run_spec, run_training

    if args.nproc is not None and args.nproc > 1 and not dd.launched():
        return _launch_train(args)
    if args.resume:
        if args.out or args.overwrite:
            raise UsageError("--resume DIR continues the run in DIR; drop --out/--overwrite")
        changeable = {"steps", "epochs", "progress", "tensorboard", "threads", "strategy", "device"}
        other = sorted(given - changeable)
        if other:
            raise UsageError(
                f"--resume uses the run's own config.json; only --steps/--epochs may change, not {other[0]}"
            )
        spec = load_run_spec(args.resume, warn=_warn if dd.is_main() else None)
        spec = replace(spec, **{k: values[k] for k in given})
        if "steps" in given and "epochs" not in given:  # the budget given last wins: one budget, not both
            spec = replace(spec, epochs=None)
        elif "epochs" in given and "steps" not in given:
            spec = replace(spec, steps=None)
        out = Path(args.resume)
    else:
        assert new_spec is not None
        spec = new_spec
        out = _out_dir(args, "train")
    joined = dd.launched() and not dd.is_distributed()
    if joined:  # a rank of a torchrun job
        dd.setup()
        out = Path(dd.broadcast_object(str(out)))  # a default --out names the time: take rank 0's
    summary = run_training(spec, out, overwrite=args.overwrite, resume=bool(args.resume), log=print)
    if dd.is_main():
        test = summary["test"]
        shown = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if isinstance(v, (int, float)))
        world = f" on {dd.world_size()} processes ({spec.strategy})" if dd.world_size() > 1 else ""
        kept = summary.get("weights_step", summary["steps"])
        weights = f", the weights of step {kept} (lowest validation loss)" if kept != summary["steps"] else ""
        print(f"test {shown} after {summary['steps']} steps ({summary['seconds']:.1f}s){weights}{world}; run in {out}")
    if joined:
        dd.teardown()
    if str(summary.get("stop_reason", "")).startswith("diverged"):  # stopped by a blow-up: not a success
        if dd.is_main():
            print(f"descend: error: the run {summary['stop_reason']} and stopped (the files and the last good "
                  f"checkpoint are in {out}); lower the learning rate", file=sys.stderr, flush=True)
        return 1
    return 0


def _warn(message: str) -> None:
    print(f"descend: warning: {message}", file=sys.stderr, flush=True)


def predict(args: argparse.Namespace) -> int:
    from descend.runs._predict import predict as run_predict

    result = run_predict(args.run, args.data, args.out, device=args.device, batch_size=args.batch_size)
    skipped = f"; left out {result['skipped']} rows with a missing value" if result.get("skipped") else ""
    print(f"wrote {result['rows']} predictions ({result['task']}) to {result['out']}{skipped}")
    return 0


def generate(args: argparse.Namespace) -> int:
    from descend.runs._generate import generate_text

    result = generate_text(
        args.run, args.prompt, args.tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, device=args.device, bf16=args.bf16,
    )
    if result.prompt_truncated:
        _warn(f"the prompt has {result.prompt_bytes} bytes; the model reads its last {result.context}")
    print(args.prompt, end="", flush=True)
    for piece in result.pieces:
        print(piece, end="", flush=True)
    print(flush=True)
    return 0


def compare(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from descend.compare import compare as run_compare
    from descend.compare import describe_tasks, resolve_plan
    from descend.report import summary_table, task_table, write_outputs
    from descend.runs import check_out_dir

    if getattr(args, "list", False):
        print(describe_tasks())
        return 0
    values, _ = collect(CompareSpec, args)
    spec = CompareSpec.from_dict(values)
    plan = resolve_plan(spec)  # fail on a bad task or optimizer name before touching the output directory
    out = _out_dir(args, "compare")
    check_out_dir(out, args.overwrite)
    console = Console(width=None if sys.stdout.isatty() else 160)  # a log file gets the tables unsquashed
    console.print(
        f"comparing {', '.join(plan['optimizers'])} on {', '.join(plan['tasks'])} "
        f"({plan['seeds']} seeds, tuning on {plan['tune_seeds']}); writing to {out}",
        highlight=False,
    )
    results = run_compare(spec, log=lambda line: console.print(line, highlight=False))

    def show(title: str, rows: list[dict[str, str]]) -> None:
        table = Table(title=title)
        for column in rows[0]:
            table.add_column(column, justify="left" if column in ("optimizer", "grid") else "right")
        for row in rows:
            table.add_row(*row.values())
        console.print(table)

    for name, task in results["tasks"].items():
        show(f"{name}: {task['description']}", task_table(task))
    show(f"summary: rank per task ('=' tied within 95% intervals), {results['seconds']:.0f}s", summary_table(results))
    paths = write_outputs(results, out)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}", highlight=False)
    return 0


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null (a diverged sweep point scores -inf)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def gradflow(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from descend import diagnostics, nn
    from descend.data.registry import load_data
    from descend.train import cross_entropy

    activations = [a.strip() for a in args.activations.split(",") if a.strip()]
    unknown = [a for a in activations if a not in nn.ACTIVATIONS]
    if not activations or unknown:
        raise UsageError(f"--activations: unknown {unknown or activations!r}; choose from {', '.join(nn.ACTIVATIONS)}")
    for flag, value, high in (
        ("--depth", args.depth, 1024),
        ("--width", args.width, 4096),
        ("--batch", args.batch, 1797),
    ):
        if not 1 <= value <= high:
            raise UsageError(f"{flag} must be between 1 and {high}, got {value}")
    out = _out_dir(args, "gradflow")
    present = [p for p in ("gradflow.png", "gradflow.csv", "gradflow.json") if (out / p).exists()]
    if present and not args.overwrite:
        raise UsageError(f"{out} already holds a gradflow run ({present[0]}); pass --overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    bundle = load_data("digits", seed=args.seed)
    x, y = bundle.train.inputs[0][: args.batch], bundle.train.targets[: args.batch]
    results: dict[str, dict[str, float]] = {}
    for activation in activations:
        for residual in (False, True):
            torch.manual_seed(args.seed)
            model = nn.ResidualMLP(
                bundle.in_features or 0,
                bundle.out_features,
                width=args.width,
                depth=args.depth,
                activation=activation,
                residual=residual,
            )
            results[f"{activation} {'residual' if residual else 'plain'}"] = diagnostics.gradient_flow(
                model, (x,), y, cross_entropy
            )
    diagnostics.plot_gradient_flow(
        results, out / "gradflow.png", title=f"Gradient norm per layer, depth {args.depth}, width {args.width}"
    )
    layers = list(next(iter(results.values())))
    _write_csv(
        out / "gradflow.csv",
        [["layer", *results], *([layer, *(results[k][layer] for k in results)] for layer in layers)],
    )
    write_json(out / "gradflow.json", results)
    table = Table(title=f"‖∂L/∂W‖ per layer (depth {args.depth}); first/last = input-side over output-side")
    table.add_column("layer")
    for key in results:
        table.add_column(key, justify="right")
    for layer in layers:
        table.add_row(layer, *(f"{results[k][layer]:.2e}" for k in results))
    table.add_row("first/last", *(f"{_ratio(r):.2e}" for r in results.values()))
    Console().print(table)
    print(f"wrote {out / 'gradflow.png'}, {out / 'gradflow.csv'}")
    return 0


def _ratio(norms: dict[str, float]) -> float:
    values = list(norms.values())
    return values[0] / values[-1] if values[-1] else math.inf


def optimizers(args: argparse.Namespace) -> int:
    """Each optimizer's default learning rate and update (torch-free); ``--explain``: its chain of rules."""
    names = [n.lower() for n in args.names] or list(OPTIMIZER_NAMES)
    unknown = [n for n in names if n not in OPTIMIZER_NAMES]
    if unknown:
        raise UsageError(f"unknown optimizer {unknown[0]!r}; choose from {', '.join(OPTIMIZER_NAMES)}")
    for name in names:
        note = "  (full-batch gradient descent: SGD on the whole training set)" if name in FULL_BATCH else ""
        print(f"{name}  default lr {DEFAULT_LR[name]:g}{note}")
        if args.explain:
            import torch

            from descend import optim
            from descend.train import make_optimizer

            print(optim.explain(make_optimizer(name, [torch.zeros(1, requires_grad=True)])))
            print()
        else:
            print(f"  {OPTIMIZER_SUMMARY[name]}")
    return 0


def experiments(args: argparse.Namespace) -> int:
    from descend import experiments as ex

    names = list(ex.EXPERIMENTS) if args.name == "all" else [ex.ALIASES.get(args.name, args.name)]
    if args.name != "all" and names[0] not in ex.EXPERIMENTS:
        raise UsageError(f"unknown experiment {args.name!r}; choose one of {', '.join(ex.EXPERIMENTS)}, or all")
    out = _out_dir(args, "experiments")
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        print(f"== {name}")
        result = ex.run(name, out, quick=args.quick, seed=args.seed)
        print(f"wrote {result['figure']} and {result['json']} ({result['seconds']:.1f}s)")
    return 0
