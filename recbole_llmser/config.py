"""Config: RecBole's defaults, then our property files, then the user's files and command line.

Precedence, later wins::

    RecBole defaults (recbole/properties/...)
      -> properties/overall.yaml
      -> properties/model/<Model>.yaml
      -> properties/dataset/<dataset>.yaml
      -> --config_files (in the order given)
      -> config_dict (Python callers)
      -> --key=value on the command line
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml
from recbole.config import Config as RecBoleConfig
from recbole.utils import ModelType

from recbole_llmser.compat import ConfigCompatMixin
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.methods import SECRET_KEYS
from recbole_llmser.registry import get_model
from recbole_llmser.schema import validate
from recbole_llmser.utils import PACKAGE_DIR, REPO_DIR

#: Command-line flags that belong to run_recbole_llmser.py itself, not to the config.
CLI_ONLY_KEYS = {"config_files", "dry_run"}


def properties_dir() -> Path:
    """The property folder: inside the installed package, or the source tree's top-level ``properties/``."""
    for candidate in (PACKAGE_DIR / "properties", REPO_DIR / "properties"):
        if (candidate / "overall.yaml").is_file():
            return candidate
    raise LLMSeRError(
        f"recbole_llmser's properties/overall.yaml is missing (looked in {PACKAGE_DIR} and {REPO_DIR}); "
        "reinstall the package"
    )


def bundled_dataset_dir() -> Path:
    """Folder of the datasets shipped with the source tree (``dataset/``)."""
    return REPO_DIR / "dataset"


def bundled_preset(name: str) -> Path | None:
    """The shipped preset property file ``properties/presets/<name>`` (``name`` with or without ``.yaml``), or
    None. Presets are passed like any property file: ``--config_files=<its path>``."""
    try:
        folder = properties_dir() / "presets"
    except LLMSeRError:
        return None
    name = Path(name).name
    for candidate in (folder / name, folder / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    return None


def read_yaml(path, loader=yaml.FullLoader) -> dict:
    """Read one yaml mapping, or raise a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        preset = bundled_preset(path.name)
        hint = f" (the bundled preset of that name is {preset}: pass that path)" if preset else ""
        raise LLMSeRError(f"{path}: config file not found{hint}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f.read(), Loader=loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise LLMSeRError(f"{path}: malformed YAML{where}: {problem}; fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LLMSeRError(f"{path}: expected a mapping of 'key: value' lines, got {type(data).__name__}")
    return data


def _yaml_value(value):
    """A command-line value that RecBole's conversion left a string, read as in the property files: ``~`` is null
    and ``[uni50, full]`` or ``{hidden_size: 64}`` a list or mapping (a string that is not valid YAML stays one)."""
    if value == "~":
        return None
    if isinstance(value, str) and value[:1] in "[{" and value[-1:] in "]}":
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    return value


class Config(ConfigCompatMixin, RecBoleConfig):
    """RecBole ``Config`` with recbole_llmser's property files layered on top.

    Args:
        model, dataset, config_file_list, config_dict: as in RecBole.
        cmd_args: the ``--key=value`` strings to apply last. ``None`` reads ``sys.argv[1:]`` as RecBole does.
    """

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None, cmd_args=None):
        self._cmd_args = list(sys.argv[1:] if cmd_args is None else cmd_args)
        self._secrets = {}
        super().__init__(model, dataset, config_file_list, config_dict)
        from recbole_llmser.utils import scrub_args

        # read (into self._secrets) and no longer needed: checkpoints pickle the config, never a key
        self._cmd_args = scrub_args(self._cmd_args, SECRET_KEYS)
        validate(self.final_config_dict)

    # ----- sources ---------------------------------------------------------------------------------------
    def _load_config_files(self, file_list):
        merged = {}
        for file in file_list or []:
            merged.update(read_yaml(file, self.yaml_loader))
        return merged

    def _load_cmd_line(self):
        cmd = {}
        for arg in self._cmd_args:
            if not arg.startswith("--") or "=" not in arg:
                continue  # positional words and bare flags belong to the CLI's own parser
            name, value = arg[2:].split("=", 1)
            if name in CLI_ONLY_KEYS:
                continue
            if name in cmd and cmd[name] != value:
                shown = ("***", "***") if name in SECRET_KEYS else (cmd[name], value)
                raise LLMSeRError(f"--{name} is given twice with different values ({shown[0]!r}, {shown[1]!r})")
            cmd[name] = value
        secrets = {k: cmd.pop(k) for k in SECRET_KEYS & cmd.keys()}  # kept as typed: a key is never converted
        cmd = self._convert_config_dict(cmd)
        return {**{k: _yaml_value(v) for k, v in cmd.items()},
                **{k: None if v == "~" else v for k, v in secrets.items()}}


    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
            if model is None:
                raise LLMSeRError("no model given: pass --model=<name>, e.g. --model=SASRec")
        if dataset is None:
            dataset = self.external_config_dict.get("dataset")
            if dataset is None:
                raise LLMSeRError("no dataset given: pass --dataset=<name>, e.g. --dataset=amazon-beauty")
        dataset = str(dataset)
        if dataset in ("", ".", "..") or "/" in dataset or "\\" in dataset:
            raise LLMSeRError(f"--dataset={dataset!r}: a dataset name, not a path — pass --dataset=<name> and "
                              "--data_path=<folder that contains <name>/>")
        if isinstance(model, str):
            model_class = get_model(model)
        else:
            model_class, model = model, model.__name__
        if getattr(model_class, "type", None) != ModelType.SEQUENTIAL:
            raise LLMSeRError(
                f"--model={model}: recbole_llmser trains sequential models; {model} is a "
                f"{getattr(model_class, 'type', 'non-sequential')} model (try SASRec, GRU4Rec or BERT4Rec)"
            )
        from recbole.model.abstract_recommender import AbstractRecommender

        if model_class.full_sort_predict is AbstractRecommender.full_sort_predict:
            raise LLMSeRError(
                f"--model={model}: {model} only scores given candidates with item features (no full_sort_predict); "
                "recbole_llmser needs a model that ranks all items (e.g. SASRec, GRU4Rec, BERT4Rec)"
            )
        return model, model_class, dataset

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        props = properties_dir()
        for path in (props / "overall.yaml", props / "model" / f"{model}.yaml"):
            if path.is_file():
                self.internal_config_dict.update(read_yaml(path, self.yaml_loader))
        dataset_file = props / "dataset" / f"{dataset}.yaml"
        # what RecBole's own dataset yaml (ml-100k, ...) and ours set counts as set: detection leaves it alone
        recbole_yaml = self._recbole_dataset_yaml(dataset)
        self._dataset_preset = set(read_yaml(recbole_yaml, self.yaml_loader)) if recbole_yaml else set()
        if dataset_file.is_file():
            dataset_dict = read_yaml(dataset_file, self.yaml_loader)
            self._dataset_preset |= set(dataset_dict)
            self.internal_config_dict.update(dataset_dict)
            self.parameters["Dataset"] += [k for k in dataset_dict if k not in self.parameters["Dataset"]]
        self.internal_config_dict["dataset_properties"] = str(dataset_file) if dataset_file.is_file() else None

    def _get_final_config_dict(self):
        final = super()._get_final_config_dict()
        for key in SECRET_KEYS & final.keys():
            value = final.pop(key)
            if value:
                self._secrets[key] = str(value)
            for source in (self.file_config_dict, self.variable_config_dict, self.cmd_config_dict,
                           self.external_config_dict, self.internal_config_dict):
                source.pop(key, None)
        # RecBole 1.2.1 rejects CE with negative sampling and BPR without it; pick the matching default
        # unless the user set train_neg_sample_args themselves.
        if "train_neg_sample_args" not in self.external_config_dict:
            loss = str(final.get("loss_type", "")).upper()
            if loss == "CE":
                final["train_neg_sample_args"] = None
            elif loss == "BPR" and not final.get("train_neg_sample_args"):
                final["train_neg_sample_args"] = {"distribution": "uniform", "sample_num": 1}
        return final

    def _set_default_parameters(self):
        user_set_path = "data_path" in self.external_config_dict
        super()._set_default_parameters()
        path = self.final_config_dict["data_path"]
        if not user_set_path and not os.path.isdir(path):
            bundled = bundled_dataset_dir() / self.dataset
            if bundled.is_dir():
                self.final_config_dict["data_path"] = str(bundled)
        self.final_config_dict["data_path"] = os.path.abspath(self.final_config_dict["data_path"])
        self._detect_dataset_fields()

    @staticmethod
    def _recbole_dataset_yaml(dataset):
        """RecBole's own property file for ``dataset`` (``ml-100k``, ...), or None."""
        import recbole

        path = Path(recbole.__file__).parent / "properties" / "dataset" / f"{dataset}.yaml"
        return path if path.is_file() else None

    def _detect_dataset_fields(self):
        """Fill in the dataset settings nobody set (fields, ``load_col``, ``item_text_field``) from the atomic files'
        headers (see :mod:`recbole_llmser.data.atomic`); ``fields_note`` describes the result for the log."""
        from recbole_llmser.data import atomic

        final = self.final_config_dict
        folder = Path(final["data_path"])
        inter, item = folder / f"{self.dataset}.inter", folder / f"{self.dataset}.item"
        self.fields_note = None
        if not inter.is_file():
            return  # a builder writes the files (its property file sets the fields), or prepare_dataset says so
        preset = {k: final.get(k) for k in atomic.DETECTED_KEYS
                  if k in self.external_config_dict or k in getattr(self, "_dataset_preset", ())}
        if len(preset) == len(atomic.DETECTED_KEYS):
            self.fields_note = atomic.describe_fields(final, [])
            return
        sep, encoding = final.get("field_separator") or "\t", final.get("encoding") or "utf-8"
        inter_fields = atomic.read_header(inter, sep, encoding)
        if inter_fields is None:
            raise LLMSeRError(f"{inter}: the file is empty — a RecBole .inter file starts with a header such as "
                              "user_id:token<TAB>item_id:token<TAB>timestamp:float")
        item_fields = atomic.read_header(item, sep, encoding, need_record=True) if item.is_file() else None
        settings, notes = atomic.detect_fields(inter_fields, item_fields, preset, inter, item)
        final.update(settings)
        self.fields_note = atomic.describe_fields(final, ["read from the files' headers"] + notes)

    # ----- secrets ---------------------------------------------------------------------------------------
    def secret(self, key: str, env: str | None = None):
        """A secret from the config, else from the environment variable ``env``; never logged."""
        return self._secrets.get(key) or (os.environ.get(env) if env else None) or None

    def __getstate__(self):
        from recbole_llmser.utils import scrub_args

        state = self.__dict__.copy()
        state["_secrets"] = {}  # checkpoints pickle the config: never the keys
        state["_cmd_args"] = scrub_args(state.get("_cmd_args") or [], SECRET_KEYS)
        for name in ("file_config_dict", "variable_config_dict", "cmd_config_dict", "external_config_dict",
                     "internal_config_dict", "final_config_dict"):  # (_get_final_config_dict popped them already)
            source = state.get(name)
            if isinstance(source, dict) and SECRET_KEYS & source.keys():
                state[name] = {k: v for k, v in source.items() if k not in SECRET_KEYS}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)

    def copy_with(self, **overrides) -> "Config":
        """A copy of this config with some final values replaced (secrets are kept)."""
        import copy as _copy

        other = _copy.copy(self)
        other.final_config_dict = {**self.final_config_dict, **overrides}
        other._secrets = dict(self._secrets)
        return other

    def to_dict(self) -> dict:
        """Plain, yaml-safe copy of the final config (secrets are never in it)."""
        return {k: _plain(v) for k, v in self.final_config_dict.items()}


def _plain(value):
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
