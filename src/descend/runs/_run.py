"""A complete run: data, model, optimizer, trainer and the files it leaves in its output directory.

``run_training(spec, out_dir)`` writes (each file atomically, through :mod:`descend._io`)::

    out_dir/config.json         every resolved option (the lr and weight decay used, the task, one budget:
                                steps or epochs, the absolute data path) plus "resolved": classes, model
                                dimensions, parameters, the data's SHA-256, the steps and intervals used
    out_dir/preprocessing.json  what `descend predict` applies to new data (see descend.runs._predict)
    out_dir/metrics.jsonl       one JSON object per logged step; metrics.csv, the same as a table
    out_dir/checkpoint/         the resumable state (see descend.checkpoint._local)
    out_dir/model.safetensors   the weights the run ends with: those of the lowest validation loss
                                (restore_best, the default) or of the last step
    out_dir/best/               the checkpoint of the lowest validation loss (restore_best or patience)
    out_dir/summary.json        {"train": {...}, "val": {...}, "test": {...}, "steps": ..., "weights_step": ...,
                                 "best_step": ..., "diverged": ...}
    out_dir/.lock               held (``fcntl.flock``) by the process writing the run, with its pid

A run directory belongs to one process at a time: a second run (or ``--resume``) of the same
directory is refused at once, naming the process that holds it. The lock is released on exit and
dropped by the kernel when a process is killed, so a lock file left by a dead process is taken over.

Under ``torchrun`` (``W > 1`` processes) the same call is one rank of a data-parallel run: it
joins the process group, wraps the model with ``spec.strategy`` (DDP or FSDP2), and only rank 0
takes the lock and writes files other than checkpoint shards.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from descend import __version__
from descend import distributed as dd
from descend._io import atomic_path, umask_mode, write_json
from descend._options import OptionError, RunSpec
from descend.checkpoint._tensorfile import sha256_file
from descend.data._base import DataBundle
from descend.data.registry import load_data
from descend.nn import physical_memory
from descend.train._build import build_model, make_optimizer, memory_plan, resolved_weight_decay, state_options
from descend.train._trainer import Trainer, seed_everything

__all__ = ["RUN_FILES", "RunError", "RunLock", "RunSpec", "check_out_dir", "load_run_spec", "prepare", "run_training"]

#: What a run writes in its directory (and what ``overwrite`` removes; nothing else is touched).
RUN_FILES = (
    "config.json",
    "preprocessing.json",
    "summary.json",
    "metrics.jsonl",
    "metrics.csv",
    "model.safetensors",
    "checkpoint",
    "best",
    "tensorboard",
    "report.html",
    "results.csv",
)


class RunError(OptionError):
    """A run cannot start as asked; the message says what to change."""


def check_out_dir(out_dir: Path, overwrite: bool, *, remove: bool = True) -> None:
    """Refuse a directory that holds another run, unless ``overwrite`` (then, with ``remove``, remove
    its run files only: nothing else in the directory is touched)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RunError(f"--out {out_dir} is a file; give a directory")
    present = [name for name in RUN_FILES if (out_dir / name).exists()]
    if present and not overwrite:
        raise RunError(
            f"{out_dir} already holds a run ({present[0]}); pass --overwrite to replace it, "
            "--resume to continue it, or choose another --out"
        )
    if remove:
        for name in present:
            path = out_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


class RunLock:
    """An exclusive lock on a run directory: ``out_dir/.lock`` held with ``fcntl.flock``, the holder's pid inside.

    :meth:`acquire` fails at once with a :class:`RunError` naming the holder when another live process
    holds it. A lock file whose process died (killed, crashed) is not held (the kernel drops a
    ``flock`` with its process), so it is taken over; ``stale_pid`` then names that process.
    :meth:`release` removes the file and unlocks. Where ``fcntl`` does not exist (Windows) no lock is taken.
    """

    NAME = ".lock"

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / self.NAME
        self.fd: int | None = None
        self.stale_pid: int | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, umask_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                who = f"process {holder}" if holder else "another process"
                raise RunError(
                    f"{self.path.parent} is in use by {who} (a descend run writing there); "
                    "wait for it to finish or stop it, or choose another --out"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder removed the file as we opened it: lock the new one
                os.close(fd)
                continue
            previous = _read_pid(fd)
            self.stale_pid = previous if previous and previous != os.getpid() else None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fd = fd
            return self

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        with contextlib.suppress(OSError):
            self.path.unlink()
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _is_file_data(data: str) -> bool:
    """True when ``data`` names an existing file or directory rather than a built-in dataset."""
    from descend.data.registry import DATASETS

    return data not in DATASETS and Path(data).expanduser().exists()


def resolve_spec(spec: RunSpec) -> RunSpec:
    """``spec`` with a file's data path made absolute (so ``--resume`` works from any directory)."""
    if _is_file_data(spec.data):
        return replace(spec, data=str(Path(spec.data).expanduser().resolve()))
    return spec


def describe_data(bundle: DataBundle) -> str:
    """One line saying what was loaded and which task it is (and why, when the loader says)."""
    sizes = "/".join(str(len(s)) for s in (bundle.train, bundle.val, bundle.test) if hasattr(s, "__len__"))
    task = bundle.task
    if task == "classification":
        task += f" with {bundle.out_features} classes"
    source = bundle.info.get("task_source")
    reason = bundle.info.get("task_reason")
    why = f" ({source}: {reason})" if source == "inferred" and reason else (f" ({source})" if source else "")
    kind = {"vector": "table", "pointset": "point sets", "pointset-query": "point sets with queries"}
    shape = kind.get(bundle.input_kind, bundle.input_kind)
    handled = ""
    if bundle.info.get("rows_dropped"):
        handled = f"; dropped {bundle.info['rows_dropped']} rows with a missing value"
    elif bundle.info.get("rows_filled"):
        handled = f"; filled the missing values of {bundle.info['rows_filled']} rows with the training means"
    return f"data {bundle.name}: {shape}, {task}{why}; {sizes} train/val/test examples{handled}"


def _check_tensorboard(spec: RunSpec) -> None:
    if spec.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise RunError("--tensorboard needs TensorBoard, which is not installed: pip install tensorboard")


def prepare(spec: RunSpec, out_dir: Path | None = None, *, bundle: DataBundle | None = None,
            log: Callable[[str], None] | None = None) -> Trainer:
    """Data, model, optimizer and trainer for ``spec``; every bad choice is a :class:`RunError`.

    The device is checked first (``--device cuda`` without CUDA is an error before any data is read),
    then the run's :class:`~descend.train.MemoryPlan` (given to ``log``) against the machine's memory,
    before the model is allocated.
    """
    from descend.train._device import resolve_device

    spec.validate()
    try:
        resolve_device(spec.device)
    except ValueError as e:
        raise RunError(f"--device {spec.device}: {e}") from None
    _check_tensorboard(spec)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    seed_everything(spec.seed)
    if bundle is None:
        bundle = load_bundle(spec)
    fits = {"auto": bundle.task, "cross_entropy": "classification", "mse": "regression"}[spec.loss]
    if fits != bundle.task:
        raise RunError(f"--loss {spec.loss} is for {fits}; {bundle.name!r} is a {bundle.task} task: use --loss auto")
    try:
        plan = memory_plan(spec, bundle)
        memory = physical_memory()
        if log is not None:
            log(plan.describe(memory))
        if memory is not None and plan.total > memory:
            raise RunError(
                f"this run needs about {plan.total / 1e9:.3g} GB ({plan.describe()}) and this machine has "
                f"{memory / 1e9:.3g} GB: choose a smaller --width/--depth/--batch-size, or a lean mode "
                "(--step-in-backward, --state-dtype int8, --checkpoint-activations)"
            )
        model = build_model(
            spec.model, bundle, depth=spec.depth, width=spec.width, activation=spec.activation, heads=spec.heads,
            checkpoint_activations=spec.checkpoint_activations, bytes_per_parameter=plan.bytes_per_parameter,
        )
        if spec.param_dtype == "bfloat16":  # before a DDP/FSDP wrapper, which keeps the dtypes it finds
            model.to(torch.bfloat16)
        if dd.world_size() > 1:  # every rank built the same model from the same seed
            model = dd.wrap(model, spec.strategy)
        optimizer = make_optimizer(
            spec.optimizer, model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, **state_options(spec)
        )
        return Trainer(
            model,
            optimizer,
            bundle,
            spec.train_config(),
            out_dir=out_dir,
            is_main=dd.is_main(),
            device=spec.device,
        )
    except ValueError as e:
        raise RunError(str(e)) from e


def load_bundle(spec: RunSpec) -> DataBundle:
    """The data ``spec`` names (its split fixed by ``spec.seed``)."""
    return load_data(
        spec.data,
        target=spec.target,
        task=spec.task,  # type: ignore[arg-type]
        seed=spec.seed,
        normalize_points=spec.normalize_points,
        encoding=spec.encoding,
        delimiter=spec.delimiter,
        context=spec.context,
        missing=spec.missing,
    )


def resolved_config(spec: RunSpec, bundle: DataBundle, model: nn.Module,
                    trainer: Trainer | None = None) -> dict[str, Any]:
    """``config.json``: every option as used, plus what was resolved from the data (and the trainer).

    ``lr``, ``weight_decay`` and ``task`` are the values used, not ``null``; the run's length is one
    budget, ``steps`` or ``epochs`` (the other ``null``), so a ``--resume`` that gives the other replaces it.
    """
    values = asdict(spec)
    values.update(lr=spec.resolved_lr, weight_decay=resolved_weight_decay(spec.optimizer, spec.weight_decay))
    values.update(task=bundle.task)
    if spec.steps is not None:
        values["epochs"] = None
    resolved: dict[str, Any] = {
        "task": bundle.task,
        "task_source": bundle.info.get("task_source", "given" if spec.task else "dataset"),
        "classes": bundle.info.get("classes") if bundle.task == "classification" else None,
        "num_classes": bundle.out_features if bundle.task == "classification" else None,
        "input_kind": bundle.input_kind,
        "in_features": bundle.in_features,
        "out_features": bundle.out_features,
        "location_dim": bundle.location_dim,
        "value_dim": bundle.value_dim,
        "parameters": sum(p.numel() for p in model.parameters()),
        "examples": {"train": len(bundle.train), "val": len(bundle.val), "test": len(bundle.test)},
    }
    if trainer is not None:
        resolved.update(
            total_steps=trainer.total_steps,
            eval_every=trainer.eval_every,
            log_every=trainer.log_every,
            checkpoint_every=trainer.checkpoint_every,
        )
    if "files" in bundle.info:  # text: every file read, each with its SHA-256 (computed while checking it)
        resolved.update(data_path=spec.data, data_files=bundle.info["files"])
    elif _is_file_data(spec.data):
        resolved.update(data_path=spec.data, data_sha256=sha256_file(Path(spec.data)))
    return {"descend_version": __version__, **values, "resolved": resolved}


def run_training(spec: RunSpec, out_dir: str | Path, *, overwrite: bool = False, resume: bool = False,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train as ``spec`` says, writing the run's files to ``out_dir``; return the summary.

    ``resume=True`` continues the run already in ``out_dir`` from its latest checkpoint (``spec``
    should be its ``config.json``, possibly with more ``steps``/``epochs``), whatever the world
    size that wrote it. ``log`` receives the lines a user should see before training (the data and
    the task inferred for it, the model's size). Launched by torchrun, every rank calls this with
    the same arguments; rank 0 holds the run directory's lock (see :class:`RunLock`).
    """
    joined = dd.launched() and not dd.is_distributed()
    if joined:
        dd.setup()
    out_dir = Path(out_dir)
    main = dd.is_main()
    say = log if (log is not None and main) else (lambda _: None)
    spec = resolve_spec(spec)
    lock = RunLock(out_dir)
    try:
        if out_dir.is_dir():  # every rank: _on_main broadcasts rank 0's outcome
            _on_main(lock.acquire)  # a directory in use is refused before anything is loaded
        if not resume:
            _on_main(lambda: check_out_dir(out_dir, overwrite, remove=False))
        trainer = prepare(spec, out_dir, log=say)
        bundle = trainer.data
        say(describe_data(bundle))
        if main:
            out_dir.mkdir(parents=True, exist_ok=True)
            if lock.fd is None:
                lock.acquire()
            if not resume:
                check_out_dir(out_dir, overwrite)  # under the lock: remove an overwritten run's files
            if lock.stale_pid:
                say(f"note: took over the lock of process {lock.stale_pid}, which is no longer running")
        dd.barrier()
        if resume:
            trainer.resume()
            if trainer.step >= trainer.total_steps:  # refused before config.json is rewritten
                raise RunError(
                    f"--resume {out_dir}: the run already has {trainer.step} steps and the budget asks for "
                    f"{trainer.total_steps}; give a larger --steps (or --epochs) to train on"
                )
        if main:
            from descend.runs._predict import preprocessing_record

            write_json(out_dir / "config.json", resolved_config(spec, bundle, trainer.model, trainer))
            write_json(out_dir / PREPROCESSING, preprocessing_record(spec, bundle))
        summary = trainer.fit()
        if trainer.world > 1:
            weights = dd.full_state_dict(trainer.model)  # every rank helps gather; rank 0 gets them
        else:
            # clones: safetensors refuses tensors that share storage (tied weights, flat=True optimizers)
            weights = {k: v.detach().cpu().contiguous().clone() for k, v in trainer.model.state_dict().items()}
        if bundle.input_kind == "tokens":  # a byte-level language model's loss is in nats per byte
            for split in ("train", "val", "test"):
                if isinstance(summary.get(split), dict) and "loss" in summary[split]:
                    summary[split]["bits_per_byte"] = summary[split]["loss"] / math.log(2)
        if main:
            _save_weights(weights, out_dir / "model.safetensors")
            write_json(out_dir / "summary.json", summary)
    finally:
        lock.release()
    if joined:
        dd.teardown()
    return summary


def _save_weights(weights: dict[str, Tensor], path: Path) -> None:
    """``weights`` as safetensors, atomically; a full disk names the bytes the file needs."""
    try:
        with atomic_path(path, suffix=".safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in weights.items()}, tmp)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            e.bytes_needed = sum(v.numel() * v.element_size() for v in weights.values())  # type: ignore[attr-defined]
            if e.filename is None:
                e.filename = str(path)
        raise


def _on_main(check: Any) -> None:
    """Run ``check()`` on rank 0 only; a :class:`RunError` it raises is raised on every rank."""
    error = None
    if dd.is_main():
        try:
            check()
        except RunError as e:
            error = str(e)
    error = dd.broadcast_object(error)
    if error is not None:
        raise RunError(error)


#: The preprocessing record ``descend predict`` reads.
PREPROCESSING = "preprocessing.json"


def load_run_spec(out_dir: str | Path, *, warn: Callable[[str], None] | None = None) -> RunSpec:
    """The :class:`RunSpec` saved in ``out_dir/config.json`` (to resume that run).

    ``warn`` receives a line when the run's data file is gone or no longer has the SHA-256 recorded
    when the run started.
    """
    path = Path(out_dir) / "config.json"
    if not path.is_file():
        raise RunError(f"--resume {out_dir}: no run there (config.json is missing); start one with --out")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise RunError(f"--resume {out_dir}: config.json is not valid JSON ({e})") from e
    if not isinstance(values, dict):
        raise RunError(f"--resume {out_dir}: config.json is not a JSON object")
    values.pop("descend_version", None)
    resolved = values.pop("resolved", None) or {}
    try:
        spec = RunSpec.from_dict(values)
    except OptionError as e:
        raise RunError(f"--resume {out_dir}: config.json: {e}") from None
    recorded = resolved.get("data_sha256")
    if warn is not None and recorded and _is_file_data(spec.data):
        if not Path(spec.data).is_file():
            warn(f"the run's data file {spec.data} is gone; resuming needs it back at that path")
        elif sha256_file(Path(spec.data)) != recorded:
            warn(f"the run's data file {spec.data} changed since the run started (SHA-256 differs)")
    return spec
