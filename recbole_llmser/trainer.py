"""Trainers. ``SequentialTrainer`` is RecBole's ``Trainer`` with explicit, unique checkpoint names and
checkpoint loading that works on torch >= 2.6; later trainers (dual-channel training) extend it."""

from __future__ import annotations

import os

from recbole.trainer import Trainer

from recbole_llmser.compat import load_checkpoint
from recbole_llmser.utils import unique_stem


class SequentialTrainer(Trainer):
    """RecBole ``Trainer`` for sequential models.

    * ``saved_model_file`` is ``<checkpoint_dir>/<model>-<dataset>-<date-time-microseconds>-<random>.pth``:
      RecBole's own name has one-second resolution, so two models saved in one second overwrite each other.
    * Checkpoints (which pickle the Config) load with ``weights_only=False``; only files this trainer wrote.
    """

    def __init__(self, config, model):
        super().__init__(config, model)
        stem = unique_stem(config["model"], config["dataset"])
        self.saved_model_file = os.path.join(self.checkpoint_dir, f"{stem}.pth")

    def load_model_file(self, model_file=None):
        """Load the weights of ``model_file`` (default: this trainer's best checkpoint) into the model."""
        model_file = model_file or self.saved_model_file
        checkpoint = load_checkpoint(model_file, map_location=self.device)
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint.get("other_parameter"))
        self.logger.info(f"Loading model structure and parameters from {model_file}")
        return checkpoint

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if load_best_model and eval_data:
            self.load_model_file(model_file)
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)

    def resume_checkpoint(self, resume_file):
        resume_file = str(resume_file)
        checkpoint = self.load_model_file(resume_file)
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
