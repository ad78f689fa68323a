"""Trainers. ``SequentialTrainer`` is RecBole's ``Trainer`` with explicit, unique checkpoint names and
checkpoint loading that works on torch >= 2.6; ``DualChannelTrainer`` adds dual-channel training (DCT)."""

from __future__ import annotations

import copy
import os
import random

import numpy as np
import torch
from recbole.data.dataloader import TrainDataLoader
from recbole.trainer import Trainer

from recbole_llmser import distributed
from recbole_llmser.compat import load_checkpoint, tensorboard_writer
from recbole_llmser.dct import (
    CHANNEL_FIELD,
    TARGET_LIST_FIELD,
    WEIGHT_FIELD,
    WEIGHT_LIST_FIELD,
    across_processes,
    all_positions_loss,
    bert4rec_weighted_loss,
    is_bert4rec,
    row_weighted_loss_fct,
    sample_channels,
    sampled_rows,
    supports_per_row_loss,
    uses_all_positions,
)
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.methods import uses_llmser
from recbole_llmser.progress import HeartbeatLoader, duration
from recbole_llmser.utils import atomic_file_with_digest, digest_problem, unique_stem

#: Format tag of the training-state file (``train_state.pth``) a resumable run writes after every validated epoch.
TRAIN_STATE_FORMAT = "recbole_llmser.train_state/1"


def kept_epoch(valid_curve, cur_step: int):
    """1-based epoch of the checkpoint the trainer kept. RecBole's early stopping counts in the trainer's
    ``cur_step`` the validations since the best score last changed, so the kept epoch is the validated epoch
    ``cur_step`` places before the last one (as RecBole's own "best eval result in epoch" message computes it).
    ``valid_curve``: ``[(epoch_idx, score), ...]`` of the validated epochs in order, ``epoch_idx`` 0-based as RecBole
    logs it. None when no epoch was validated, or when the kept one precedes the curve (a resumed run)."""
    if cur_step >= len(valid_curve):
        return None
    return valid_curve[-1 - cur_step][0] + 1


def epoch_estimate(seconds: float, epochs: int, early_stopping: bool, done: int = None, total: int = None) -> str:
    """One log line: how long an epoch takes (measured on ``done`` of ``total`` batches) and what ``epochs``
    epochs take at that pace."""
    measured = f" (measured on {done} of {total} batches)" if done and total and done < total else ""
    line = f"an epoch takes about {duration(seconds)}{measured}"
    if epochs <= 1:
        return line
    rest = f"{epochs} epochs take about {duration(seconds * epochs)} at this pace"
    return f"{line}; " + (f"at most {rest} (early stopping may end sooner)" if early_stopping else rest)


class SequentialTrainer(Trainer):
    """RecBole ``Trainer`` for sequential models.

    * ``saved_model_file`` is ``<checkpoint_dir>/<model>-<dataset>-<date-time-microseconds>-<random>.pth``:
      RecBole's own name has one-second resolution, so two models saved in one second overwrite each other.
    * Checkpoints (which pickle the Config) are written atomically with their sha256 beside them
      (``<file>.sha256``) and load with ``weights_only=False`` only when that sha256 matches: only files this
      package wrote (see :func:`~recbole_llmser.compat.load_checkpoint`). ``record_digest = False`` keeps RecBole's
      plain ``torch.save`` (the CCG helpers, which record their digest once trained).
    * With ``train_state_file`` set, ``fit`` writes that file (atomically) after every validated epoch: weights,
      optimizer, early-stopping counters, losses, the validation curve and every random-number state training
      uses; when the file exists at the start of ``fit``, training continues from it and ends as the uninterrupted
      run would (same batches, same numbers on the same machine); the file's sha256 is recorded beside it and
      checked before it is loaded, as is the best checkpoint's. ``valid_curve`` holds ``(epoch_idx, score)`` of
      every validated epoch (RecBole's 0-based ``epoch_idx``), ``resumed_from`` the epoch index a resumed run
      restarted at (``None`` otherwise).
    * On several processes (``nproc``; RecBole wraps the model in ``DistributedDataParallel``): the training rows
      are dealt in the order one process would shuffle them (:class:`~recbole_llmser.distributed.GlobalOrderSampler`),
      weighted losses reduce over the global batch (:func:`~recbole_llmser.dct.across_processes`), only the first
      process writes checkpoints and the training state (which keeps every process's random-number states), and
      the others receive the kept weights from it (:meth:`load_model_file`).
    * BERT4Rec (with RecBole's ``calculate_loss``) trains on :func:`~recbole_llmser.dct.bert4rec_weighted_loss`
      with every weight 1: RecBole's loss, scoring only the real masked positions (0.64x RecBole's epoch time on
      amazon-beauty, ``benchmarks/dct_epoch_cost.py --model=BERT4Rec``).
    """

    def __init__(self, config, model):
        with tensorboard_writer(config["checkpoint_dir"] if config["tensorboard"] else None):
            super().__init__(config, model)
        # one name in every process (only the first writes it)
        stem = distributed.broadcast(config, unique_stem(config["model"], config["dataset"]))
        self.saved_model_file = os.path.join(self.checkpoint_dir, f"{stem}.pth")
        self.train_state_file = None
        self.record_digest = True
        self.valid_curve = []
        self.resumed_from = None
        self._estimated = False

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        """RecBole's ``fit``, resumable through ``train_state_file`` (see the class)."""
        state_file = self.train_state_file
        # the first process's view of the file (the others may run on hosts without it)
        resume = bool(state_file) and distributed.broadcast(self.config, os.path.isfile(state_file))
        if resume and self._restore_train_state(state_file, train_data, saved):
            return self.best_valid_score, self.best_valid_result  # the interrupted run had finished training

        def after_validation(epoch_idx, valid_score):
            self.valid_curve.append((epoch_idx, float(valid_score)))
            if callback_fn:
                callback_fn(epoch_idx, valid_score)
            if state_file:
                self._save_train_state(state_file, epoch_idx, train_data)

        return super().fit(train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress,
                           callback_fn=after_validation)

    def _train_generators(self, train_data):
        """The torch generators that shuffle training batches (their states are part of the training state)."""
        return [train_data.generator]

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        """RecBole's checkpoint, written through a temp file and a rename, with its sha256 in ``<file>.sha256``."""
        if not self.record_digest:
            return super()._save_checkpoint(epoch, verbose=verbose, **kwargs)
        path = kwargs.pop("saved_model_file", self.saved_model_file)
        if not distributed.is_main(self.config):
            return None
        with atomic_file_with_digest(path, "wb") as f:
            super()._save_checkpoint(epoch, verbose=False, saved_model_file=f, **kwargs)  # torch.save takes a file
        if verbose:
            self.logger.info(f"Saving current: {path}")
        return None

    def _rng_state(self, train_data) -> dict:
        numpy_state = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
            "python": random.getstate(),
            "loaders": [g.get_state() for g in self._train_generators(train_data)],
        }

    def _save_train_state(self, path, epoch_idx, train_data):
        rngs = distributed.gather(self.config, self._rng_state(train_data))  # every process's: each resumes its own
        if not distributed.is_main(self.config):
            return
        state = {
            "format": TRAIN_STATE_FORMAT,
            "model": self.config["model"],
            "epoch": epoch_idx,
            "cur_step": self.cur_step,
            "stopped": self.cur_step > self.stopping_step,  # RecBole's early_stopping stops past stopping_step
            "best_valid_score": float(self.best_valid_score),
            "best_valid_result": {k: float(v) for k, v in (self.best_valid_result or {}).items()},
            "train_loss_dict": {int(k): float(v) for k, v in self.train_loss_dict.items()},
            "valid_curve": [[int(e), float(v)] for e, v in self.valid_curve],
            "saved_model_file": os.path.basename(self.saved_model_file),
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": rngs[0],
            **({"rng_by_rank": rngs} if len(rngs) > 1 else {}),
        }
        with atomic_file_with_digest(path, "wb") as f:
            torch.save(state, f)

    def _read_train_state(self, path, saved):
        problem = digest_problem(path)
        if problem:
            raise LLMSeRError(f"{path} was not written by recbole_llmser (or changed since: {problem}); delete it to "
                              "train this run from the start")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise LLMSeRError(f"{path}: not a readable training state ({type(err).__name__}); delete it to "
                              "train this run from the start") from None
        if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
            raise LLMSeRError(f"{path}: not a recbole_llmser training state; delete it to train from the start")
        if state["model"].lower() != self.config["model"].lower():
            raise LLMSeRError(f"{path}: training state of {state['model']}, not {self.config['model']}; "
                              "delete it or choose another run_name")
        ranks = len(state.get("rng_by_rank", [state["rng"]]))
        if ranks != distributed.world_size(self.config):
            raise LLMSeRError(f"{path}: training state of a run on {ranks} process(es), resumed on "
                              f"{distributed.world_size(self.config)}; resume it with nproc/world_size as it started")
        checkpoint = os.path.join(os.path.dirname(os.path.abspath(path)), state["saved_model_file"])
        if saved and os.path.isfile(checkpoint):
            problem = digest_problem(checkpoint)
            if problem:
                raise LLMSeRError(f"{checkpoint} was not written by recbole_llmser (or changed since: "
                                  f"{problem}); delete its run folder {os.path.dirname(os.path.abspath(path))} (or "
                                  "choose another run_name) to train this run again")
        return state

    def _restore_train_state(self, path, train_data, saved=True) -> bool:
        """Load ``path`` (written by ``_save_train_state``); returns whether that run had finished training.
        Refuses a file whose sha256 is not the one recorded when it was written, and (``saved``) a best checkpoint
        of the interrupted run that is not this package's either (before any training, not at the end). With
        several processes the first reads the file and sends it to the others."""
        mine = self._read_train_state(path, saved) if distributed.is_main(self.config) else None
        state = distributed.broadcast(self.config, mine)
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = state["epoch"] + 1
        self.cur_step = state["cur_step"]
        self.best_valid_score = state["best_valid_score"]
        self.best_valid_result = dict(state["best_valid_result"]) or None
        self.train_loss_dict = dict(state["train_loss_dict"])
        self.valid_curve = [(int(e), float(v)) for e, v in state["valid_curve"]]
        self.saved_model_file = os.path.join(os.path.dirname(os.path.abspath(path)), state["saved_model_file"])
        rng = state["rng_by_rank"][distributed.rank(self.config)] if "rng_by_rank" in state else state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        kind, keys, *rest = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
        for generator, generator_state in zip(self._train_generators(train_data), rng["loaders"]):
            generator.set_state(generator_state)
        self.resumed_from = self.start_epoch
        finished = state["stopped"] or self.start_epoch >= self.epochs
        self.logger.info(f"Training state loaded from {path}: "
                         + ("training had finished" if finished else f"resuming after epoch {state['epoch']}"))
        return finished

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if loss_func is None and is_bert4rec(self.model):
            loss_func = self._bert4rec_loss
        estimate = None
        if not self._estimated:  # the first epoch this process trains: after its first batches, say how long it takes
            self._estimated = True
            early = self.config["eval_step"] <= self.epochs and bool(self.stopping_step)
            estimate = lambda seconds, done, total: self.logger.info(  # noqa: E731
                f"train epoch {epoch_idx}: " + epoch_estimate(seconds, self.epochs - epoch_idx, early, done, total))
        distributed.use_global_order(train_data)  # several processes: one process's batches, dealt out
        if estimate is not None or not show_progress:  # no bar: heartbeat lines in the log instead
            train_data = HeartbeatLoader(train_data, f"train epoch {epoch_idx}", not show_progress, estimate)
        if loss_func is None:  # the model's own loss, a mean over the batch's rows
            loss_func = distributed.row_mean_across(self.config, self.model.calculate_loss)
        with across_processes(not self.config["single_spec"]):
            return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)

    def _bert4rec_loss(self, interaction):
        ones = torch.ones(len(interaction), device=self.device)
        return bert4rec_weighted_loss(self.model, interaction, ones, "mean")

    def load_model_file(self, model_file=None):
        """Load the weights of ``model_file`` (default: this trainer's best checkpoint) into the model."""
        model_file = model_file or self.saved_model_file
        checkpoint = None
        if distributed.is_main(self.config):  # with several processes the others receive its weights
            checkpoint = load_checkpoint(model_file, map_location=self.device)
            self.model.load_state_dict(checkpoint["state_dict"])
            self.model.load_other_parameter(checkpoint.get("other_parameter"))
            self.logger.info(f"Loading model structure and parameters from {model_file}")
        distributed.broadcast_state_dict(self.config, self.model)
        return checkpoint

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model and eval_data:
            self.load_model_file(model_file)
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)

    def resume_checkpoint(self, resume_file):
        resume_file = str(resume_file)
        checkpoint = self.load_model_file(resume_file)
        keep = ("epoch", "cur_step", "best_valid_score", "optimizer")
        checkpoint = distributed.broadcast(self.config, checkpoint and {**{k: checkpoint[k] for k in keep},
                                                           "config": {"model": checkpoint["config"]["model"]}})
        self.saved_model_file = resume_file
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        if checkpoint["config"]["model"].lower() != self.config["model"].lower():
            self.logger.warning(
                f"checkpoint {resume_file} was trained as {checkpoint['config']['model']}, "
                f"not {self.config['model']}"
            )
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")


class _ScaledTrainDataLoader(TrainDataLoader):
    """RecBole's ``TrainDataLoader`` with ``scale`` x the configured number of dataset rows per batch and its
    shuffle generator seeded with ``seed``."""

    def __init__(self, config, dataset, sampler, shuffle, scale=1.0, seed=None):
        self._scale = scale
        super().__init__(config, dataset, sampler, shuffle=shuffle)
        if seed is not None:
            self.generator.manual_seed(seed)

    def _init_batch_size_and_step(self):
        super()._init_batch_size_and_step()
        self.step = max(1, round(self.step * self._scale))
        self.set_batch_size(self.step * self.times)


class DualChannelTrainer(SequentialTrainer):
    """Trains on an ``AugmentedSequentialDataset`` with the objective Σ_rows w_row · ℓ(row) (see ``dct.py``).

    * ``dct_mode: exact``, rows layout: per-row losses through the model's own ``calculate_loss`` with a per-row
      weighted ``loss_fct`` (SASRec, GRU4Rec, NARM, ... with CE or BPR), or BERT4Rec's masked objective per row.
    * windows layout (all positions, SASRec / GRU4Rec; also plain training with ``train_all_positions``): one
      forward per window, the loss over every trained position. ``all_positions_batch: rows`` sizes batches to
      hold on average ``train_batch_size`` training rows (so an epoch has as many steps as with rows);
      ``sequences``: ``train_batch_size`` windows per batch.
    * ``dct_mode: sample``: every epoch each user trains on its augmented rows with probability w̃_u, else on its
      original rows (shared rows always), through the model's unchanged ``calculate_loss``; any model.

    Validation, early stopping on ``valid_metric`` and checkpoints are RecBole's ``fit``.
    """

    def __init__(self, config, model):
        super().__init__(config, model)
        self.dct_mode = config["dct_mode"] if uses_llmser(config) else "exact"
        self.reduction = config["dct_reduction"]
        self._windows_loader = (None, None)  # (train_data it was built for, loader)
        self._row_loss_kind = "bert4rec" if is_bert4rec(model) else "loss_fct"
        if (self.dct_mode == "exact" and not uses_all_positions(config) and self._row_loss_kind == "loss_fct"
                and not supports_per_row_loss(getattr(model, "loss_fct", None))):
            raise LLMSeRError(
                f"dct_mode: exact needs per-row losses; {config['model']} has no RecBole CE/BPR loss_fct "
                "(supported: SASRec, GRU4Rec, BERT4Rec, NARM, ...); use dct_mode: sample"
            )

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        dataset = train_data._dataset
        layout = getattr(dataset, "dct_layout", None)
        if layout is None:
            raise LLMSeRError("DualChannelTrainer trains on an AugmentedSequentialDataset (see create_dataset)")
        if layout == "windows":
            train_data, loss_func = self._windows(train_data), loss_func or self._all_positions_loss
        elif self.dct_mode == "sample":
            train_data = self._sampled(train_data, epoch_idx)  # loss_func None: the model's calculate_loss
        else:
            loss_func = loss_func or self._row_loss
        return super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)

    # ----- losses -----------------------------------------------------------------------------------------
    def _row_loss(self, interaction):
        weight = interaction[WEIGHT_FIELD]
        if self._row_loss_kind == "bert4rec":
            return bert4rec_weighted_loss(self.model, interaction, weight, self.reduction)
        with row_weighted_loss_fct(self.model, weight, self.reduction):
            return self.model.calculate_loss(interaction)

    def _all_positions_loss(self, interaction):
        return all_positions_loss(self.model, interaction, self.reduction, self._negatives)

    def _negatives(self, users, items):
        return self._neg_sampler.sample_by_user_ids(users.cpu().numpy(), items.cpu().numpy(), 1)

    # ----- epoch loaders ----------------------------------------------------------------------------------
    def _train_generators(self, train_data):
        generators = super()._train_generators(train_data)
        if getattr(train_data._dataset, "dct_layout", None) == "windows":
            generators.append(self._windows(train_data).generator)
        return generators

    def _loader(self, train_data, dataset, scale=1.0, seed=None):
        loader = _ScaledTrainDataLoader(self.config, dataset, train_data._sampler, train_data.shuffle, scale, seed)
        loader.model = train_data.model
        return loader

    def _windows(self, train_data):
        """The windows loader, built once: batches sized per ``all_positions_batch``; for BPR the negative
        sampler excludes every training target of the user, as with rows."""
        if self._windows_loader[0] is not train_data:
            dataset = train_data._dataset
            by_rows = self.config["all_positions_batch"] == "rows"
            scale = len(dataset) / dataset.dct_n_rows if by_rows else 1.0
            self._windows_loader = (train_data, self._loader(train_data, dataset, scale))
            if self.model.loss_type == "BPR":
                self._neg_sampler = copy.copy(train_data._sampler)
                self._neg_sampler.used_ids = window_targets_by_user(dataset)
        return self._windows_loader[1]

    def _sampled(self, train_data, epoch_idx):
        """This epoch's rows of ``dct_mode: sample`` (same draw in every process: seeded by seed and epoch)."""
        dataset = train_data._dataset
        inter = dataset.inter_feat
        chosen = sample_channels(dataset.dct_user_weight, self.config["seed"], epoch_idx)
        keep = sampled_rows(inter[dataset.uid_field].numpy(), inter[CHANNEL_FIELD].numpy(), chosen)
        subset = dataset.copy(inter[torch.from_numpy(np.flatnonzero(keep))])
        seed = int(np.random.SeedSequence([int(self.config["seed"]) % 2**32, epoch_idx]).generate_state(1)[0])
        return self._loader(train_data, subset, seed=seed)


def window_targets_by_user(dataset):
    """Per user id, the set of items that are a trained target of one of its windows (BPR's used ids)."""
    inter = dataset.inter_feat
    active = inter[WEIGHT_LIST_FIELD].numpy() > 0
    users = np.broadcast_to(inter[dataset.uid_field].numpy()[:, None], active.shape)[active]
    items = inter[TARGET_LIST_FIELD].numpy()[active]
    used = np.array([set() for _ in range(dataset.user_num)])
    for u, i in zip(users.tolist(), items.tolist()):
        used[u].add(i)
    return used
