"""Augmentation quality, leak-free: how well each SNF/ARV backend recovers an item hidden from the training prefix.

    python benchmarks/augment_quality.py --users=2000             # amazon-beauty
    python benchmarks/augment_quality.py --users=2000 --lm_users=500  # lm_score (and an LLM) on a 500-user subset
    python benchmarks/augment_quality.py --dataset=amazon-fashion-ids --users=2000  # no item text: text-free backends

Only training prefixes are read (the sequence minus its validation and test items). Users with at least 4 training
items are sampled (``--users``, seeded); for each, with training prefix s1 .. sn:

* **(a) prior-item recovery (SNF).** s1 is hidden. The reverse helper (``ccg_model``) reads the reversed s2 .. sn and
  proposes K = ``ccg_num_candidates`` candidates for the item before s2, minus s2 .. sn (CCG, as in the method).
  Each backend keeps k = ``snf_num_picks`` of them, the first M = ``aug_num_pseudo`` becoming the pseudo items; the
  history it reads is s2 .. sn. Reported: recall@M and recall@k of s1 (over all sampled users), and the mean rank
  of s1 among the K candidates where CCG proposed it (the k kept first, in the backend's order, then the rest in CCG
  order, as ``snf_fallback: ccg_order`` fills them).
* **(b) masked-item recovery (ARV).** sn = m_u is masked. The forward helper proposes ``arv_num_candidates``
  candidates after s1 .. s(n-1) (no pseudo items, so every backend gets the same candidates), minus those items;
  each backend picks one. Reported: accuracy (pick = m_u) over all users and over those whose candidates hold m_u.

Both helpers are trained on the training prefixes of every user, the sampled users' with s1 and sn removed, so
neither the hidden s1 nor m_u of a sampled user is ever a training input or target. Every backend sees the same
users and candidates: random pick (seeded), CCG order (ARV: the forward helper's order), the text-free ``model``
backend (what the pipeline uses for a dataset without item text: SNF orders the candidates by the forward helper's
score after the history, ``snf.run``/``snf.model_rank``; ARV takes the forward helper's top candidate, ``arv.run``,
so its ARV row equals CCG order's), the offline embedding stand-in (``offline``), ``lm_score`` (``lm_score_model``,
default SmolLM2-135M) and, when ``OPENAI_BASE_URL`` is set, the OpenAI-compatible endpoint (``llm_model``).
lm_score and the LLM answer through the pipeline's own ``backends.ask``, the stand-in through its ranker. On a
dataset without item text (``item_text_field`` unset, e.g. ``amazon-fashion-ids``) the offline stand-in, lm_score and
the LLM need titles and are skipped (the output says so); random pick, CCG order and ``model`` still run.

A user whose candidates do not hold the hidden item is a miss for every backend, whatever it answers, so lm_score
and the LLM (slow) are asked only for the users whose candidates hold it: their recall and accuracy over all
sampled users are exact, not estimates. ``--lm_users`` limits them further to a seeded subset of the sampled users
and then repeats the tables for every backend on that subset.

Helpers, item embeddings and LM scores are cached under ``--workdir``; the output states the run's time and how
many LM scores came from that cache. Writes what it prints to ``results/benchmarks/augment_quality.md``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_report import write_markdown  # noqa: E402  (benchmarks/bench_report.py)

from recbole_llmser import compat  # noqa: E402,F401  (RecBole on current libraries)
from recbole_llmser.augment import arv, snf  # noqa: E402
from recbole_llmser.augment.backends import ask, stage_context  # noqa: E402
from recbole_llmser.augment.ccg import score_top_k  # noqa: E402
from recbole_llmser.config import Config  # noqa: E402
from recbole_llmser.data import create_dataset  # noqa: E402
from recbole_llmser.helper_models import train_helper  # noqa: E402
from recbole_llmser.sequences import dataset_prefixes  # noqa: E402


class Setup:
    """The sampled users, their candidates and the contexts every backend shares."""

    def __init__(self, config, dataset, users, prefixes, rows, lm_rows):
        self.config, self.dataset, self.users, self.prefixes = config, dataset, users, prefixes
        self.rows, self.lm_rows = rows, lm_rows  # indices into users; lm_rows: the lm_score / LLM subset
        self.snf_prefixes = list(prefixes)  # the sampled users' without s1
        for i in rows:
            self.snf_prefixes[i] = prefixes[i][1:]
        self.hidden = {i: int(prefixes[i][0]) for i in rows}  # s1
        self.masked = {i: int(prefixes[i][-1]) for i in rows}  # m_u
        self.snf_cands = self.arv_cands = self.forward = None
        self.timings = {}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="amazon-beauty")
    parser.add_argument("--data_path", default=None, help="folder holding <dataset>/ (default: the bundled dataset/)")
    parser.add_argument("--users", type=int, default=2000, help="sampled users with >= 4 training items")
    parser.add_argument("--lm_users", type=int, default=None,
                        help="lm_score / LLM on a seeded subset of this many of them (default: all)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--ccg_epochs", type=int, default=10, help="helper epochs (the method's default is 30)")
    parser.add_argument("--ccg_batch_size", type=int, default=1024, help="helper batch size")
    parser.add_argument("--ccg_max_len", type=int, default=20, help="helper MAX_ITEM_LIST_LENGTH (default 50)")
    parser.add_argument("--lm_score_model", default="smollm2")
    parser.add_argument("--lm_score_dtype", default="float32")
    parser.add_argument("--llm_model", default=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"))
    parser.add_argument("--llm_concurrency", type=int, default=8, help="calls in flight (1 for a one-slot server)")
    parser.add_argument("--llm_timeout", type=float, default=60, help="seconds per request attempt")
    parser.add_argument("--workdir", default=str(REPO / "saved" / "augment_quality"),
                        help="helpers, embeddings and the LM-score cache (reused by a later run)")
    parser.add_argument("--show_progress", action="store_true")
    parser.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "augment_quality.md"))
    return parser.parse_args(argv)


def build_setup(args, say) -> Setup:
    """Config, dataset, the sampled users and the leak-free helpers' candidates."""
    config = Config("SASRec", args.dataset, config_dict={
        "method": "llmser", "seed": args.seed, "ccg_epochs": args.ccg_epochs, "ccg_batch_size": args.ccg_batch_size,
        "ccg_max_len": args.ccg_max_len, "checkpoint_dir": args.workdir,
        "show_progress": args.show_progress, "state": "WARNING", "use_gpu": False,
        "lm_score_model": args.lm_score_model, "lm_score_dtype": args.lm_score_dtype, "llm_model": args.llm_model,
        "llm_concurrency": args.llm_concurrency, "llm_timeout": args.llm_timeout,
        **({"data_path": args.data_path} if args.data_path else {}),
    }, cmd_args=[])
    dataset = create_dataset(config.copy_with(method="none", aug_file=None, train_all_positions=False))
    users, prefixes = dataset_prefixes(config, dataset)
    rng = np.random.default_rng(args.seed)
    eligible = [i for i, p in enumerate(prefixes) if len(p) >= 4]
    rows = sorted(int(i) for i in rng.choice(eligible, size=min(args.users, len(eligible)), replace=False))
    lm_rows = rows if args.lm_users is None or args.lm_users >= len(rows) else sorted(
        int(i) for i in rng.choice(rows, size=args.lm_users, replace=False))
    setup = Setup(config, dataset, users, prefixes, rows, lm_rows)
    say(f"{args.dataset}: {len(users)} users, {dataset.item_num - 1} items; {len(rows)} sampled users with >= 4 "
        f"training items (of {len(eligible)}; seed {args.seed}), lm_score/LLM on {len(lm_rows)} of them")
    train_helpers(setup, args, say)
    return setup


def train_helpers(setup: Setup, args, say) -> None:
    """Reverse and forward helpers on the training prefixes, the sampled users' without s1 and m_u; CCG's and
    the forward helper's candidates of the sampled users."""
    config, rows = setup.config, setup.rows
    train = list(setup.prefixes)
    for i in rows:
        train[i] = setup.prefixes[i][1:-1]
    models = Path(args.workdir) / args.dataset / "augment_quality" / "models"
    start = time.monotonic()
    reverse = train_helper(config, setup.dataset, list(setup.users), [p[::-1] for p in train], "reverse", models)
    setup.forward = train_helper(config, setup.dataset, list(setup.users), train, "forward", models)
    setup.timings["helpers"] = time.monotonic() - start
    batch, k, n_arv = int(config["eval_batch_size"]), int(config["ccg_num_candidates"]), int(
        config["arv_num_candidates"])
    snf_hist = [setup.snf_prefixes[i] for i in rows]
    setup.snf_cands = score_top_k(reverse, [h[::-1] for h in snf_hist], snf_hist, k, batch, "CCG", False)
    arv_hist = [setup.prefixes[i][:-1] for i in rows]
    setup.arv_cands = score_top_k(setup.forward, arv_hist, arv_hist, n_arv, batch, "ARV", False)
    say(f"helpers: {config['ccg_model']} reverse + forward, ccg_epochs {config['ccg_epochs']}, ccg_batch_size "
        f"{config['ccg_batch_size']}, ccg_max_len {config['ccg_max_len']}, on the training "
        f"prefixes with the sampled users' s1 and m_u removed: {setup.timings['helpers']:.0f} s (0 when reused)")


# ----- the backends ----------------------------------------------------------------------------------------------
def complete(picks, n: int) -> list:
    """The kept picks, then the other candidates in CCG (forward-helper) order."""
    picks = [int(p) for p in picks]
    return picks + [j for j in range(n) if j not in set(picks)]


def backend_context(setup: Setup, backend: str):
    config = setup.config.copy_with(llm_backend={"llm": "openai"}.get(backend, backend))
    root = Path(config["checkpoint_dir"]) / config["dataset"] / "augment_quality"
    return stage_context(config, setup.dataset, backend, setup.users, setup.snf_prefixes, setup.rows, setup.forward,
                         root)


def snf_orders(setup: Setup, backend: str, ctx, rows) -> list:
    """Per user of ``rows`` (positions in ``setup.rows``): the backend's order of the K candidates (kept first)."""
    k, n = int(setup.config["snf_num_picks"]), int(setup.config["ccg_num_candidates"])
    cands = setup.snf_cands
    if backend == "random":
        rng = np.random.default_rng(int(setup.config["seed"]))
        perms = [rng.permutation(n) for _ in setup.rows]
        return [complete(perms[j][:k], n) for j in rows]
    if backend == "ccg":
        return [list(range(n)) for _ in rows]
    users = [setup.rows[j] for j in rows]
    if backend == "model":  # the pipeline's text-free SNF: snf.run orders the candidates with snf.model_rank
        ctx.prefixes, ctx.rows = setup.snf_prefixes, users
        picks, _ = snf.run(ctx, cands[rows], iter(()))
        return [complete(p[:k], n) for p in picks]
    if backend == "offline":
        return [complete(ctx.ranker.rank(ctx.vectors[ctx.history(i)], ctx.vectors[cands[j]], k), n)
                for j, i in zip(rows, users)]
    ctx.prefixes, ctx.rows = setup.snf_prefixes, users
    requests = snf.llm_requests(ctx, cands[rows])
    picks = ask(ctx, "SNF", requests, users, k, int(setup.config["aug_num_pseudo"]))
    return [complete((p or [])[:k], n) for p in picks]


def arv_picks(setup: Setup, backend: str, ctx, rows) -> list:
    """Per user of ``rows``: the index of the backend's pick among the ARV candidates."""
    cands, n = setup.arv_cands, int(setup.config["arv_num_candidates"])
    if backend == "random":
        rng = np.random.default_rng(int(setup.config["seed"]) + 1)
        drawn = rng.integers(0, n, size=len(setup.rows))
        return [int(drawn[j]) for j in rows]
    if backend == "ccg":
        return [0 for _ in rows]
    ctx.prefixes = setup.prefixes  # ARV's history: the training prefix before m_u (ctx.history(drop_last=True))
    users = [setup.rows[j] for j in rows]
    if backend == "model":  # the pipeline's text-free ARV (arv.run, no pseudo items): its pick among the candidates
        ctx.rows = users
        predicted = arv.run(ctx, {r: np.zeros(0, dtype=np.int64) for r in range(len(users))}).predicted
        return [candidate_index(cands[j], predicted[r]) for r, j in enumerate(rows)]
    if backend == "offline":
        return [ctx.ranker.pick(ctx.vectors[ctx.history(i, drop_last=True)], ctx.vectors[cands[j]])
                for j, i in zip(rows, users)]
    requests = [arv.request(ctx.user_token(i), ctx.titles(ctx.history(i, drop_last=True)),
                            ctx.titles(ctx.show("arv", i, cands[j])), n) for j, i in zip(rows, users)]
    return [p[0] for p in ask(ctx, "ARV", requests, users, 1, 1, fallback="ccg_order")]


def candidate_index(candidates, item) -> int:
    """The position of ``item`` among ``candidates`` (arv.run proposes the same candidates as this benchmark)."""
    found = [j for j, c in enumerate(candidates) if int(c) == int(item)]
    if not found:
        raise RuntimeError(f"ARV picked item {item}, not among the benchmark's candidates {list(candidates)}")
    return found[0]


def covered(setup: Setup, part: str) -> list:
    """Positions in ``setup.rows`` whose candidates hold the hidden item (s1 for ``snf``, m_u for ``arv``)."""
    cands, hidden = (setup.snf_cands, setup.hidden) if part == "snf" else (setup.arv_cands, setup.masked)
    return [j for j, i in enumerate(setup.rows) if hidden[i] in set(int(c) for c in cands[j])]


def run_backend(setup: Setup, backend: str, snf_rows, arv_rows) -> dict:
    """SNF orders (users ``snf_rows``, positions in ``setup.rows``) and ARV picks (``arv_rows``) of one backend."""
    ctx = backend_context(setup, backend) if backend in ("model", "offline", "lm_score", "llm") else None
    start = time.monotonic()
    orders = snf_orders(setup, backend, ctx, snf_rows) if snf_rows else []
    mid = time.monotonic()
    picks = arv_picks(setup, backend, ctx, arv_rows) if arv_rows else []
    client = getattr(ctx, "client", None)
    return {"orders": dict(zip(snf_rows, orders)), "picks": dict(zip(arv_rows, picks)),
            "snf_s": mid - start, "arv_s": time.monotonic() - mid,
            "stats": client.stats.as_dict() if client is not None else {},
            "model": client.settings.model if client is not None else None}


# ----- the report ------------------------------------------------------------------------------------------------
def snf_metrics(setup: Setup, result: dict, rows) -> tuple | None:
    """(recall@M, recall@k, mean rank of s1 where CCG proposed it, how many such users), or None when the backend
    did not answer some user of ``rows`` whose candidates hold s1."""
    m, k = int(setup.config["aug_num_pseudo"]), int(setup.config["snf_num_picks"])
    ranks = []
    for j in rows:
        cands = [int(c) for c in setup.snf_cands[j]]
        hidden = setup.hidden[setup.rows[j]]
        if hidden not in cands:
            continue  # a miss for every backend
        if j not in result["orders"]:
            return None
        ranks.append(result["orders"][j].index(cands.index(hidden)) + 1)
    ranks = np.array(ranks)
    mean = float(ranks.mean()) if len(ranks) else float("nan")
    return float((ranks <= m).sum()) / len(rows), float((ranks <= k).sum()) / len(rows), mean, len(ranks)


def arv_metrics(setup: Setup, result: dict, rows) -> tuple | None:
    """(accuracy over ``rows``, accuracy where the candidates hold m_u, how many such users), or None when the
    backend did not answer some user whose candidates hold m_u."""
    hits, n_in = 0, 0
    for j in rows:
        cands = [int(c) for c in setup.arv_cands[j]]
        masked = setup.masked[setup.rows[j]]
        if masked not in cands:
            continue
        if j not in result["picks"]:
            return None
        n_in += 1
        hits += cands[result["picks"][j]] == masked
    return hits / len(rows), (hits / n_in if n_in else float("nan")), n_in


def label(backend: str, result: dict) -> str:
    names = {"random": "random pick", "ccg": "CCG order", "model": "model (forward helper)",
             "offline": "offline stand-in"}
    if backend in names:
        return names[backend]
    model = (result["model"] or "").split(" (")[0]
    return f"{backend} ({model.rsplit('/', 1)[-1]})"


def table(setup: Setup, results: dict, rows, say) -> None:
    """Both parts' tables for the users ``rows`` (positions in setup.rows), every backend that answered them."""
    m, k = setup.config["aug_num_pseudo"], setup.config["snf_num_picks"]
    say(f"(a) prior-item recovery (SNF), {len(rows)} users: K={setup.config['ccg_num_candidates']} CCG candidates, "
        f"k={k} kept, M={m} pseudo items; recall over all {len(rows)} users, mean rank of s1 (1..K) where it is a "
        "candidate")
    say(f"  {'backend':<34} {'recall@M':>9} {'recall@k':>9} {'mean rank':>10} {'s1 in K':>8} {'ms/user':>8}")
    for backend, result in results.items():
        found = snf_metrics(setup, result, rows)
        if found is not None:
            at_m, at_k, rank, n_in = found
            say(f"  {label(backend, result):<34} {at_m:>9.4f} {at_k:>9.4f} {rank:>10.2f} {n_in:>8} "
                f"{per_user_ms(result, 'snf'):>8}")
    say(f"(b) masked-item recovery (ARV), {len(rows)} users: {setup.config['arv_num_candidates']} forward-helper "
        "candidates, one picked")
    say(f"  {'backend':<34} {'accuracy':>9} {'acc | m_u in cands':>19} {'m_u in cands':>13} {'ms/user':>8}")
    for backend, result in results.items():
        found = arv_metrics(setup, result, rows)
        if found is not None:
            acc, acc_in, n_in = found
            say(f"  {label(backend, result):<34} {acc:>9.4f} {acc_in:>19.3f} {n_in:>13} "
                f"{per_user_ms(result, 'arv'):>8}")


def per_user_ms(result: dict, part: str) -> str:
    """Milliseconds per user the backend answered in ``part`` (LM loading included)."""
    answered = len(result["orders"] if part == "snf" else result["picks"])
    return f"{1000 * result[part + '_s'] / answered:.1f}" if answered else "—"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    lines, start = [], time.monotonic()

    def say(line=""):
        print(line, flush=True)
        lines.extend(line.split("\n"))

    setup = build_setup(args, say)
    every = list(range(len(setup.rows)))
    subset = [j for j, i in enumerate(setup.rows) if i in set(setup.lm_rows)]
    snf_in, arv_in = covered(setup, "snf"), covered(setup, "arv")
    say(f"hidden item among the candidates: s1 for {len(snf_in)} of {len(every)} users (SNF), m_u for {len(arv_in)} "
        "(ARV); lm_score and the LLM are asked for those users only (the others are misses whatever they answer)")
    backends = ["random", "ccg", "model"]
    if setup.config["item_text_field"]:
        backends += ["offline", "lm_score"] + (["llm"] if os.environ.get("OPENAI_BASE_URL") else [])
    else:
        say(f"{args.dataset} has no item text field (item_text_field unset): offline, lm_score and llm skipped (they "
            "read item titles); random pick, CCG order and the text-free model backend only")
    results = {}
    for b in backends:
        slow = b in ("lm_score", "llm")
        results[b] = run_backend(setup, b, [j for j in snf_in if j in subset] if slow else every,
                                 [j for j in arv_in if j in subset] if slow else every)
        if slow:
            st, r = results[b]["stats"], results[b]
            say(f"{b}: {r['model']}: {len(r['orders'])} SNF + {len(r['picks'])} ARV requests, "
                f"{st.get('calls', 0)} scored now, {st.get('cache_hits', 0)} from the cache, "
                f"{r['snf_s'] + r['arv_s']:.0f} s (model loading included)")
    table(setup, results, every, say)
    if len(subset) < len(every):
        table(setup, results, subset, say)
    say(f"total {time.monotonic() - start:.0f} s on this machine ({os.cpu_count()} CPUs, shared); lm_score's and the "
        "LLM's ms/user include loading the model and are near 0 when the answers came from the cache")
    command = " ".join(["python", "benchmarks/augment_quality.py", *map(shlex.quote, argv)])
    write_markdown(Path(args.out), "Augmentation quality", command, __doc__.split("\n")[0], lines)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
