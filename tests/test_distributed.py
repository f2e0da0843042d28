"""descend.distributed: one process vs. W processes on PyTorch's engine (torchrun, gloo, DDP, FSDP2, DCP).

The oracle for every multi-process run is the same job run in this process, unwrapped, with the
same global batches (tests/distributed_scripts/job.py). The in-process tests are fast; the ones that
start torchrun with 2 gloo ranks take 15-100 s each on a 2-core CPU and are marked slow.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from _distributed_helpers import ENV, max_abs_diff, run
from descend import distributed as dd
from descend import optim
from descend.train import Minibatch

SCRIPTS = Path(__file__).parent / "distributed_scripts"
JOB = SCRIPTS / "job.py"


def _load_job() -> ModuleType:
    spec = importlib.util.spec_from_file_location("descend_test_distributed_job", JOB)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


job = _load_job()


def torchrun(args: list[str], timeout: float) -> tuple[int, str, float]:
    """Run job.py on 2 gloo ranks; (exit code, stdout+stderr, seconds). Kills the process group on timeout."""
    return run(dd.torchrun_command(2, [str(JOB), *args]), timeout)


# ------------------------------------------------------------------------------------------------
# In-process: sharding, sampler, loss weighting, metrics, checkpoints, launch command, failures
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 5, 11, 12])
def test_shards_partition_a_batch_in_order(world: int, n: int) -> None:
    idx = torch.randperm(20)[:n]
    parts = [dd.shard(idx, r, world) for r in range(world)]
    assert torch.equal(torch.cat(parts), idx)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    slices = [dd.shard(slice(3, 3 + n), r, world) for r in range(world)]
    assert [dd.batch_size_of(s) for s in slices] == sizes
    assert [i for s in slices for i in range(s.start, s.stop)] == list(range(3, 3 + n))


def test_shard_rejects_bad_rank_and_open_slices() -> None:
    with pytest.raises(ValueError, match="rank"):
        dd.shard(torch.arange(4), 2, 2)
    with pytest.raises(ValueError, match="stop"):
        dd.shard(slice(0, None), 0, 2)


def test_the_one_sampler_sharded_over_ranks_is_the_single_process_stream() -> None:
    one, many = Minibatch(23, 5, seed=3), Minibatch(23, 5, seed=3)  # every rank runs its own copy
    assert one.steps_per_epoch == 5  # 4 batches of 5 and the remainder of 3
    for _ in range(10):  # two epochs
        (batch,), (same,) = one.next_step(), many.next_step()
        assert torch.equal(torch.cat([dd.shard(same, r, 3) for r in range(3)]), batch)
        assert dd.shard(batch, 0, 1) is batch  # a world of one: the identity
    epochs = [torch.cat([one.next_step()[0] for _ in range(5)]) for _ in range(2)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(23))  # every example once per epoch
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled per epoch


def test_grad_scale_gives_the_global_mean_gradient_for_unequal_shards() -> None:
    """(1/W) sum_r grad[(W/N) sum_{i in S_r} l_i] = grad[(1/N) sum_i l_i], the average DDP/FSDP2 take."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.randn(11, 4), torch.randn(11, 2)
    ((model(x) - y).square().sum(1).mean()).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    world, averaged = 3, [torch.zeros_like(p) for p in model.parameters()]
    for r in range(world):
        model.zero_grad()
        mine = dd.shard(torch.arange(11), r, world)
        ((model(x[mine]) - y[mine]).square().sum() * dd.grad_scale(11, world)).backward()
        for acc, p in zip(averaged, model.parameters()):
            acc += p.grad / world
    for got, want in zip(averaged, expected):
        torch.testing.assert_close(got, want)


def test_total_norm_is_the_norm_of_all_tensors_together() -> None:
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2, dtype=torch.float64)]
    expected = torch.cat([t.double().reshape(-1) for t in tensors]).norm()
    assert dd.total_norm(tensors) == pytest.approx(float(expected), rel=1e-6)  # each tensor's norm in float32
    assert dd.total_norm([]) == 0.0


def test_single_process_helpers_answer_for_a_world_of_one() -> None:
    assert (dd.rank(), dd.world_size(), dd.is_main(), dd.is_distributed()) == (0, 1, True, False)
    assert dd.reduce_metrics({"loss": torch.tensor(0.5), "acc": 1}, count=3) == {"acc": 1.0, "loss": 0.5}
    with pytest.raises(ValueError, match="count"):
        dd.reduce_metrics({"loss": 1.0}, count=-1)
    assert not dd.launched()
    info = dd.setup()
    assert info.world_size == 1 and info.is_main and info.device.type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="backend"):
        dd.setup("mpi")


def test_wrap_checks_strategy_and_process_group() -> None:
    model = nn.Linear(2, 2)
    assert dd.wrap(model, "none") is model
    with pytest.raises(ValueError, match="strategy"):
        dd.wrap(model, "zero3")
    with pytest.raises(RuntimeError, match="torchrun"):
        dd.wrap(model, "fsdp")


def test_fsdp_units_are_blocks_inner_first() -> None:
    inner = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    model = nn.Sequential(nn.Linear(2, 2), inner)
    units = dd.default_fsdp_units(model)
    assert units.index(inner[0]) < units.index(inner) and model not in units and model[1] in units
    assert len({id(u) for u in units}) == len(units)


def test_torchrun_command_and_launch_arguments() -> None:
    cmd = dd.torchrun_command(2, ["-m", "descend", "train"])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    assert cmd[-3:] == ["-m", "descend", "train"]
    assert "--master_port=29555" in dd.torchrun_command(1, ["x.py"], master_port=29555)
    with pytest.raises(ValueError, match="nproc"):
        dd.torchrun_command(0, ["x.py"])
    with pytest.raises(ValueError, match="argv"):
        dd.launch(2, [])


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")
def test_entrypoint_names_the_rank_and_reraises(capsys: pytest.CaptureFixture[str]) -> None:
    @dd.entrypoint
    def main() -> None:
        raise ValueError("bad shard")

    with pytest.raises(ValueError):
        main()
    assert "descend: rank 0 failed: ValueError: bad shard" in capsys.readouterr().err


ENTRY_SCRIPT = """
import atexit, sys
from descend import distributed as dd
atexit.register(lambda: print("atexit ran", flush=True))

@dd.entrypoint
def main():
    print("main ran", end="")  # unflushed: the exit must flush it
    return 3

print("returned", main(), flush=True)
"""


@pytest.mark.parametrize("under_torchrun", [True, False])
def test_entrypoint_ends_a_torchrun_rank_without_finalisation(under_torchrun: bool) -> None:
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE")}
    if under_torchrun:
        env.update(RANK="0", WORLD_SIZE="1")
    done = subprocess.run([sys.executable, "-c", ENTRY_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    if under_torchrun:  # main's int is the exit code, atexit handlers ran, the caller never resumed
        assert (done.returncode, done.stdout) == (3, "main ranatexit ran\n"), done.stderr
    else:
        assert (done.returncode, done.stdout) == (0, "main ranreturned 3\natexit ran\n"), done.stderr


def test_checkpoint_round_trip_in_one_process_continues_exactly(tmp_path: Path) -> None:
    ref = job.run_case("adamw", "none", 8)
    model = dd.wrap(job.make_model(), "none")
    opt = job.OPTIMIZERS["adamw"](model.parameters())
    job.train(model, opt, 0, 3)
    dd.save_checkpoint(tmp_path / "step_000003", model, opt, extra={"step": 3})
    (tmp_path / "step_000009").mkdir()  # cut short: no .metadata
    assert dd.latest_checkpoint(tmp_path) == tmp_path / "step_000003"
    model = dd.wrap(job.make_model(), "none")
    opt = job.OPTIMIZERS["adamw"](model.parameters())
    extra = dd.load_checkpoint(dd.latest_checkpoint(tmp_path), model, opt)
    job.train(model, opt, extra["step"], 8)
    assert max_abs_diff(dd.full_state_dict(model), ref) == 0.0
    with pytest.raises(FileNotFoundError, match="metadata"):
        dd.load_checkpoint(tmp_path / "step_000009", model, opt)


def test_grad_norm_matches_torch_clip_grad_norm() -> None:
    model = job.make_model()
    x, y = job.problem()
    job.summed_loss(model, x, y).backward()
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
    assert dd.grad_norm(model.parameters()) == pytest.approx(float(expected), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Two gloo ranks under torchrun
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("equivalence") / "result.pt"
    code = dd.launch(2, [str(JOB), "equivalence", "--out", str(out)], env={"OMP_NUM_THREADS": "1"},
                     timeout_s=400)
    assert code == 0
    return torch.load(out, weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "ddp_flat"])
@pytest.mark.parametrize("case", list(job.OPTIMIZERS))
def test_two_ranks_equal_one_process_after_20_steps(equivalence_runs: dict[str, object], strategy: str,
                                                    case: str) -> None:
    assert equivalence_runs["world_size"] == 2
    # flat buffers draw bfloat16 state's rounding noise by their own positions: the reference is flat too
    flat = strategy == "ddp_flat"
    reference = job.run_case(case, "none", job.STEPS, "foreach" if flat else "auto", flat=flat)
    assert max_abs_diff(equivalence_runs[f"{strategy}/{case}"], reference) <= 1e-5


@pytest.mark.slow
def test_int8_state_is_refused_on_fsdp_shards_in_one_line(equivalence_runs: dict[str, object]) -> None:
    error = equivalence_runs["fsdp_int8_error"]
    assert isinstance(error, str) and "state_dtype='int8'" in error and "FSDP" in error and "\n" not in error


def test_clipping_case_really_clips() -> None:
    """The ``adamw_clip`` case above only tests the cross-shard norm if clipping is active."""
    model = job.make_model()
    x, y = job.problem()
    (job.summed_loss(model, x[:11], y[:11]) / 11).backward()
    assert dd.grad_norm(model.parameters()) > 0.05  # its max_grad_norm


@pytest.mark.slow
def test_every_optimizer_and_engine_steps_fsdp_dtensors(tmp_path: Path) -> None:
    out = tmp_path / "engines.pt"
    code, log, _ = torchrun(["engines", "--steps", "3", "--out", str(out)], timeout=480)
    assert code == 0, log[-4000:]
    runs = torch.load(out, weights_only=False)
    errors = {key: max_abs_diff(runs[key], job.run_case(key, "none", 3, engine, factory))
              for key, (factory, engine) in job.engine_cases().items()}
    assert set(errors) == {f"{n}/{e}" for n in optim.OPTIMIZERS for e in ("reference", "foreach", "compiled")}
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.slow
def test_fsdp_checkpoint_from_two_ranks_resumes_in_one_process(tmp_path: Path) -> None:
    code, log, _ = torchrun(["checkpoint", "--steps", "10", "--ckpt", str(tmp_path), "--out",
                             str(tmp_path / "unused.pt")], timeout=240)
    assert code == 0, log[-4000:]
    for name in job.CHECKPOINTED:
        model = dd.wrap(job.make_model(), "none")
        opt = job.OPTIMIZERS[name](model.parameters())
        extra = dd.load_checkpoint(tmp_path / name, model, opt)
        assert extra == {"step": 10}
        assert float(opt.state[model[0].weight]["step"]) == 10
        job.train(model, opt, 10, 20)
        assert max_abs_diff(dd.full_state_dict(model), job.run_case(name, "none", 20)) <= 1e-6, name


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exit", "raise"])
def test_failed_rank_ends_the_job_and_resume_succeeds(tmp_path: Path, mode: str) -> None:
    ckpt = tmp_path / "ckpt"
    code, log, seconds = torchrun(["fail", "--steps", "10", "--fail-step", "5", "--fail-rank", "1", "--mode", mode,
                                   "--ckpt", str(ckpt), "--out", str(tmp_path / "a.pt")], timeout=90)
    assert code != 0 and seconds < 60, (code, seconds)
    assert "rank      : 1 (local_rank: 1)" in log  # torchrun's root-cause summary
    if mode == "raise":
        assert "descend: rank 1 failed: RuntimeError: injected failure at step 5" in log
    assert dd.latest_checkpoint(ckpt) == ckpt / "step_000004"
    code, log, _ = torchrun(["fail", "--steps", "10", "--resume", "--ckpt", str(ckpt), "--out",
                             str(tmp_path / "b.pt")], timeout=240)
    assert code == 0, log[-4000:]
    run = torch.load(tmp_path / "b.pt", weights_only=False)
    assert run["resumed_from"] == 4
    assert max_abs_diff(run["final"], job.run_case("adamw", "none", 10)) <= 1e-5
