"""The ``descend`` command. Parses arguments and calls the library; no logic of its own.

    descend train --data digits --model mlp --optimizer adam --out runs/adam
    descend train --data my.csv --target label --out runs/mine
    descend predict runs/mine --data new.csv --out predictions.csv
    descend train --data notes.txt --model transformer --out runs/lm && descend generate runs/lm --prompt "The"
    descend train --resume runs/adam --steps 2000
    descend train --nproc 2 --optimizer adamw --out runs/ddp     # 2 processes (torchrun), DDP
    descend compare                      # the quick suite: 3 tasks incl. a transformer LM, report in runs/
    descend gradflow --depth 32 --activations sigmoid,tanh,relu --out runs/gradflow
    descend optimizers
    descend experiments all --out docs/figures   # one figure per claim

:func:`build_parser` builds the whole parser without importing torch (``descend --help`` and
``descend <command> --help`` print at once; the CLI reference of the docs is generated from it);
each command imports what it uses when it runs.

Bad input is one line on stderr, ``descend: error: ...``, and exit status 2 (``--debug``: the
traceback); so are the operating-system errors a user can fix (permissions, a path that is a file or
not a directory, a full disk). A run whose loss becomes NaN/inf stops with exit status 1, its last
good checkpoint kept. Under torchrun a failing rank prints ``descend: rank R failed: ...`` and the
job exits non-zero.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import textwrap
import time
import warnings

from descend import __version__
from descend._options import CompareSpec, RunSpec
from descend.cli._options import UsageError, add_options

__all__ = ["EXPERIMENT_NAMES", "build_parser", "main"]

#: ``descend experiments`` names (the same as :data:`descend.experiments.EXPERIMENTS`; a test keeps them equal).
EXPERIMENT_NAMES = (
    "momentum",
    "depth",
    "weight-decay",
    "adam-softsign",
    "gd-vs-sgd",
    "badly-scaled",
    "point-sets",
    "point-set-regression",
    "function-approximation",
    "flow-matching",
    "scale",
)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _describe(text: str) -> str:
    """A description wrapped to the terminal's usual width (the formatter keeps it as given)."""
    return textwrap.fill(text, 88)


def _example(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``descend`` argument parser with every command and option; imports neither torch nor numpy."""
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser = _Parser(
        prog="descend",
        description=_describe(
            "Train neural networks by descending a loss: train and use models on your own data, "
            "compare optimizers, reproduce the experiments."
        ),
        epilog=_example("descend train --data digits --optimizer adam --out runs/adam", "descend train --help"),
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"descend {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    train = sub.add_parser(
        "train",
        parents=[common],
        help="train one model",
        description=_describe(
            "Train one model on a built-in dataset or your own .csv/.npz file. Writes config.json "
            "(every resolved value), preprocessing.json, metrics.jsonl/.csv, checkpoint/, model.safetensors and "
            "summary.json into --out. Values come from flags, then --set, then --config, then the defaults."
        ),
        epilog=_example(
            "descend train --data my.csv --target label --model mlp --optimizer adamw --out runs/mine",
            "descend train --resume runs/mine --steps 5000",
        ),
    )
    add_options(train, RunSpec)
    _add_run_args(train, with_resume=True)

    predict = sub.add_parser(
        "predict",
        parents=[common],
        help="predict with a trained model",
        description=_describe(
            "Load the model and preprocessing record of a run made by `descend train` and write one "
            "prediction per row of --data (the class and its probabilities, or the value in the target's units) "
            "to a CSV file."
        ),
        epilog=_example("descend predict runs/mine --data new.csv --out predictions.csv"),
    )
    predict.add_argument("run", metavar="RUN_DIR", help="a run directory written by `descend train`")
    predict.add_argument("--data", metavar="PATH", required=True, help="a .csv or .npz file with the run's inputs")
    predict.add_argument(
        "--out", metavar="PATH", default="predictions.csv", help="the CSV file to write (default: predictions.csv)"
    )
    _add_device(predict)
    predict.add_argument(
        "--batch-size", metavar="N", type=int, default=1024, help="rows per forward pass (default: 1024)"
    )

    generate = sub.add_parser(
        "generate",
        parents=[common],
        help="sample text from a trained language model",
        description=_describe(
            "Continue --prompt with --tokens bytes sampled from the language model of a run made by "
            "`descend train --model transformer` on text, printing the text as it is sampled. A prompt longer "
            "than the model's context is conditioned on its last bytes (a note on stderr says so)."
        ),
        epilog=_example('descend generate runs/lm --prompt "def main(" --tokens 200 --temperature 0.8 --top-k 40'),
    )
    generate.add_argument("run", metavar="RUN_DIR", help="a run directory written by `descend train`")
    generate.add_argument("--prompt", metavar="TEXT", default="\n", help="the text to continue (default: a newline)")
    generate.add_argument("--tokens", metavar="N", type=int, default=256, help="bytes to sample (default: 256)")
    generate.add_argument(
        "--temperature", metavar="T", type=float, default=1.0, help="divides the logits; 0 takes the most likely byte"
    )
    generate.add_argument("--top-k", metavar="K", type=int, default=None, help="sample among the K most likely bytes")
    generate.add_argument(
        "--top-p", metavar="P", type=float, default=None, help="sample among the most likely bytes up to probability P"
    )
    generate.add_argument("--seed", metavar="S", type=int, default=0, help="the sampling seed (default: 0)")
    generate.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=None,
        help="bfloat16 autocast (default: as the run was trained, on CUDA only)",
    )
    _add_device(generate)

    compare = sub.add_parser(
        "compare",
        parents=[common],
        help="compare optimizers on benchmark tasks (tuned LR, seeds, HTML report)",
        description=_describe(
            "Compare optimizers on named tasks (workloads with a model, data, validation target and step "
            "budget): each optimizer's learning rate tuned on a log grid, then several seeds at it; writes "
            "a self-contained report.html, results.csv and results.json. Default: the quick suite."
        ),
        epilog=_example("descend compare --task text-lm,badly-scaled --optimizers sgd,adam,lion --out runs/cmp"),
    )
    compare.add_argument("--list", action="store_true", help="list the tasks and suites, then exit")
    add_options(compare, CompareSpec)
    _add_run_args(compare, with_resume=False)

    gradflow = sub.add_parser(
        "gradflow",
        parents=[common],
        help="gradient norm per layer, plain vs residual",
        description=_describe(
            "Gradient norm of every layer of deep plain and residual MLPs on digits; writes "
            "gradflow.png, gradflow.csv and gradflow.json."
        ),
        epilog=_example("descend gradflow --depth 32 --activations sigmoid,relu --out runs/gradflow"),
    )
    gradflow.add_argument("--depth", type=int, metavar="N", default=32, help="hidden layers, 1 to 1024 (default: 32)")
    gradflow.add_argument("--width", type=int, metavar="N", default=64, help="hidden width, 1 to 4096 (default: 64)")
    gradflow.add_argument(
        "--activations",
        metavar="NAME,NAME,...",
        default="sigmoid,tanh,relu",
        help="comma-separated, from relu, sigmoid, tanh, gelu (default: sigmoid,tanh,relu)",
    )
    gradflow.add_argument(
        "--batch", type=int, metavar="N", default=256, help="examples in the gradient batch (default: 256)"
    )
    gradflow.add_argument("--seed", type=int, metavar="N", default=0, help="initialisation seed (default: 0)")
    gradflow.add_argument("--out", metavar="PATH", default=None, help="output directory (default: runs/gradflow-TIME)")
    gradflow.add_argument("--overwrite", action="store_true", help="replace the files of an earlier gradflow run")

    optimizers = sub.add_parser(
        "optimizers",
        parents=[common],
        help="list the optimizers, their updates and default learning rates",
        description=_describe(
            "List every optimizer name that --optimizer takes, its default learning rate and its update "
            "rule. With --explain, print the full chain of rules each one runs (imports torch)."
        ),
        epilog=_example("descend optimizers", "descend optimizers adamw --explain"),
    )
    optimizers.add_argument("names", nargs="*", metavar="NAME", help="only these optimizers (default: all)")
    optimizers.add_argument("--explain", action="store_true", help="print each optimizer's chain of rules")

    experiments = sub.add_parser(
        "experiments",
        parents=[common],
        help="reproduce one claim about training (or all): numbers and a PNG",
        description=_describe(
            "Run an experiment that shows one idea of the system working; writes NAME.png and NAME.json. "
            f"Names: {', '.join(EXPERIMENT_NAMES)}, or all."
        ),
        epilog=_example("descend experiments momentum --quick --out runs/exp"),
    )
    experiments.add_argument("name", metavar="NAME", help="an experiment name, or 'all'")
    experiments.add_argument(
        "--out", metavar="PATH", default=None, help="output directory (default: runs/experiments-TIME)"
    )
    experiments.add_argument("--quick", action="store_true", help="shorter runs (as the tests use)")
    experiments.add_argument(
        "--seed", type=int, metavar="N", default=0, help="seed of initialisation and data order (default: 0)"
    )
    return parser


def _add_device(parser: argparse.ArgumentParser) -> None:
    """``--device`` of a command that loads a trained run (train takes it from the options table)."""
    parser.add_argument("--device", metavar="DEVICE", default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (default: auto)")


def _add_run_args(parser: argparse.ArgumentParser, with_resume: bool) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--config", metavar="PATH", help="read options from a TOML file with flat keys (default: none)")
    group.add_argument("--set", action="append", metavar="KEY=VALUE", help="set any option; repeatable (default: none)")
    group.add_argument("--out", metavar="PATH", help="output directory (default: runs/COMMAND-TIME)")
    group.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    if with_resume:
        group.add_argument("--resume", metavar="PATH", help="continue the run in PATH (may raise --steps/--epochs)")
        group.add_argument(
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
    shown = warnings.showwarning
    if not debug:
        warnings.showwarning = _show_warning
    try:
        return _run(argv, debug)
    finally:
        warnings.showwarning = shown


def _run(argv: list[str], debug: bool) -> int:
    reported = False  # a torchrun rank's error is printed by descend.distributed.entrypoint, with its rank

    def error(message: str) -> None:
        if not reported:
            _error(message)

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return 0
        args.argv = argv
        from descend.cli import _commands

        func = getattr(_commands, args.command)
        if _is_rank():  # one rank of a torchrun job: say which rank failed (torchrun then stops the rest)
            from descend.distributed import entrypoint

            func, reported = entrypoint(func), True
        return int(func(args))
    except KeyboardInterrupt:
        error("interrupted")
        return 130
    except BrokenPipeError:  # `descend ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        if debug:
            raise
        code, message = classify(e)
        error(message)
        return code


#: Exception classes (by name, defined in descend) that mean "the user can fix this": exit 2.
USER_ERRORS = frozenset({"OptionError", "UsageError", "RunError", "DataError", "CheckpointError", "PredictError"})
#: The same for exit 1: the run itself failed (its last good checkpoint is kept).
RUN_FAILURES = frozenset({"NonFiniteLossError"})


def classify(e: BaseException) -> tuple[int, str]:
    """``(exit status, one-line message)`` for an exception that reached the command line."""
    names = {c.__name__ for c in type(e).__mro__ if c.__module__.startswith("descend")}
    if names & USER_ERRORS:
        return 2, str(e)
    if names & RUN_FAILURES:
        return 1, str(e)
    if isinstance(e, OSError):
        message = _os_error(e)
        if message is not None:
            return 2, message
    return 1, f"{type(e).__name__}: {e} (run again with --debug for the traceback)"


def _os_error(e: OSError) -> str | None:
    """The one line for an operating-system error the user can fix, else ``None``."""
    path = e.filename if e.filename is not None else "a file"
    if isinstance(e, PermissionError) or e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {path}; choose a location you can write to (or fix its permissions)"
    if isinstance(e, NotADirectoryError):
        return f"not a directory: {path} (a part of the path is a file); choose another path"
    if isinstance(e, IsADirectoryError):
        return f"{path} is a directory; give a file name"
    if isinstance(e, FileNotFoundError):
        parent = os.path.dirname(str(path))
        if e.filename is not None and parent and not os.path.isdir(parent):
            return f"cannot write {path}: the directory {parent} does not exist; create it or choose another path"
        return f"no such file or directory: {path}"
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        needed = getattr(e, "bytes_needed", None)
        need = f" ({needed} bytes needed)" if needed else ""
        return f"no space left on the device writing {path}{need}; free some space or choose another --out"
    if e.errno == errno.EROFS:
        return f"read-only file system: {path}; choose a writable location"
    if e.errno == errno.EFBIG:
        return f"file too large: {path} (a file-size limit); raise the limit or choose another location"
    if e.errno == errno.ENAMETOOLONG:
        return f"file name too long: {path}"
    return None


def _is_rank() -> bool:
    """True in a process started by torchrun (checked without importing torch)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, *args: object) -> None:
    """descend's own warnings as one ``descend: warning: ...`` line; others in Python's usual form."""
    ours = category.__module__.startswith("descend") or f"{os.sep}descend{os.sep}" in filename
    if ours:
        print(f"descend: warning: {' '.join(str(message).split())}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno))


def _error(message: str) -> None:
    print(f"descend: error: {' '.join(message.split())}", file=sys.stderr)
