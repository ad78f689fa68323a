"""Scale benchmark: wall time and peak RSS of every LLMSeR stage on synthetic data of 10k, 100k and 1M users.

    nice -n 10 python benchmarks/scale.py                         # 10k and 100k, then 1M for what fits
    python benchmarks/scale.py --sizes=10000 --stages=load,ccg_score   # a part (results are cached: resumable)
    python benchmarks/scale.py --helper_loss=BPR --stages=load,ccg_epoch,ccg_score   # helpers with a sampled loss

Data: one synthetic dataset per size, shaped like the bundled amazon-beauty (read at generation time): the same
item-count / user-count ratio, sequence lengths drawn from its empirical length distribution, item popularity a
Zipf law whose exponent is fitted to its popularity-by-rank curve, items distinct within a user, titles generated
from a small vocabulary. The atomic files (``.inter``, ``.item``) are written once per size into
``results/benchmarks/_work/scale/data/`` (git-ignored) and reused by later runs.

Stages, each driven through the package's own functions (the ones ``augment/pipeline.py`` and ``quick_start.py``
call), each timed on its own in a child process per stage and size (``--child``), one child at a time:

* ``load``: ``create_dataset`` (atomic-file checks, RecBole's loader, our per-user arrays) + ``dataset_prefixes``;
* ``ccg_epoch``: one epoch of the reverse CCG helper (``train_helper``, building its prefix dataset included); the
  forward helper (the same cost) is trained untimed before the LLM stages, which need it for ARV;
* ``ccg_score``: the reverse helper's top K candidates for every selected user (``score_top_k``, as ``ccg.run``);
* ``item_vectors``, ``snf``, ``arv``, ``artifact_write``: ``stage_context`` (item texts, TF-IDF vectors, the LLM
  client), ``snf.llm_requests`` + ``snf.run``, ``arv.run``, then ``pipeline.write_artifact`` of
  ``pipeline._records`` (streamed) + the summary. SNF and ARV ask ``tests/llm_server.py``'s OpenAI-compatible
  server (answering at once, in the parent process, apart from the child measured) through the real ``openai``
  client at ``llm_concurrency`` 32, the requests streamed from generators (``LLMClient.stream``: a bounded window
  in flight, each answer cached as it arrives). These four share one child, because SNF's state (the prompts'
  shown orders, tokens, statuses) feeds ARV and the records; the peak RSS is reset between them (``/proc/self/clear_refs``);
* ``dct_load``, ``dct_data``: ``create_dataset`` of the augmented dataset (the atomic files again, and the artifact
  streamed), then ``data_preparation`` (the dual-channel windows, validation and test with P_u);
* ``dct_epoch``: one training epoch of SASRec through ``DualChannelTrainer`` (exact DCT, all-positions path).

Per stage: seconds, the peak RSS while it ran (the child's high-water mark, reset when the stage starts: what the
setup before it keeps resident is included; ``start`` is the RSS it started from) and, between consecutive sizes,
the growth exponent ``log(t2/t1) / log(n2/n1)`` (1 = linear in users). A stage that did not run at a size (its
estimate from the smaller sizes exceeds ``--stage_timeout``, or it was stopped by the timeout) is extrapolated from
the last measured exponent and marked ``~``; the output says which and why. Short training settings throughout
(``SETTINGS``, printed). Results are cached per stage and size under the _work folder, so a later run continues
where one stopped (``--force`` measures again). Writes ``results/benchmarks/scale.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_report import write_markdown  # noqa: E402  (benchmarks/bench_report.py; puts REPO on sys.path)

BEAUTY = REPO / "dataset" / "amazon-beauty" / "amazon-beauty.inter"
WORK = REPO / "results" / "benchmarks" / "_work" / "scale"
SIZES = (10_000, 100_000, 1_000_000)
GiB = 2 ** 30

#: child -> the stages it measures, in order (``llm``: one child for the four LLM-side stages, see the docstring).
CHILDREN = {
    "load": ("load",),
    "ccg_epoch": ("ccg_epoch",),
    "ccg_score": ("ccg_score",),
    "llm": ("item_vectors", "snf", "arv", "artifact_write"),
    "dct_data": ("dct_load", "dct_data"),
    "dct_epoch": ("dct_epoch",),
}
#: child -> the children whose outputs it reads at the same size (helpers, candidates, the artifact).
NEEDS = {"ccg_score": ("ccg_epoch",), "llm": ("ccg_epoch", "ccg_score"), "dct_data": ("llm",),
         "dct_epoch": ("llm",)}
STAGES = tuple(s for stages in CHILDREN.values() for s in stages)
#: The stages of the augmentation (``--stage=augment``), whose peak RSS at 1M users must stay under 8 GiB.
AUGMENT_STAGES = ("load", "ccg_epoch", "ccg_score", "item_vectors", "snf", "arv", "artifact_write")

#: Short settings (1 epoch, small model, large batches); the paper's defaults would take days on 2 CPU cores.
SETTINGS = {
    "epochs": 1, "ccg_epochs": 1, "hidden_size": 32, "inner_size": 64, "n_layers": 1, "n_heads": 1,
    "MAX_ITEM_LIST_LENGTH": 20, "ccg_max_len": 20, "train_batch_size": 1024, "ccg_batch_size": 1024,
    "eval_batch_size": 512, "semantic_backend": "tfidf", "llm_concurrency": 32, "llm_model": "fake-llm",
    "llm_backend": "openai", "llm_max_retries": 0,
}
#: ``--helper_loss=BPR``: the CCG/ARV helpers train with RecBole's BPR loss on one uniformly sampled negative per
#: position (``ccg_model_args``) instead of the full-softmax CE loss, which scores every item for every row.
HELPER_LOSSES = {"CE": {}, "BPR": {"ccg_model_args": {"loss_type": "BPR", "train_neg_sample_args": {
    "distribution": "uniform", "sample_num": 1}}}}

TITLE_WORDS = {  # generated titles: brand, 1-4 descriptors, 1-3 attributes, a product noun, maybe a size
    "brand": "Aveline Borel Corvina Dalmar Esprel Florin Gavia Halden Ismene Jorvik Kestra Lumea Mirabel Norvell "
             "Orla Pravia Quenby Rosalind Sorell Tavira Ulmen Veyra Wendell Xanthe Yselle Zorah".split(),
    "descriptor": "Professional Natural Organic Hydrating Nourishing Volumizing Matte Glossy Long-Lasting Gentle "
                  "Daily Intensive Ultra Lightweight Waterproof Smoothing Brightening Soothing Firming Clarifying "
                  "Radiant Silky Fresh Classic Deluxe Travel Mini Sheer Rich Advanced".split(),
    "attribute": "Rose Lavender Vanilla Coconut Argan Shea Aloe Vitamin-C Retinol Charcoal Honey Almond Jojoba "
                 "Cucumber Green-Tea Mint Citrus Peony Sandalwood Keratin Collagen Hyaluronic Bamboo Oat Ginger "
                 "Black Red Nude Coral Plum Bronze Pearl Ivory Berry".split(),
    "noun": "Shampoo Conditioner Serum Moisturizer Cleanser Toner Mask Lipstick Mascara Eyeliner Foundation "
            "Concealer Blush Bronzer Highlighter Primer Palette Brush Polish Lotion Cream Oil Scrub Perfume "
            "Cologne Deodorant Balm Gel Spray Powder Sponge Comb Dryer Straightener Tweezers".split(),
    "size": "1oz 2oz 3.4oz 4oz 8oz 16oz 10ml 30ml 50ml 100ml 250ml Kit Set Pack".split(),
}


# ----- the shape of amazon-beauty and the synthetic data (pure) -------------------------------------------
def beauty_shape(inter_path=BEAUTY) -> dict:
    """amazon-beauty's shape: items per user, the empirical sequence-length distribution and the Zipf exponent
    of its item popularity (least-squares slope of log count against log rank)."""
    import pandas as pd

    df = pd.read_csv(inter_path, sep="\t", usecols=[0, 1])
    lengths = df.iloc[:, 0].value_counts().to_numpy()
    counts = df.iloc[:, 1].value_counts().to_numpy()  # descending
    ranks = np.arange(1, len(counts) + 1)
    slope = np.polyfit(np.log(ranks), np.log(counts), 1)[0]
    values, freq = np.unique(lengths, return_counts=True)
    return {"users": int(len(lengths)), "items": int(len(counts)), "items_per_user": len(counts) / len(lengths),
            "length_values": values.tolist(), "length_probs": (freq / freq.sum()).tolist(),
            "zipf_exponent": float(-slope)}


def synthetic_sequences(n_users: int, shape: dict, seed: int = 0) -> tuple:
    """``(n_items, lengths, items)``: per user a length drawn from ``shape``'s empirical distribution (capped at
    the catalogue: ``shape["fixed_items"]`` items when set, else ``items_per_user`` times the users), then that many distinct items (0-based ids) drawn by Zipf popularity; ``items`` is flat, user
    by user, in time order. Item ids are a seeded permutation of the popularity ranks."""
    rng = np.random.default_rng(seed)
    n_items = int(shape.get("fixed_items") or max(2, round(n_users * shape["items_per_user"])))
    lengths = rng.choice(np.asarray(shape["length_values"]), size=n_users, p=np.asarray(shape["length_probs"]))
    lengths = np.minimum(lengths, n_items).astype(np.int64)
    cdf = np.cumsum(np.arange(1, n_items + 1, dtype=np.float64) ** -shape["zipf_exponent"])
    cdf /= cdf[-1]
    user = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    ranks = np.minimum(np.searchsorted(cdf, rng.random(len(user)), side="right"), n_items - 1)
    for attempt in range(200):  # redraw the repeats within a user until every user's items are distinct
        _, first = np.unique(user * n_items + ranks, return_index=True)
        repeat = np.ones(len(user), bool)
        repeat[first] = False
        if not repeat.any():
            break
        n = int(repeat.sum())
        ranks[repeat] = (np.searchsorted(cdf, rng.random(n), side="right") if attempt < 20
                         else rng.integers(0, n_items, n))  # uniform once popularity keeps colliding (tiny sizes)
        ranks = np.minimum(ranks, n_items - 1)
    else:
        raise RuntimeError("could not draw distinct items per user")
    return n_items, lengths, rng.permutation(n_items)[ranks]


def synthetic_titles(n_items: int, seed: int = 0) -> list:
    """A title per item from :data:`TITLE_WORDS` (5-11 words, like amazon-beauty's median of 9)."""
    rng = np.random.default_rng(seed + 1)
    words = {k: np.asarray(v) for k, v in TITLE_WORDS.items()}
    parts = [rng.choice(words["brand"], n_items)]
    n_desc, n_attr = rng.integers(1, 5, n_items), rng.integers(1, 4, n_items)
    desc = rng.choice(words["descriptor"], (n_items, 4))
    attr = rng.choice(words["attribute"], (n_items, 3))
    noun = rng.choice(words["noun"], n_items)
    size = np.where(rng.random(n_items) < 0.6, rng.choice(words["size"], n_items), "")
    number = rng.integers(1, 1000, n_items)
    out = []
    for i in range(n_items):
        title = [parts[0][i], *desc[i, :n_desc[i]], *attr[i, :n_attr[i]], noun[i], f"No.{number[i]}"]
        out.append(" ".join(title + ([size[i]] if size[i] else [])))
    return out


def dataset_name(n_users: int) -> str:
    return f"scale-{label(n_users)}"


def label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def write_dataset(root: Path, n_users: int, shape: dict, seed: int = 0) -> Path:
    """Write ``root/<name>/<name>.inter`` and ``.item`` (RecBole atomic files) once; returns the folder. A finished
    folder has ``shape.json``; an unfinished one is written again."""
    import pandas as pd

    from recbole_llmser.utils import atomic_write_json

    name = dataset_name(n_users)
    folder = root / name
    if (folder / "shape.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    n_items, lengths, items = synthetic_sequences(n_users, shape, seed)
    starts = np.cumsum(lengths) - lengths
    pos = np.arange(len(items)) - np.repeat(starts, lengths)
    inter = pd.DataFrame({"user_id:token": np.char.add("u", np.repeat(np.arange(1, n_users + 1), lengths).astype(str)),
                          "item_id:token": np.char.add("i", (items + 1).astype(str)),
                          "timestamp:float": 1_300_000_000 + 86_400 * pos})
    inter.to_csv(folder / f"{name}.inter.tmp", sep="\t", index=False)
    os.replace(folder / f"{name}.inter.tmp", folder / f"{name}.inter")
    item = pd.DataFrame({"item_id:token": np.char.add("i", np.arange(1, n_items + 1).astype(str)),
                         "title:token_seq": synthetic_titles(n_items, seed)})
    item.to_csv(folder / f"{name}.item.tmp", sep="\t", index=False)
    os.replace(folder / f"{name}.item.tmp", folder / f"{name}.item")
    atomic_write_json(folder / "shape.json", {"users": n_users, "items": n_items, "interactions": int(len(items)),
                                              "mean_length": float(lengths.mean()), "seed": seed,
                                              "source_shape": {k: v for k, v in shape.items() if "length_" not in k}})
    return folder


# ----- growth and extrapolation (pure) --------------------------------------------------------------------
def growth_exponent(n1: float, v1: float, n2: float, v2: float) -> float | None:
    """``log(v2/v1) / log(n2/n1)``: 1 = grows linearly in n, 2 = quadratically; None without two positive values."""
    if not (v1 and v2 and v1 > 0 and v2 > 0 and n1 > 0 and n2 > 0 and n1 != n2):
        return None
    return math.log(v2 / v1) / math.log(n2 / n1)


def extrapolate(points: dict, n: int, min_exponent: float = 1.0) -> tuple:
    """``(value, exponent)`` at size ``n`` from measured ``{size: value}`` (at least two sizes below ``n``): the
    largest measured value grown by the exponent between the two largest sizes, never below ``min_exponent``
    (a stage that grew sub-linearly between small sizes is still assumed to grow at least linearly)."""
    known = sorted(s for s, v in points.items() if v is not None and s < n)
    if len(known) < 2:
        return None, None
    n1, n2 = known[-2:]
    e = growth_exponent(n1, points[n1], n2, points[n2])
    e = max(e if e is not None else min_exponent, min_exponent)
    return points[n2] * (n / n2) ** e, e


# ----- the child: one group of stages at one size ---------------------------------------------------------
def _hwm_mib() -> float:
    """This process's peak RSS since the last reset (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s() -> float:
    """CPU seconds this process (all its threads) has used: less sensitive than wall time to other work on the
    shared cores."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Meter:
    """Times stages and their peak RSS: the high-water mark is reset when a stage starts."""

    def __init__(self):
        self.results, self.overall, self.import_mib = {}, _hwm_mib(), _rss_mib()  # after the imports

    def stage(self, name):
        meter = self

        class _Stage:
            def __enter__(self):
                meter.overall = max(meter.overall, _hwm_mib())
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM (and ru_maxrss) to the current RSS
                self.start_rss, self.t, self.cpu = _rss_mib(), time.perf_counter(), _cpu_s()
                return self

            def __exit__(self, *exc):
                if exc[0] is None:
                    peak = _hwm_mib()
                    meter.overall = max(meter.overall, peak)
                    meter.results[name] = {"seconds": round(time.perf_counter() - self.t, 3),
                                           "cpu_s": round(_cpu_s() - self.cpu, 3),
                                           "peak_mib": round(peak, 1), "start_mib": round(self.start_rss, 1)}
                    print(f"STAGE {json.dumps({name: meter.results[name]})}", flush=True)

        return _Stage()


def _config(size: int, work: Path, base_url: str | None, helper_loss: str = "CE", **extra):
    from recbole_llmser.config import Config

    name = dataset_name(size)
    settings = {
        **SETTINGS, "data_path": str(work / "data"), "checkpoint_dir": str(work / "saved" / label(size)),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]},
        "item_text_field": "title", "show_progress": False, "state": "WARNING", "use_gpu": False,
        "llm_base_url": base_url, "method": "llmser", **HELPER_LOSSES[helper_loss], **extra,
    }
    return Config("SASRec", name, config_dict=settings, cmd_args=[])


def _plain(config):
    from recbole_llmser.data import create_dataset

    return create_dataset(config.copy_with(method="none", aug_file=None, train_all_positions=False))


def _selected(config, users, prefixes):
    from recbole_llmser.augment import snf

    chosen = set(snf.select_users({int(u): len(p) for u, p in zip(users, prefixes)}, config["aug_max_len"]))
    return [i for i, u in enumerate(users) if int(u) in chosen]


def child(group: str, size: int, work: Path, base_url: str | None, helper_loss: str = "CE") -> dict:
    """Run ``group``'s stages at ``size``; returns ``{stage: {seconds, peak_mib, start_mib}}`` (+ ``_extra``)."""
    from recbole_llmser import compat  # noqa: F401
    from recbole_llmser.augment import arv, ccg, pipeline, snf
    from recbole_llmser.augment.backends import resolve_backend, stage_context
    from recbole_llmser.data import create_dataset, data_preparation
    from recbole_llmser.helper_models import train_helper
    from recbole_llmser.sequences import dataset_prefixes

    meter, extra = Meter(), {}
    config = _config(size, work, base_url, helper_loss)
    models = Path(config["checkpoint_dir"]) / config["dataset"] / "augment" / "models"
    files = work / "saved" / label(size)
    files.mkdir(parents=True, exist_ok=True)
    if group == "load":
        with meter.stage("load"):
            dataset = _plain(config)
            users, prefixes = dataset_prefixes(config, dataset)
        extra.update(users=len(users), items=int(dataset.item_num - 1), interactions=len(dataset.inter_feat))
    elif group in ("ccg_epoch", "ccg_score", "llm"):
        dataset = _plain(config)
        users, prefixes = dataset_prefixes(config, dataset)
        rev = [p[::-1] for p in prefixes]
        if group == "ccg_epoch":
            for old in models.glob("ccg-*.pth"):  # measure a training epoch, not the reuse of an earlier one
                old.unlink()
            with meter.stage("ccg_epoch"):
                train_helper(config, dataset, list(users), rev, "reverse", models)
        elif group == "ccg_score":
            reverse = train_helper(config, dataset, list(users), rev, "reverse", models)  # reused
            rows = _selected(config, users, prefixes)
            with meter.stage("ccg_score"):  # what ccg.run does after training the helpers
                items = ccg.score_top_k(reverse, [rev[i] for i in rows], [prefixes[i] for i in rows],
                                        int(config["ccg_num_candidates"]), int(config["eval_batch_size"]), "CCG",
                                        False)
            np.save(files / "ccg_candidates.npy", items)
        else:
            t = time.perf_counter()  # ARV's forward helper: the same epoch as the reverse one's, untimed
            forward = train_helper(config, dataset, list(users), prefixes, "forward", models)
            extra["forward_helper_s"] = round(time.perf_counter() - t, 1)
            rows = _selected(config, users, prefixes)
            items = np.load(files / "ccg_candidates.npy")
            backend = resolve_backend(config)
            out_dir = pipeline.augmentation_dir(config, backend, prefixes)
            for stale in (out_dir.parent / "llm_cache.jsonl", out_dir.parent / "embeddings"):  # real calls
                if stale.is_file():
                    stale.unlink()
                elif stale.is_dir():
                    for path in stale.iterdir():
                        path.unlink()
            timings = {}
            with meter.stage("item_vectors"):
                ctx = stage_context(config, dataset, backend, users, prefixes, rows, forward, out_dir.parent)
            with meter.stage("snf"):
                requests = snf.llm_requests(ctx, items)
                picks, pseudo = snf.run(ctx, items, requests)
                del requests
            with meter.stage("arv"):
                verification = arv.run(ctx, pseudo)
            with meter.stage("artifact_write"):
                out_dir.mkdir(parents=True, exist_ok=True)
                pipeline.write_artifact(out_dir / pipeline.ARTIFACT,
                                        pipeline._records(ctx, items, picks, pseudo, verification))
                pipeline._write_summary(ctx, out_dir, len(pseudo), verification, 0, timings)
            (files / "artifact_path").write_text(str(out_dir / pipeline.ARTIFACT))
            extra.update(backend=backend, llm_calls=ctx.client.stats.calls, augmented=len(pseudo),
                         artifact_mib=round((out_dir / pipeline.ARTIFACT).stat().st_size / 2 ** 20, 1))
    elif group in ("dct_data", "dct_epoch"):
        config = _config(size, work, base_url, helper_loss, aug_file=(files / "artifact_path").read_text().strip())
        if group == "dct_data":
            with meter.stage("dct_load"):
                dataset = create_dataset(config)
            with meter.stage("dct_data"):
                train_data, _, _ = data_preparation(config, dataset)
            extra.update(windows=len(train_data._dataset), rows=int(train_data._dataset.dct_n_rows))
        else:
            from recbole.utils import init_seed

            from recbole_llmser.registry import get_model, get_trainer

            dataset = create_dataset(config)
            train_data, _, _ = data_preparation(config, dataset)
            init_seed(config["seed"], config["reproducibility"])
            model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
            trainer = get_trainer(config["MODEL_TYPE"], config["model"], config)(config, model)
            with meter.stage("dct_epoch"):
                trainer._train_epoch(train_data, 0, show_progress=False)
    else:
        raise SystemExit(f"unknown child {group!r}")
    return {**meter.results, "_extra": {**extra, "child_peak_mib": round(meter.overall, 1),
                                        "import_mib": round(meter.import_mib, 1)}}


# ----- the parent ---------------------------------------------------------------------------------------
def result_path(work: Path, group: str, size: int) -> Path:
    return work / "results" / f"{label(size)}-{group}.json"


def run_child(group: str, size: int, work: Path, base_url, timeout: float, helper_loss: str = "CE") -> dict:
    """One child (niced by 10), its stage lines echoed; returns its results, or ``{"_timeout": seconds}``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", group, f"--size={size}", f"--work={work}",
           f"--helper_loss={helper_loss}"]
    if base_url:
        cmd.append(f"--base_url={base_url}")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    (work / "run").mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=work / "run", env=env, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=lambda: os.nice(10))
    except subprocess.TimeoutExpired as err:
        partial = [json.loads(line[6:]) for line in (err.stdout or b"").decode().splitlines()
                   if line.startswith("STAGE ")]
        return {"_timeout": timeout, **{k: v for d in partial for k, v in d.items()},
                "_extra": {"child_wall_s": timeout, "stopped": True}}
    if proc.returncode:
        raise SystemExit(f"child {group} at {size} users failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["_extra"]["child_wall_s"] = round(time.monotonic() - start, 1)
    out["_extra"]["loadavg_after"] = round(os.getloadavg()[0], 2)  # other work on the shared cores
    return out


def estimate_seconds(cached: dict, group: str, size: int, assume_exponent=None) -> float | None:
    """A child's expected wall time at ``size``, extrapolated from its wall time at the smaller sizes; with one
    smaller size only, grown by ``assume_exponent`` (None: no estimate)."""
    points = {s: r["_extra"]["child_wall_s"] for (g, s), r in cached.items() if g == group and s < size}
    value = extrapolate(points, size)[0]
    if value is None and len(points) == 1 and assume_exponent:
        (n, v), = points.items()
        value = v * (size / n) ** assume_exponent
    return value


KINDS = (("seconds", "wall s", 1), ("cpu_s", "cpu s", 1), ("peak_mib", "MiB", 0))


def table(sizes, cached: dict, notes: dict) -> list:
    """The printed lines: per stage and size wall seconds, CPU seconds and peak RSS (MiB); the growth exponents
    between consecutive sizes; the target checks."""
    measured = {(stage, s): cached[(g, s)][stage] for (g, s) in cached for stage in CHILDREN[g]
                if stage in cached[(g, s)]}
    base = min((r["_extra"]["import_mib"] for r in cached.values() if "import_mib" in r["_extra"]),
               default=0.0)  # RSS of a child after its imports (python, torch, RecBole): no stage's doing
    values = {}
    for stage in STAGES:
        for kind, _, _ in KINDS:
            shift = base if kind == "peak_mib" else 0.0  # memory: the part above the imports grows with users
            pts = {s: measured[(stage, s)].get(kind) for s in sizes if (stage, s) in measured}
            pts = {s: v - shift for s, v in pts.items() if v is not None}
            for s in sizes:
                v, ex = (pts[s], False) if s in pts else (extrapolate(pts, s)[0], True)
                values[(stage, s, kind)] = (None if v is None else v + shift, ex)
    pairs = list(zip(sizes, sizes[1:]))

    def exponent(stage, kind, a, b):
        (va, xa), (vb, xb) = values[(stage, a, kind)], values[(stage, b, kind)]
        shift = base if kind == "peak_mib" else 0.0
        return None if xa or xb else growth_exponent(a, va - shift, b, vb - shift)

    lines = []
    for s in sizes:  # one block per size: easier to read than one very wide line
        lines.append(f"{label(s)} users" + "".join(f"{title:>11}" for _, title, _ in KINDS))
        for stage in STAGES:
            cells = "".join(f"{_fmt(*values[(stage, s, kind)], digits):>11}" for kind, _, digits in KINDS)
            start = measured.get((stage, s), {}).get("start_mib")
            lines.append(f"  {stage:<15}{cells}" + (f"   (start {start:.0f} MiB)" if start else ""))
        lines.append("")
    head = f"{'growth exponent':<17}" + "".join(f"{f'{title} {label(a)}-{label(b)}':>17}"
                                                 for kind, title, _ in KINDS for a, b in pairs)
    lines.append(head)
    for stage in STAGES:
        cells = ""
        for kind, _, _ in KINDS:
            for a, b in pairs:
                e = exponent(stage, kind, a, b)
                cells += f"{('%.2f' % e) if e is not None else '-':>17}"
        lines.append(f"  {stage:<15}{cells}")
    lines.append("~ = extrapolated (not measured at that size): the largest measured value grown by the exponent "
                 "between the two largest measured sizes, at least linearly. MiB = the child's peak RSS while the "
                 "stage ran (what the child loaded before it stays resident: 'start'); memory exponents and "
                 f"extrapolations are of the part above the {base:.0f} MiB a child holds after its imports.")
    checks = []
    for stage in STAGES:
        for kind in ("cpu_s", "seconds"):
            es = [e for a, b in pairs if (e := exponent(stage, kind, a, b)) is not None]
            if es:
                worst = max(es)
                checks.append(f"  {stage}: {'CPU' if kind == 'cpu_s' else 'wall'} time exponent up to {worst:.2f} -> "
                              + ("at most linear (<= 1.10)" if worst <= 1.10 else "SUPER-LINEAR (> 1.10)"))
                break
    big = max(sizes)
    aug = [(values[(st, big, "peak_mib")], st) for st in AUGMENT_STAGES if values[(st, big, "peak_mib")][0]]
    if aug:
        (peak, ex), st = max(aug, key=lambda x: x[0][0])
        verdict = "under 8 GiB" if peak < 8 * 1024 else "NOT under 8 GiB"
        checks.append(f"  peak RSS of the augmentation stages at {label(big)} users: {peak / 1024:.2f} GiB "
                      f"({'extrapolated' if ex else 'measured'}; largest stage: {st}) -> {verdict}")
    lines += ["", "Targets (time: CPU seconds where measured, as the shared cores make wall time noisy):", *checks]
    if notes:
        lines += ["", "Not measured at a size (extrapolated above where two smaller sizes were measured):",
                  *[f"  {k}: {v}" for k, v in notes.items()]]
    return lines


def _fmt(value, extrapolated: bool, digits: int) -> str:
    if value is None:
        return "-"
    return ("~" if extrapolated else "") + f"{value:.{digits}f}"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="users per synthetic dataset")
    p.add_argument("--stages", default=",".join(CHILDREN), help=f"children to run, from {','.join(CHILDREN)}")
    p.add_argument("--stage_timeout", type=float, default=1200,
                   help="seconds a child may run; a child whose estimate exceeds it is not started")
    p.add_argument("--assume_exponent", type=float, default=None,
                   help="with one smaller size measured, estimate a child's time with this growth exponent "
                        "(default: no estimate, the child runs)")
    p.add_argument("--force", action="store_true", help="measure again what the _work folder has results for")
    p.add_argument("--items", type=int, default=None,
                   help="a fixed catalogue of this many items at every size (default: the catalogue grows with the "
                        "users, amazon-beauty's items per user); its own work folder and output file by default")
    p.add_argument("--helper_loss", choices=tuple(HELPER_LOSSES), default="CE",
                   help="the CCG/ARV helpers' loss: CE (full softmax, the default) or BPR (one sampled negative); "
                        "BPR has its own work folder and output file by default")
    p.add_argument("--work", default=None, help="folder of the data, the children's outputs and results "
                                                "(default: results/benchmarks/_work/scale[/items-N])")
    p.add_argument("--out", default=None, help="default: results/benchmarks/scale.md (scale_items-N.md, "
                                                "scale_helper-bpr.md)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--base_url", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    tag = "_".join(t for t in (f"items-{args.items}" if args.items else "",
                                  "helper-bpr" if args.helper_loss == "BPR" else "") if t)
    work = Path(args.work or (WORK / tag if tag else WORK)).resolve()
    out_file = Path(args.out or REPO / "results" / "benchmarks" / (f"scale_{tag}.md" if tag else "scale.md"))
    if args.child:
        print(json.dumps(child(args.child, args.size, work, args.base_url, args.helper_loss)), flush=True)
        return
    sizes = sorted(int(s) for s in args.sizes.split(","))
    groups = [g for g in CHILDREN if g in args.stages.split(",")]
    shape = beauty_shape()
    if args.items:
        shape["fixed_items"] = args.items
    print(f"amazon-beauty shape: {shape['users']} users, {shape['items']} items "
          f"({shape['items_per_user']:.3f} items per user), mean length "
          f"{np.dot(shape['length_values'], shape['length_probs']):.2f}, Zipf exponent {shape['zipf_exponent']:.3f}"
          + (f"; catalogue fixed at {args.items} items" if args.items else ""), flush=True)
    cached = {}
    for group in CHILDREN:
        for size in sizes:
            path = result_path(work, group, size)
            if path.is_file() and not (args.force and group in groups):
                cached[(group, size)] = json.loads(path.read_text())
    notes = {}
    from tests.llm_server import FakeLLMServer

    with FakeLLMServer(latency=0.0) as server:
        for size in sizes:
            t = time.monotonic()
            folder = write_dataset(work / "data", size, shape)
            print(f"{label(size)} users: data {folder} ({time.monotonic() - t:.0f} s)", flush=True)
            for group in groups:
                if (group, size) in cached:
                    continue
                missing = [g for g in NEEDS.get(group, ()) if "_timeout" in cached.get((g, size), {"_timeout": 0})]
                if missing:
                    notes[f"{group} at {label(size)}"] = f"needs {', '.join(missing)} at the same size, not run"
                    print(f"  {group}: skipped ({notes[f'{group} at {label(size)}']})", flush=True)
                    continue
                estimate = estimate_seconds(cached, group, size, args.assume_exponent)
                if estimate is not None and estimate > args.stage_timeout:
                    notes[f"{group} at {label(size)}"] = (f"its child's wall time estimated at {estimate:.0f} s from "
                                                         "the smaller sizes, over "
                                                         f"--stage_timeout={args.stage_timeout:.0f} s")
                    print(f"  {group}: skipped ({notes[f'{group} at {label(size)}']})", flush=True)
                    continue
                out = run_child(group, size, work, server.base_url if group == "llm" else None, args.stage_timeout,
                                args.helper_loss)
                if "_timeout" in out:
                    done = [k for k in out if not k.startswith("_")]
                    notes[f"{group} at {label(size)}"] = (f"stopped by --stage_timeout={args.stage_timeout:.0f} s"
                                                         + (f" (finished before: {', '.join(done)})" if done else ""))
                    print(f"  {group}: timed out after {args.stage_timeout:.0f} s", flush=True)
                    if not done:
                        continue
                result_path(work, group, size).parent.mkdir(parents=True, exist_ok=True)
                from recbole_llmser.utils import atomic_write_json

                atomic_write_json(result_path(work, group, size), out)
                cached[(group, size)] = out
                print(f"  {group}: " + ", ".join(f"{k} {v['seconds']:.1f} s {v['peak_mib']:.0f} MiB"
                                                for k, v in out.items() if not k.startswith("_"))
                      + f"; {out['_extra']}", flush=True)
    for group in CHILDREN:  # what is known from earlier runs but was not run now (say so)
        for size in sizes:
            key = f"{group} at {label(size)}"
            if (group, size) not in cached and key not in notes:
                notes[key] = "not run (not in --stages, no earlier result)"
            elif "_timeout" in cached.get((group, size), {}) and key not in notes:
                done = [k for k in cached[(group, size)] if not k.startswith("_")]
                notes[key] = (f"stopped by a stage timeout of {cached[(group, size)]['_timeout']:.0f} s"
                              + (f" (finished before: {', '.join(done)})" if done else ""))
    lines = table(sizes, cached, notes)
    lines += ["", "Load average after each child (other work on the shared cores slows wall time, and CPU time too "
                  "through waiting threads):"]
    for size in sizes:
        loads = [f"{g} {cached[(g, size)]['_extra']['loadavg_after']:.1f}" for g in CHILDREN
                 if "loadavg_after" in cached.get((g, size), {}).get("_extra", {})]
        if loads:
            lines.append(f"  {label(size)}: " + ", ".join(loads))
    catalogue = (f"with the catalogue fixed at {args.items} items, the item term is a constant and these stages "
                 "should grow linearly in users (the exponents above check it)" if args.items else
                 f"with the catalogue growing with the users ({shape['items_per_user']:.3f} items per user, as in "
                 "amazon-beauty) these stages grow as users x items, i.e. quadratically once the item term "
                 "dominates; `--items=N` measures them on a fixed catalogue (scale_items-N.md)")
    bpr = args.helper_loss == "BPR"
    lines += ["", "Reading: " + ("the helpers train with BPR here (one sampled negative per row: ccg_epoch's loss "
                                 "has no item term, though the item embedding's dense gradient and Adam update "
                                 "still touch every item once per step); dct_epoch scores" if bpr
                                 else "ccg_epoch and dct_epoch score")
              + " every catalogue item for every training row (RecBole's full-softmax CE loss), ccg_score ranks the "
                "whole catalogue for every user and arv ranks it again for ARV's candidates (the forward helper), so "
                "each such row costs O(items); " + catalogue + "."
              + ("" if bpr else " A sampled loss for the helpers (ccg_model_args: {loss_type: BPR, "
                 "train_neg_sample_args: {distribution: uniform, sample_num: 1}}; --helper_loss=BPR here) takes the "
                 "item term out of their loss (the item embedding's dense gradient and Adam update still cost "
                 "O(items) per step); a full ranking stays O(users x items) by definition.")]
    data = []
    for size in sizes:
        shape_file = work / "data" / dataset_name(size) / "shape.json"
        if shape_file.is_file():
            s = json.loads(shape_file.read_text())
            data.append(f"{label(size)}: {s['users']} users, {s['items']} items, {s['interactions']} interactions")
    setup = [(f"catalogue fixed at {args.items} items; " if args.items else "")
             + f"amazon-beauty shape: {shape['items_per_user']:.3f} items per user, empirical lengths (mean "
             f"{np.dot(shape['length_values'], shape['length_probs']):.2f}), Zipf exponent "
             f"{shape['zipf_exponent']:.3f}; synthetic data: " + "; ".join(data),
             f"settings: {json.dumps({**SETTINGS, **HELPER_LOSSES[args.helper_loss]})}",
             f"machine: {os.cpu_count()} CPU cores (shared), children niced by 10, one at a time", ""]
    print("\n".join(setup + lines))
    command = " ".join(["python", "benchmarks/scale.py", *map(shlex.quote, argv)])
    write_markdown(out_file, "Scale", command, __doc__.split("\n")[0], setup + lines)
    print(f"written to {out_file}")


if __name__ == "__main__":
    main()
