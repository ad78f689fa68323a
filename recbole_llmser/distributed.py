"""Training on several processes (and hosts) through torch.distributed, RecBole's way.

RecBole 1.2.1 trains on ``N`` processes when its Config holds ``local_rank``: every process builds the dataset and
the loaders (whose ``DistributedSampler`` gives each process ``1/N`` of the rows, ``train_batch_size / N`` rows per
batch), wraps the model in ``DistributedDataParallel`` (gradients averaged over the processes) and evaluates its
share of the validation rows. This module adds what the package needs on top:

* :func:`launch`: ``--nproc=N`` starts N processes on this host (``torch.multiprocessing.spawn``, as RecBole's
  ``run_recbole.py --nproc`` does), each running the same command with its ``local_rank``; ``world_size``,
  ``offset``, ``ip`` and ``port`` join processes of several hosts; under ``torchrun`` the processes exist already
  and :func:`torchrun_settings` reads their ranks from the environment.
* :func:`init_process_group` (called by our Config, see :mod:`recbole_llmser.compat`): ``gloo`` on CPUs,
  ``nccl`` on GPUs (``dist_backend`` overrides), instead of RecBole's hard-coded nccl and CUDA device.
* Exact weighted losses: DDP averages the processes' gradients, so a process whose batch loss is
  ``Σ w·ℓ / Σ w`` over its own rows would give the mean of per-process means; :func:`global_weight_sum` lets
  :func:`recbole_llmser.dct.weighted_reduce` divide by the weight sum of the whole global batch instead.
* :class:`GlobalOrderSampler`: the training rows of one epoch in the order one process would shuffle them, dealt
  round-robin, so N processes train on the same global batches as one process with the same ``train_batch_size``.
* :func:`gather_batches`: evaluation split by batches over the processes and gathered, equal to one process's.
* :func:`finish`: every process leaves the group when its run ends (a gloo group left to the interpreter's exit
  can abort the process after its work is done).
* :func:`broadcast` / :func:`gather`: the main process (global rank 0) builds the artifacts and writes every file;
  the others wait for it and read what it sends. Every collective takes the config whose work is shared: a
  config with ``single_spec`` (the helper models the main process trains alone) makes it a no-op.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.data import RandomSampler
from torch.utils.data.distributed import DistributedSampler

from recbole_llmser.errors import LLMSeRError

#: The properties that place a process among the others (RecBole's names); none of them changes a run's numbers
#: except ``nproc`` and ``world_size`` (the number of processes).
TORCHRUN_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def active(config=None) -> bool:
    """Whether this process is one of several of an initialised process group and, with ``config``, whether that
    config's work is shared by them (a run's is; the helper models the first process trains alone are not)."""
    if config is not None and config["single_spec"]:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank(config=None) -> int:
    return dist.get_rank() if active(config) else 0


def world_size(config=None) -> int:
    return dist.get_world_size() if active(config) else 1


def backend() -> str:
    return dist.get_backend() if active() else "none"


def is_main(config=None) -> bool:
    """Whether this process writes files and logs (global rank 0; every single-process run)."""
    if config is not None and not config["single_spec"]:
        return int(config["local_rank"]) + int(config["offset"] or 0) == 0
    return rank() == 0


def wants_processes(config) -> bool:
    """Whether ``config`` asks for several processes that are not started yet (``--nproc`` / ``world_size``)."""
    return bool(config["single_spec"]) and (int(config["nproc"]) > 1 or int(config["world_size"]) > 1)


def torchrun_settings(environ=os.environ) -> dict:
    """The config settings of a process that ``torchrun`` started (none outside torchrun or with one process)."""
    if "LOCAL_RANK" not in environ or int(environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    missing = [k for k in TORCHRUN_ENV if k not in environ]
    if missing:
        raise LLMSeRError(f"torchrun environment incomplete: {', '.join(missing)} not set")
    local = int(environ["LOCAL_RANK"])
    return {"local_rank": local, "offset": int(environ["RANK"]) - local, "world_size": int(environ["WORLD_SIZE"]),
            "nproc": int(environ["LOCAL_WORLD_SIZE"]), "ip": environ["MASTER_ADDR"],
            "port": int(environ["MASTER_PORT"])}


def choose_backend(requested: str, on_gpu: bool) -> str:
    """``dist_backend``: ``auto`` is nccl with GPUs, gloo on CPUs."""
    if requested == "auto":
        return "nccl" if on_gpu else "gloo"
    if requested == "nccl" and not on_gpu:
        raise LLMSeRError("dist_backend: nccl needs GPUs (use_gpu: true and CUDA); use gloo (or auto) on CPUs")
    return requested


def init_process_group(final: dict) -> None:
    """Join the process group described by the config dict ``final`` (RecBole's ``local_rank``, ``offset``,
    ``world_size``, ``ip``, ``port``; ours ``dist_backend``, ``dist_timeout``) and set its ``device``,
    ``single_spec`` and the quiet settings RecBole gives processes other than the first."""
    on_gpu = bool(final.get("use_gpu", True)) and torch.cuda.is_available() and str(final.get("gpu_id", "")) != ""
    backend = choose_backend(final.get("dist_backend") or "auto", on_gpu)
    local, offset = int(final["local_rank"]), int(final.get("offset") or 0)
    world = int(final["world_size"]) if int(final.get("world_size") or -1) > 0 else int(final["nproc"])
    final["world_size"] = world
    if on_gpu and local >= torch.cuda.device_count():
        raise LLMSeRError(f"local_rank {local} has no GPU: {torch.cuda.device_count()} visible (gpu_id: "
                          f"{final.get('gpu_id')!r}); lower nproc or list more GPUs in gpu_id")
    if not dist.is_initialized():
        # under torchrun its agent serves the rendezvous store on MASTER_PORT: join it through the environment
        init = "env://" if torchrun_settings() else f"tcp://{final['ip']}:{final['port']}"
        dist.init_process_group(backend=backend, init_method=init, rank=local + offset, world_size=world,
                                timeout=timedelta(minutes=float(final.get("dist_timeout") or 1440)))
    final["device"] = torch.device("cuda", local) if on_gpu else torch.device("cpu")
    final["single_spec"] = False
    if on_gpu:
        torch.cuda.set_device(local)
    elif "OMP_NUM_THREADS" not in os.environ:  # this host's cores shared by its processes (torchrun sets it itself)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(final["nproc"]))))
    if local + offset != 0:
        final["state"] = "error"
        final["show_progress"] = False
        final["verbose"] = False


def finish(ok: bool = True) -> None:
    """Leave the process group at the end of a process's run: after a run that ended normally, wait for the others
    (``ok``), then destroy it. A process that exits with its gloo group alive can abort (SIGABRT) while Python tears
    down the tensors the group's threads still hold, after its work is done (pytorch/pytorch#179291); torch's docs
    ask every process to call ``destroy_process_group`` near the end of its main. No-op without a group."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if ok and dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


@contextmanager
def member(config):
    """The body of one process's run, which leaves at the end the process group ``config`` joined (see
    :func:`finish`; nothing for a single-process config)."""
    if config["single_spec"]:
        yield
        return
    ok = False
    try:
        yield
        ok = True
    finally:
        finish(ok)


def launch(target, nproc: int, args: tuple):
    """Run ``target(local_rank, *args)`` in ``nproc`` new processes and wait for them (an error in one ends all and
    is raised here). Returns what the main process put on the queue passed as ``target``'s last argument."""
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(target, args=(*args, queue), nprocs=nproc, join=True)
    except mp.ProcessRaisedException as err:  # the process's traceback is in the message: its last line says why
        lines = str(err).strip().splitlines()
        raise LLMSeRError(f"training process {err.error_index} failed: {lines[-1] if lines else err}") from None
    except mp.ProcessExitedException as err:
        raise LLMSeRError(f"training process {err.error_index} ended with exit code {err.exit_code}"
                          + (f" (signal {err.signal_name})" if err.signal_name else "")) from None
    return None if queue.empty() else queue.get()


def broadcast(config, value, src: int = 0):
    """``value`` of process ``src`` in every process (any picklable value; no-op with one process)."""
    if not active(config):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather(config, value) -> list:
    """Every process's ``value``, in rank order (``[value]`` with one process)."""
    if not active(config):
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def global_weight_sum(local_sum: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(Σ of ``local_sum`` over the processes, number of processes); ``(local_sum, 1)`` with one process.

    DDP averages gradients over N processes, so a process that returns ``N · Σ_local w·ℓ / Σ_global w`` makes the
    averaged gradient that of ``Σ_global w·ℓ / Σ_global w``, the loss one process computes on the global batch."""
    if not active():
        return local_sum, 1
    total = local_sum.detach().clone()
    dist.all_reduce(total)
    return total, dist.get_world_size()


def broadcast_state_dict(config, module: torch.nn.Module, src: int = 0) -> None:
    """Make ``module``'s parameters and buffers those of process ``src`` (no file needed on the other hosts)."""
    if not active(config):
        return
    for tensor in module.state_dict().values():
        if isinstance(tensor, torch.Tensor):
            dist.broadcast(tensor.data, src=src)


class GlobalOrderSampler(DistributedSampler):
    """A ``DistributedSampler`` whose epoch order is the one a single process draws, dealt round-robin.

    One process's ``TrainDataLoader`` shuffles with a ``RandomSampler`` on the loader's generator (seeded with
    ``seed``, the same in every process); this sampler draws that permutation from the same generator, consumed the
    same way, and deals it out: process ``r`` takes rows ``r, r+N, r+2N, ...`` of it, so batch ``b`` of all N
    processes together is batch ``b`` of one process with ``train_batch_size`` rows (when it divides by N). The last
    batch may be shared unevenly (the losses reduce over the global batch, see :func:`row_mean_across` and
    :func:`recbole_llmser.dct.across_processes`). Only when that would leave some process a batch fewer than the
    others (which DDP cannot train) are the epoch's first rows repeated to even it out, as torch's own sampler always
    does: at most N-1 rows, seen twice."""

    batch_size = None  # set by use_global_order: the loader's rows per batch and process

    def _rows(self) -> int:
        """The epoch's rows before dealing: the dataset's, plus the repeated ones when they are needed."""
        n, w = len(self.dataset), self.num_replicas
        batches = {-(-len(range(r, n, w)) // self.batch_size) for r in range(w)}
        return n + (-n % w if len(batches) > 1 else 0)

    def __iter__(self):
        n = len(self.dataset)
        order = list(RandomSampler(range(n), generator=self.generator)) if self.shuffle else list(range(n))
        order += order[: self._rows() - n]
        return iter(order[self.rank::self.num_replicas])

    def __len__(self):
        return len(range(self.rank, self._rows(), self.num_replicas))


def use_global_order(loader) -> None:
    """Make a RecBole loader built for several processes deal its rows with :class:`GlobalOrderSampler` (RecBole
    builds a plain ``DistributedSampler``, recbole/data/dataloader/abstract_dataloader.py:60, whose order depends on
    the number of processes). Idempotent; no-op for a single-process loader."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler) and not isinstance(sampler, GlobalOrderSampler):
        sampler.__class__ = GlobalOrderSampler
        sampler.generator = loader.generator
        sampler.batch_size = loader.step


def row_mean_across(config, loss_func):
    """``loss_func`` (a model's ``calculate_loss``: a mean over the batch's rows), made to reduce over the global
    batch of all processes: each process's mean is scaled by N · (its rows) / (all processes' rows), so DDP's
    average of the processes' gradients is that of the mean over all rows, also when the processes hold
    different numbers of rows. Unchanged with one process."""
    if not active(config):
        return loss_func

    def loss(interaction):
        rows = torch.tensor(float(len(interaction)), device=config["device"])
        total, n = global_weight_sum(rows)
        scale = (n * rows / total).item()
        value = loss_func(interaction)
        return tuple(v * scale for v in value) if isinstance(value, tuple) else value * scale

    return loss


def gather_batches(config, batches, compute, skip=None) -> list:
    """``[compute(b) for b in batches]`` (``batches``: 0, 1, 2, ... possibly wrapped in a progress bar), each
    process computing every N-th batch and the results gathered in batch order into every process; ``skip(b)`` runs
    for the batches another process computes (to keep a random stream in step). One process computes them all."""
    if not active(config):
        return [compute(b) for b in batches]
    me, n = dist.get_rank(), dist.get_world_size()
    mine = {}
    for b in batches:
        if b % n == me:
            mine[b] = compute(b)
        elif skip is not None:
            skip(b)
    merged = {}
    for part in gather(config, mine):
        merged.update(part)
    return [merged[b] for b in sorted(merged)]
