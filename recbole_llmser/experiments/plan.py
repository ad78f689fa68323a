"""Plans: reading and validating a plan file, expanding it into run specs, run ids, the results folders."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import yaml

from recbole_llmser.errors import LLMSeRError
from recbole_llmser.experiments.keys import NON_SEMANTIC_KEYS, RUNNER_DEFAULTS, RUNNER_KEYS
from recbole_llmser.methods import METHODS

METHOD_CHOICES = METHODS  # none, llmser, tslrec, llmser+tslrec
#: The spec axes: set by the entry's fields, never through overrides.
AXES = ("dataset", "model", "method", "seed")
PLAN_KEYS = {"name", "results_dir", "common", "runs", "timeout_s", "description"}
ENTRY_KEYS = {"dataset", "model", "models", "method", "methods", "seeds", "seed", "config_files", "overrides", "label",
              "group", "x"}
#: The default ``results_dir`` of a plan; ``{dataset}`` is replaced by each dataset's name.
DEFAULT_RESULTS_DIR = "results/{dataset}"


def spec_id(dataset, model, method, seed, overrides) -> str:
    """Stable 12-hex id of a run: sha256 of the canonical JSON of its axes and semantic overrides."""
    semantic = {k: v for k, v in (overrides or {}).items() if k not in NON_SEMANTIC_KEYS}
    key = {"dataset": dataset, "model": model, "method": method, "seed": int(seed), "overrides": semantic}
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _as_list(value, what, where):
    values = value if isinstance(value, list) else [value]
    if not values or any(v is None or v == "" for v in values):
        raise LLMSeRError(f"{where}: '{what}' is empty")
    return values


def load_plan(path) -> dict:
    """Read and validate a plan file; returns the plan dict (with ``name`` and ``path`` filled in)."""
    path = Path(path)
    if not path.is_file():
        raise LLMSeRError(f"{path}: plan file not found")
    try:
        plan = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise LLMSeRError(f"{path}: malformed YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(plan, dict):
        raise LLMSeRError(f"{path}: expected a mapping with 'runs', got {type(plan).__name__}")
    plan = dict(plan)
    plan.setdefault("name", path.stem)
    plan["path"] = str(path)
    validate_plan(plan, str(path))
    return plan


def validate_plan(plan: dict, where: str = "plan") -> None:
    """Raise :class:`LLMSeRError` with one line naming the first problem of ``plan`` (and where it is)."""
    unknown = set(plan) - PLAN_KEYS - {"path"}
    if unknown:
        raise LLMSeRError(f"{where}: unknown key(s) {sorted(unknown)}; a plan has {sorted(PLAN_KEYS)}")
    if not isinstance(plan.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9._-]+", plan["name"]):
        raise LLMSeRError(f"{where}: 'name' must be a word of letters, digits, '.', '_' or '-'")
    if not isinstance(plan.get("common") or {}, dict):
        raise LLMSeRError(f"{where}: 'common' must be a mapping of properties")
    bad_common = set(plan.get("common") or {}) & set(AXES)
    if bad_common:
        raise LLMSeRError(f"{where}: 'common' may not set {sorted(bad_common)}; they are the run axes of each entry")
    _check_runner_keys(plan.get("common") or {}, f"{where}: 'common'")
    timeout = plan.get("timeout_s")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise LLMSeRError(f"{where}: 'timeout_s' must be a positive number of seconds or ~")
    runs = plan.get("runs")
    if not isinstance(runs, list) or not runs:
        raise LLMSeRError(f"{where}: 'runs' must be a non-empty list of entries")
    for i, entry in enumerate(runs):
        _validate_entry(plan, entry, f"{where}: runs[{i}]")


def _validate_entry(plan: dict, entry, at: str) -> None:
    if not isinstance(entry, dict):
        raise LLMSeRError(f"{at}: expected a mapping, got {type(entry).__name__}")
    unknown = set(entry) - ENTRY_KEYS
    if unknown:
        raise LLMSeRError(f"{at}: unknown key(s) {sorted(unknown)}; an entry has {sorted(ENTRY_KEYS)}")
    for key in ("dataset", "model", "method", "seeds"):
        alias = {"model": "models", "method": "methods", "seeds": "seed"}.get(key)
        if key not in entry and alias not in entry:
            if key == "method":
                continue  # default: llmser, as the package's own default
            raise LLMSeRError(f"{at}: missing '{key}'")
    if not isinstance(entry["dataset"], str):
        raise LLMSeRError(f"{at}: 'dataset' must be one dataset name (one entry per dataset)")
    for m in _as_list(entry.get("method", entry.get("methods", "llmser")), "method", at):
        if m not in METHOD_CHOICES:
            raise LLMSeRError(f"{at}: method {m!r}: expected one of {', '.join(METHOD_CHOICES)}")
    for s in _as_list(entry.get("seeds", entry.get("seed")), "seeds", at):
        if isinstance(s, bool) or not isinstance(s, int):
            raise LLMSeRError(f"{at}: seed {s!r} is not an integer")
    overrides = entry.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise LLMSeRError(f"{at}: 'overrides' must be a mapping of properties")
    overrides = {**entry_file_properties(entry, at), **overrides}
    bad = set(overrides) & set(AXES)
    if bad:
        raise LLMSeRError(f"{at}: overrides may not set {sorted(bad)}; use the entry's own fields")
    _check_runner_keys(overrides, f"{at}: overrides")
    group = entry.get("group", "main")
    if not isinstance(group, str) or not group:
        raise LLMSeRError(f"{at}: 'group' must be a name (main, ablation, sweep:<property>, ...)")
    if group.startswith("sweep:") and entry.get("x") is None:
        key = group[len("sweep:"):]
        merged = {**(plan.get("common") or {}), **overrides}
        if key not in merged:
            raise LLMSeRError(f"{at}: group {group!r} needs 'x' (the swept value) or an override of '{key}'")


def entry_file_properties(entry: dict, at: str = "plan") -> dict:
    """The properties of an entry's ``config_files`` (property yaml files, e.g. a preset: the same files a user
    passes with ``--config_files``), merged in order; a path is read from the current directory."""
    files = entry.get("config_files") or []
    files = files if isinstance(files, list) else str(files).split()
    from recbole_llmser.config import read_yaml

    merged = {}
    for name in files:
        try:
            merged.update(read_yaml(name, yaml.SafeLoader))
        except LLMSeRError as err:
            raise LLMSeRError(f"{at}: config_files: {err} (paths are read from the current directory)") from None
    return merged


def _check_runner_keys(properties: dict, where: str) -> None:
    bad = set(properties) & set(RUNNER_KEYS)
    if bad:
        raise LLMSeRError(f"{where} may not set {sorted(bad)}; the runner names each run's folder "
                          "<model>-<method>-<id>")


def expand_plan(plan: dict) -> list:
    """The runs of a plan, in plan order: one spec per (entry, model, method, seed).

    A spec: ``id, dataset, model, method, seed, overrides`` (common, then the entry's ``config_files`` in order,
    then its ``overrides``: a run's id depends on the values, not on where they came from; the runner defaults go
    to ``config_dict``), ``config_dict`` (what ``quick_start.run`` gets), ``group``, ``label``, ``x``, ``name``.
    The same id may occur in several entries (one run, several table memberships)."""
    validate_plan(plan, plan.get("path", "plan"))
    common = dict(plan.get("common") or {})
    specs = []
    for entry in plan["runs"]:
        overrides = {**common, **entry_file_properties(entry), **(entry.get("overrides") or {})}
        group = entry.get("group", "main")
        x = entry.get("x")
        if x is None and group.startswith("sweep:"):
            x = overrides[group[len("sweep:"):]]
        models = _as_list(entry.get("model", entry.get("models")), "model", "plan")
        methods = _as_list(entry.get("method", entry.get("methods", "llmser")), "method", "plan")
        seeds = _as_list(entry.get("seeds", entry.get("seed")), "seeds", "plan")
        for model in models:
            for method in methods:
                for seed in seeds:
                    specs.append(_spec(entry, model, method, seed, overrides, group, x))
    return specs


def _spec(entry, model, method, seed, overrides, group, x) -> dict:
    sid = spec_id(entry["dataset"], model, method, seed, overrides)
    config_dict = {**RUNNER_DEFAULTS, **overrides, "seed": int(seed), "method": method,
                   "run_name": f"{model}-{method}-{sid}"}
    label = entry.get("label")
    return {
        "id": sid, "dataset": entry["dataset"], "model": model, "method": method, "seed": int(seed),
        "overrides": overrides, "config_dict": config_dict, "group": group, "label": label, "x": x,
        "name": f"{entry['dataset']}/{model}/{method}/seed{seed}" + (f" [{label}]" if label else ""),
    }


def unique_runs(specs: list) -> list:
    """One spec per id (the first), in plan order."""
    seen, out = set(), []
    for s in specs:
        if s["id"] not in seen:
            seen.add(s["id"])
            out.append(s)
    return out


def select_specs(specs: list, only=None) -> list:
    """Specs whose name, id, group or label contains ``only`` (case-insensitive); all when ``only`` is empty."""
    if not only:
        return list(specs)
    needle = only.lower()
    return [s for s in specs
            if any(needle in str(v).lower() for v in (s["name"], s["id"], s["group"], s["label"] or ""))]


def _results_template(plan: dict, override=None) -> str:
    template = str(override or plan.get("results_dir") or DEFAULT_RESULTS_DIR)
    datasets = {e["dataset"] for e in plan["runs"]}
    if "{dataset}" not in template and len(datasets) > 1:
        template = template.rstrip("/") + "/{dataset}"
    return template


def results_dir_for(plan: dict, dataset: str, override=None) -> Path:
    """``results_dir`` (CLI override, else the plan's, else ``results/{dataset}``) with ``{dataset}`` replaced;
    a plan over several datasets without ``{dataset}`` gets ``/<dataset>`` appended."""
    return Path(_results_template(plan, override).replace("{dataset}", dataset))


def results_root_for(plan: dict, override=None):
    """The folder that holds one results folder per dataset (``results`` for ``results/{dataset}``), where the
    results index goes; None when ``results_dir`` does not end in a ``{dataset}`` folder of its own."""
    template = _results_template(plan, override).rstrip("/")
    parent, _, last = template.rpartition("/")
    if last != "{dataset}" or "{dataset}" in parent:
        return None
    return Path(parent or ".")


def format_overrides(overrides: dict) -> str:
    """``key=value, ...`` of the overrides that change a run's numbers (``-`` when none)."""
    return ", ".join(f"{k}={v}" for k, v in overrides.items() if k not in NON_SEMANTIC_KEYS) or "-"
