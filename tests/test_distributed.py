"""Training on several processes (gloo on the CPU): the sampler, the losses' global reduction, each method trained
on 2 processes against 1 process with the same global batch, and a killed 2-process run resumed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import RandomSampler

from recbole_llmser import distributed
from recbole_llmser.compat import load_checkpoint
from recbole_llmser.errors import LLMSeRError
from tests.conftest import tiny_config_dict, write_tiny_dataset
from tests.test_tslrec import make_tiny_lm

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- pure parts -------------------------------------------------------------------------------------------
def dealt(n, world, batch, seed=7):
    """Each process's batches from GlobalOrderSampler (no process group needed)."""
    out = []
    for rank in range(world):
        sampler = distributed.GlobalOrderSampler(list(range(n)), num_replicas=world, rank=rank, shuffle=True)
        sampler.generator, sampler.batch_size = torch.Generator().manual_seed(seed), batch
        order = list(sampler)
        assert len(order) == len(sampler)
        out.append([order[i:i + batch] for i in range(0, len(order), batch)])
    return out


@pytest.mark.parametrize("n", [40, 43, 47])
def test_global_order_sampler_gives_one_process_batches(n):
    one = list(RandomSampler(range(n), generator=torch.Generator().manual_seed(7)))
    per_rank = dealt(n, 2, 5)
    assert len({len(batches) for batches in per_rank}) == 1  # every process trains as many steps
    merged = [sorted(a + b) for a, b in zip(*per_rank)]
    assert merged == [sorted(one[i:i + 10]) for i in range(0, n, 10)]  # one process's batches of 10


def test_global_order_sampler_repeats_rows_only_when_steps_would_differ():
    # 41 rows, 2 processes of 4 rows per batch: 21 and 20 rows would be 6 and 5 batches; one row is repeated
    per_rank = dealt(41, 2, 4)
    rows = [r for batches in per_rank for b in batches for r in b]
    assert len({len(b) for b in per_rank}) == 1 and len(rows) == 42 and len(set(rows)) == 41


def test_backend_and_torchrun_settings():
    assert distributed.choose_backend("auto", on_gpu=False) == "gloo"
    assert distributed.choose_backend("auto", on_gpu=True) == "nccl"
    with pytest.raises(LLMSeRError, match="nccl needs GPUs"):
        distributed.choose_backend("nccl", on_gpu=False)
    env = {"LOCAL_RANK": "1", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h0",
           "MASTER_PORT": "29500"}
    assert distributed.torchrun_settings(env) == {"local_rank": 1, "offset": 2, "world_size": 4, "nproc": 2,
                                                  "ip": "h0", "port": 29500}
    assert distributed.torchrun_settings({}) == {}
    assert distributed.torchrun_settings({**env, "WORLD_SIZE": "1"}) == {}


def _weighted_grads(rank, port, out):
    import torch.distributed as dist

    from recbole_llmser.dct import across_processes, weighted_reduce

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    x = torch.randn(7, requires_grad=True)
    weight = torch.tensor([0.2, 1.0, 0.5, 0.0, 0.9, 0.3, 0.7])
    mine = slice(0, 3) if rank == 0 else slice(3, 7)  # uneven shares
    grads = {}
    for reduction in ("mean", "sum"):
        x.grad = None
        with across_processes(True):
            weighted_reduce(x[mine] ** 2, weight[mine], reduction).backward()
        dist.all_reduce(x.grad)
        grads[reduction] = (x.grad / 2).tolist()  # what DDP averages
    if rank == 0:
        torch.save(grads, out)
    dist.destroy_process_group()


def test_weighted_loss_is_exact_over_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    from recbole_llmser.dct import weighted_reduce

    mp.spawn(_weighted_grads, args=(free_port(), tmp_path / "grads.pt"), nprocs=2)
    got = torch.load(tmp_path / "grads.pt")
    torch.manual_seed(0)
    x = torch.randn(7, requires_grad=True)
    weight = torch.tensor([0.2, 1.0, 0.5, 0.0, 0.9, 0.3, 0.7])
    for reduction in ("mean", "sum"):
        x.grad = None
        weighted_reduce(x ** 2, weight, reduction).backward()
        assert got[reduction] == pytest.approx(x.grad.tolist(), abs=1e-6), reduction


def _leave_group(rank, ports, out):
    import torch.distributed as dist

    states = []
    for fail, port in zip((False, True), ports):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        with distributed.member({"single_spec": True}):  # a single-process config leaves nothing
            pass
        states.append(dist.is_initialized())
        try:
            with distributed.member({"single_spec": False}):
                dist.all_reduce(torch.ones(1))
                if fail:
                    raise RuntimeError("a failed run")
        except RuntimeError:
            pass
        states.append(dist.is_initialized())
    distributed.finish()  # no group: nothing to do
    torch.save(states, out / f"{rank}.pt")


def test_every_process_leaves_the_group_when_its_run_ends(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_leave_group, args=((free_port(), free_port()), tmp_path), nprocs=2)
    assert [torch.load(tmp_path / f"{r}.pt") for r in range(2)] == [[True, False, True, False]] * 2


# ----- whole runs: 2 processes against 1 ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    write_tiny_dataset(root / "data")
    return root


CASES = {
    "none": dict(method="none"),
    "llmser": dict(method="llmser", all_positions_batch="sequences"),
    "llmser-sample": dict(method="llmser", dct_mode="sample"),
    "llmser-rows-GRU4Rec": dict(method="llmser", model="GRU4Rec", dct_all_positions="off"),
    # BERT4Rec draws its masks from each process's own random stream (as dropout would): not the same numbers
    "llmser-BERT4Rec": dict(method="llmser", model="BERT4Rec", dct_all_positions="off", exact=False),
    "tslrec": dict(method="tslrec", tsl_num_categories=4, tsl_epochs=1, tsl_batch_size=8, tsl_max_tokens=64),
}


def one_run(world, case, nproc, cwd):
    from recbole_llmser.quick_start import run

    settings = dict(CASES[case])
    model = settings.pop("model", "SASRec")
    settings.pop("exact", None)
    if settings["method"] == "tslrec":
        lm = world / "lm"
        if not lm.is_dir():
            make_tiny_lm(lm)
        settings["tsl_lm"] = str(lm)
    cfg = tiny_config_dict(world / "data", hidden_dropout_prob=0.0, attn_dropout_prob=0.0, dropout_prob=0.0,
                           epochs=2, train_batch_size=32, ccg_epochs=1, llm_backend="offline", nproc=nproc,
                           port=free_port(), checkpoint_dir=str(world / "saved"), **settings)
    os.chdir(cwd)
    result = run(model, "tiny", config_dict=cfg, cmd_args=[])
    return result, load_checkpoint(result["checkpoint"], map_location="cpu")["state_dict"]


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_train_and_evaluate_as_one(world, case, tmp_cwd):
    two, weights_two = one_run(world, case, 2, tmp_cwd)
    run_dir = Path(two["run_dir"])  # only the first process wrote: one checkpoint, one log
    assert len(list(run_dir.glob("*.pth"))) == 1 and len(list(run_dir.glob("*.log"))) == 1
    assert (run_dir / "per_user.npz").is_file() and json.loads((run_dir / "results.json").read_text())["test"]
    assert two["epochs_trained"] == 2 and two["test"]["full"]["overall"]["n"] == 40
    if not CASES[case].get("exact", True):
        return
    one, weights_one = one_run(world, case, 1, tmp_cwd)
    assert weights_one.keys() == weights_two.keys()
    for key in weights_one:
        assert torch.allclose(weights_one[key], weights_two[key], atol=1e-5), key
    for split in ("valid", "test"):
        for protocol, result in one[split].items():
            other = two[split][protocol]
            assert [g["n"] for g in other["groups"]] == [g["n"] for g in result["groups"]]
            assert other["overall"] == pytest.approx(result["overall"], abs=1e-9)


# ----- a killed 2-process run resumes ----------------------------------------------------------------------------
def cli(world, run_name, nproc, extra=()):
    return [sys.executable, str(REPO / "run_recbole_llmser.py"), "--model=SASRec", "--dataset=tiny", "--method=none",
            f"--data_path={world / 'data'}", f"--checkpoint_dir={world / 'saved-cli'}", f"--run_name={run_name}",
            f"--nproc={nproc}", f"--port={free_port()}", "--epochs=40", "--stopping_step=100", "--hidden_size=16",
            "--inner_size=32", "--n_layers=1", "--n_heads=1", "--MAX_ITEM_LIST_LENGTH=10", "--train_batch_size=32",
            "--hidden_dropout_prob=0.0", "--attn_dropout_prob=0.0", "--show_progress=False", "--use_gpu=False",
            "--eval_protocols=[uni20, full]", "--group_bounds=[4, 7]", *extra]


def test_killed_two_process_run_resumes(world, tmp_cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    whole = subprocess.run(cli(world, "whole", 2), cwd=tmp_cwd, env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert "test" in whole.stdout + whole.stderr and "ndcg@10" in whole.stdout + whole.stderr

    state = world / "saved-cli" / "tiny" / "killed" / "train_state.pth"
    proc = subprocess.Popen(cli(world, "killed", 2), cwd=tmp_cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # a few epochs further
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both training processes, at once
    proc.wait()
    assert state.is_file(), "the run ended before it saved a training state"
    assert not (state.parent / "results.json").is_file()

    other_n = subprocess.run(cli(world, "killed", 1), cwd=tmp_cwd, env=env, capture_output=True, text=True,
                             timeout=600)
    assert other_n.returncode == 2 and "nproc" in other_n.stderr

    resumed = subprocess.run(cli(world, "killed", 2), cwd=tmp_cwd, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = json.loads((state.parent / "results.json").read_text())
    want = json.loads((world / "saved-cli" / "tiny" / "whole" / "results.json").read_text())
    assert got["resumed_at_epoch"] and got["resumed_at_epoch"] > 1
    assert got["epochs_trained"] == want["epochs_trained"]
    for split in ("valid", "test"):
        for protocol in want[split]:
            assert got[split][protocol]["overall"] == pytest.approx(want[split][protocol]["overall"], abs=1e-9)


def children_said(stderr: str) -> str:
    """What the training processes printed to stderr, without the launcher's own lines and traceback (a failed
    process's last words come before them)."""
    own = ("torch/distributed/elastic", "torch/distributed/run.py", "torchrun")
    lines = [line for line in stderr.splitlines() if not any(mark in line for mark in own)]
    return "\n".join(lines[-80:])


def test_torchrun_starts_the_same_run(world, tmp_cwd):
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}", *cli(world, "torchrun", 1)[1:]]
    cmd = [a for a in cmd if not a.startswith(("--nproc=", "--epochs="))] + ["--epochs=2"]
    done = subprocess.run(cmd, cwd=tmp_cwd, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, children_said(done.stderr)
    run_dir = world / "saved-cli" / "tiny" / "torchrun"
    assert json.loads((run_dir / "results.json").read_text())["epochs_trained"] == 2
    log = next(run_dir.glob("*.log")).read_text()
    assert "distributed: 2 processes (2 on this host), backend gloo" in log
