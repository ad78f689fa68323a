"""Every workaround that RecBole 1.2.1 needs on NumPy 2, torch >= 2.6 and pandas >= 2, in one place.

Importing this module calls :func:`apply` once; every module of the package that uses RecBole imports it (the
package's ``__init__`` does not, so ``--help`` needs no torch). Each fix names the RecBole 1.2.1 line it is for.
Nothing here copies RecBole code; the fixes either restore a removed name, or are small overrides that the
package's own classes inherit (``ConfigCompatMixin``, ``load_checkpoint``).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

_APPLIED = False

# NumPy 2 removed these aliases. RecBole 1.2.1 reads them:
#   recbole/config/configurator.py:628-635 (Config.compatibility_settings: np.float_, np.complex_, np.unicode_),
#   recbole/evaluator/metrics.py:90,128,131,190,196 (np.float), :287 (np.bool),
#   recbole/data/interaction.py:31 (np.float), recbole/data/dataset/dataset.py:652 (np.float),
#   recbole/model/abstract_recommender.py:309,316 and recbole/model/layers.py:932,941,1408,1415 (np.long),
#   recbole/trainer/hyper_tuning.py:386 (np.str).
_NUMPY_ALIASES = {
    "float_": np.float64,
    "complex_": np.complex128,
    "unicode_": np.str_,
    "float": np.float64,
    "int": np.int_,
    "bool": np.bool_,
    "object": np.object_,
    "str": np.str_,
    "complex": np.complex128,
    "unicode": np.str_,
    "long": np.int_,
}


def _restore_numpy_aliases() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NumPy 2 warns on *reading* np.object / np.str; we only set them
        for name, value in _NUMPY_ALIASES.items():
            try:
                getattr(np, name)
            except AttributeError:
                setattr(np, name, value)


def _check_pandas() -> None:
    # pandas 3 (copy-on-write) turns RecBole's chained ``df[field].fillna(..., inplace=True)`` into a silent
    # no-op: recbole/data/dataset/dataset.py:501 (token_seq NaN -> ""), :648 and :650 (NaN -> 0 / mean).
    # Missing values would then reach the models as NaN. setup.py pins pandas<3; refuse to run otherwise.
    import pandas as pd

    major = int(pd.__version__.split(".")[0])
    if major >= 3:
        raise ImportError(
            f"recbole_llmser: pandas {pd.__version__} is installed, but RecBole 1.2.1 silently skips NaN "
            "filling under pandas 3 (recbole/data/dataset/dataset.py:501,648,650); install 'pandas<3'."
        )


def _silence_known_warnings() -> None:
    # pandas 2.x warns on the same chained fillna lines (dataset.py:501,648,650); the warning is about the
    # pandas-3 behaviour handled above and would otherwise repeat for every feature field.
    warnings.filterwarnings("ignore", message=".*chained assignment.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*ChainedAssignment.*")
    # recbole/data/dataset/dataset.py:1217 (token_seq splitting) uses Series.agg(len), deprecated in pandas 2.
    warnings.filterwarnings("ignore", message=".*Series.agg cannot aggregate.*", category=FutureWarning)
    # recbole/trainer/trainer.py:235 builds torch.cuda.amp.GradScaler, deprecated in torch >= 2.4.
    warnings.filterwarnings("ignore", message=".*torch.cuda.amp.GradScaler.*", category=FutureWarning)
    # torch.utils.tensorboard (imported by recbole/utils/utils.py:25) warns about pkg_resources on import.
    warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")
    # peft <= 0.21's get_peft_model (TSLRec's tsl_lora) reads transformers' is_gradient_checkpointing, deprecated
    # in transformers 5 (transformers/modeling_utils.py warns on every LoRA model).
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*is deprecated.*", category=FutureWarning)


def _undo_global_anomaly_detection() -> None:
    # recbole/model/sequential_recommender/sine.py:25 calls torch.autograd.set_detect_anomaly(True) at import
    # time, and importing any RecBole sequential model imports that package: every backward pass of every
    # model then runs with anomaly detection (about 1.6x slower SASRec epochs here). Import it now, switch it off.
    import recbole.model.sequential_recommender  # noqa: F401
    import torch

    torch.autograd.set_detect_anomaly(False)


def _ddp_on_cpu() -> None:
    # recbole/trainer/trainer.py:62 (AbstractTrainer.__init__) wraps every model of a multi-process run in
    # DistributedDataParallel(model, device_ids=[local_rank]); torch refuses device_ids for a module on the CPU
    # (gloo). Give DDP device_ids only for a module on a GPU.
    import recbole.trainer.trainer as recbole_trainer
    from torch.nn.parallel import DistributedDataParallel

    def ddp(module, device_ids=None, **kwargs):
        on_cpu = next(module.parameters()).device.type == "cpu"
        return DistributedDataParallel(module, device_ids=None if on_cpu else device_ids, **kwargs)

    recbole_trainer.DistributedDataParallel = ddp


def apply() -> None:
    """Apply every fix once (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    _restore_numpy_aliases()
    _check_pandas()
    _silence_known_warnings()
    _undo_global_anomaly_detection()
    _ddp_on_cpu()
    _APPLIED = True


class ConfigCompatMixin:
    """Overrides of ``recbole.config.Config`` methods that are broken on current NumPy or leak state."""

    def compatibility_settings(self):
        # recbole/config/configurator.py:625-635 assigns np.float = np.float_ etc., which raises on NumPy 2
        # (np.float_ is gone). apply() has restored every alias already.
        apply()

    def _init_parameters_category(self):
        # recbole/config/configurator.py:95-99 stores RecBole's module-level lists (general_arguments, ...)
        # by reference and configurator.py:269 appends the dataset yaml's keys to dataset_arguments with
        # "+=", so every Config built in one process grows RecBole's global list. Copy them instead.
        from recbole.utils import (
            dataset_arguments,
            evaluation_arguments,
            general_arguments,
            training_arguments,
        )

        self.parameters = {
            "General": list(general_arguments),
            "Training": list(training_arguments),
            "Evaluation": list(evaluation_arguments),
            "Dataset": list(dataset_arguments),
        }

    def _init_device(self):
        # recbole/config/configurator.py:496-511 (Config._init_device) joins a multi-process run with
        # backend="nccl" and a CUDA device whatever the machine has, and asserts one gpu_id per process. Processes
        # on CPUs need gloo; recbole_llmser.distributed.init_process_group picks the backend by device
        # (dist_backend overrides) and RecBole's single-process branch stays as it is.
        if "local_rank" not in self.final_config_dict:
            return super()._init_device()
        from recbole_llmser.distributed import init_process_group

        final = self.final_config_dict
        gpu_id = final["gpu_id"]
        final["gpu_id"] = ",".join(map(str, gpu_id)) if isinstance(gpu_id, (tuple, list)) else str(gpu_id)
        if final.get("use_gpu", True) and final["gpu_id"]:
            import os

            os.environ["CUDA_VISIBLE_DEVICES"] = final["gpu_id"]
        init_process_group(final)


def load_checkpoint(path, map_location, digest_dir=None):
    """torch.load for checkpoints this package wrote, refused (one-line ``LLMSeRError``) for any other file.

    torch >= 2.6 defaults to ``weights_only=True``; RecBole's checkpoints pickle the Config
    (recbole/trainer/trainer.py:296-304), so recbole/trainer/trainer.py:323 (resume_checkpoint) and :583
    (evaluate with load_best_model=True) fail. Unpickling runs code, so the file is loaded only when its sha256 is
    the one this package recorded when it wrote it (``<path>.sha256``, or in ``digest_dir``; see
    ``recbole_llmser.utils.record_digest``).
    """
    import os

    import torch

    from recbole_llmser.errors import LLMSeRError
    from recbole_llmser.utils import digest_problem

    if not os.path.isfile(path):
        raise LLMSeRError(f"{path}: checkpoint not found")
    problem = digest_problem(path, digest_dir)
    if problem:
        raise LLMSeRError(f"{path} was not written by recbole_llmser (or changed since: {problem}); delete it to retrain")
    return torch.load(path, map_location=map_location, weights_only=False)


class _NoWriter:
    """A SummaryWriter that writes nothing (tensorboard off)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@contextmanager
def tensorboard_writer(folder):
    """While a trainer is built, make RecBole's writer write under ``<folder>/tensorboard`` (the run's folder), or
    nowhere when ``folder`` is None (``tensorboard: false``).

    recbole/trainer/trainer.py:115 (``Trainer.__init__``) always opens a ``SummaryWriter`` in
    ``./log_tensorboard/<log file name>/`` of the working directory (recbole/utils/utils.py ``get_tensorboard``),
    away from the run's other files, and for every helper model too.
    """
    import recbole.trainer.trainer as recbole_trainer

    def writer(logger):
        if folder is None:
            return _NoWriter()
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(Path(folder) / "tensorboard"))

    original = recbole_trainer.get_tensorboard
    recbole_trainer.get_tensorboard = writer
    try:
        yield
    finally:
        recbole_trainer.get_tensorboard = original


@contextmanager
def quiet_transformers_loading():
    """Silence transformers while a model loads (TSLRec's LM, the MiniLM text encoder), then restore its settings.

    transformers >= 5 prints a load-report table for every checkpoint key it does not use, which is every
    ``lm_head`` weight when ``AutoModel`` loads the base model of a ``*ForCausalLM`` checkpoint (expected: TSLRec
    needs hidden states, not next-token logits). (GGUF de-quantization draws its own tqdm bar, which transformers'
    switch does not reach: transformers/modeling_gguf_pytorch_utils.py:789.)
    """
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


apply()  # on import: see the module docstring
