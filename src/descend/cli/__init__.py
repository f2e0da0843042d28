"""The ``descend`` command. Parses arguments and calls the library; no logic of its own.

    descend train --data digits --model mlp --optimizer adam --out runs/adam
    descend train --resume runs/adam --steps 2000
    descend train --nproc 2 --optimizer adamw --out runs/ddp     # 2 processes (torchrun), DDP
    torchrun --nproc_per_node=2 -m descend train --strategy fsdp --out runs/fsdp
    descend compare                      # the whole optimizer family on digits, report in runs/
    descend gradflow --depth 32 --activations sigmoid,tanh,relu --out runs/gradflow
    descend optimizers
    descend experiments all --out docs/figures   # one figure per claim

Bad input is one line on stderr, ``descend: error: ...``, and exit status 2 (``--debug``: the
traceback). A run whose loss becomes NaN/inf stops with exit status 1, its last good checkpoint kept.
Under torchrun a failing rank prints ``descend: rank R failed: ...`` and the job exits non-zero.
"""

from __future__ import annotations

import argparse
import sys
import time

from descend import __version__
from descend.cli._options import UsageError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    from descend.cli import _commands as c
    from descend.cli._options import add_options
    from descend.train import CompareSpec, RunSpec

    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser = _Parser(prog="descend", description="Train neural networks by descending a loss.", parents=[common])
    parser.add_argument("--version", action="version", version=f"descend {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    train = sub.add_parser(
        "train",
        parents=[common],
        help="train one model",
        description="Train one model and "
        "write config.json, metrics.jsonl/.csv, checkpoint/, model.safetensors and summary.json.",
    )
    add_options(train, RunSpec)
    _add_run_args(train, with_resume=True)
    train.set_defaults(func=c.train)

    compare = sub.add_parser(
        "compare",
        parents=[common],
        help="compare optimizers (LR sweep + seeds, HTML report)",
        description="Compare optimizers: a short LR sweep each, then the best LR over seeds; "
        "writes summary.json, results.csv and a self-contained report.html.",
    )
    add_options(compare, CompareSpec)
    _add_run_args(compare, with_resume=False)
    compare.set_defaults(func=c.compare)

    gradflow = sub.add_parser(
        "gradflow",
        parents=[common],
        help="gradient norm per layer, plain vs residual",
        description="Gradient norm of every layer of deep plain and residual MLPs on digits.",
    )
    gradflow.add_argument("--depth", type=int, default=32, help="hidden layers (default: 32)")
    gradflow.add_argument("--width", type=int, default=64, help="hidden width (default: 64)")
    gradflow.add_argument("--activations", default="sigmoid,tanh,relu", help="comma-separated (default: %(default)s)")
    gradflow.add_argument("--batch", type=int, default=256, help="examples in the gradient batch (default: 256)")
    gradflow.add_argument("--seed", type=int, default=0, help="initialisation seed (default: 0)")
    gradflow.add_argument("--out", default=None, help="output directory (default: runs/gradflow-<time>)")
    gradflow.add_argument("--overwrite", action="store_true", help="replace the files of an earlier gradflow run")
    gradflow.set_defaults(func=c.gradflow)

    optimizers = sub.add_parser("optimizers", parents=[common], help="list the optimizers with their equations")
    optimizers.set_defaults(func=c.optimizers)

    experiments = sub.add_parser(
        "experiments",
        parents=[common],
        help="reproduce one claim about training (or all): numbers and a PNG",
        description="Run an experiment that shows one idea of the system working; writes NAME.png and NAME.json. "
        "Names: gd-vs-sgd, momentum-noise, badly-scaled, adam-softsign, weight-decay, depth, point-sets, or all.",
    )
    experiments.add_argument("name", metavar="NAME", help="an experiment name, or 'all'")
    experiments.add_argument("--out", default=None, help="output directory (default: runs/experiments-<time>)")
    experiments.add_argument("--quick", action="store_true", help="shorter runs (as the tests use)")
    experiments.add_argument("--seed", type=int, default=0, help="seed of initialisation and data order (default: 0)")
    experiments.set_defaults(func=c.experiments)
    return parser


def _add_run_args(parser: argparse.ArgumentParser, with_resume: bool) -> None:
    parser.add_argument("--config", metavar="FILE.toml", help="read options from a TOML file (flat keys)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="set any option; repeatable")
    parser.add_argument("--out", metavar="DIR", help="output directory (default: runs/<command>-<time>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    if with_resume:
        parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR (may raise --steps/--epochs)")
        parser.add_argument(
            "--nproc",
            type=int,
            metavar="N",
            default=None,
            help="train on N local processes through torchrun (default: 1, or torchrun's own)",
        )


def default_out(command: str) -> str:
    return f"runs/{command}-{time.strftime('%Y%m%d-%H%M%S')}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``descend`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    from descend.data.tabular import DataError
    from descend.train import CheckpointError, NonFiniteLossError, RunError

    reported = False  # a torchrun rank's error is printed by descend.distributed.entrypoint, with its rank

    def error(message: str) -> None:
        if not reported:
            _error(message)

    try:
        args = _parser().parse_args(argv)
        if not getattr(args, "command", None):
            _parser().print_help()
            return 0
        args.argv = argv
        func = args.func
        if _is_rank():  # one rank of a torchrun job: say which rank failed (torchrun then stops the rest)
            from descend.distributed import entrypoint

            func, reported = entrypoint(func), True
        return int(func(args))
    except (UsageError, RunError, DataError, CheckpointError) as e:
        if debug:
            raise
        error(str(e))
        return 2
    except NonFiniteLossError as e:
        if debug:
            raise
        error(str(e))
        return 1
    except KeyboardInterrupt:
        error("interrupted")
        return 130
    except Exception as e:
        if debug:
            raise
        error(f"{type(e).__name__}: {e} (run again with --debug for the traceback)")
        return 1


def _is_rank() -> bool:
    from descend.distributed import launched

    return launched()


def _error(message: str) -> None:
    print(f"descend: error: {' '.join(message.split())}", file=sys.stderr)
