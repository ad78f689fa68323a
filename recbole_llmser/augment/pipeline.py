"""The augmentation stage: CCG (``ccg.py``) -> SNF (``snf.py``) -> ARV (``arv.py``) -> one artifact per (dataset,
augmentation configuration). This module only sequences the stages: the artifact folder, its reuse, timings, the
records and the summary.

Outputs, under ``<checkpoint_dir>/<dataset>/augment/``:

* ``<config hash>/artifact.jsonl`` — one record per augmented user (see :func:`_record`), written atomically;
* ``<config hash>/summary.json`` — counts (users, calls, cache hits, tokens, failures by kind), timings per stage,
  ``llm_failed``: per stage (``snf``, ``arv``), the users whose LLM call failed (user -> error kind), and
  ``llm_reasked_users``: how many users a rebuild of the artifact asked again (0: built afresh);
* ``models/`` — the reverse and forward helper checkpoints (explicit names, reused when unchanged);
* ``llm_cache.jsonl`` — every finished LLM call (crash-safe; shared by all configurations of the dataset);
* ``embeddings/`` — item text embeddings of the semantic backend (computed once per dataset and backend).

Backends (``llm``, ``offline``, ``model``; see ``backends.py``) are named in the log, the summary and every record.

The folder hash covers the artifact settings (:data:`~recbole_llmser.schema.AUG_KEYS`), the backend and the data,
plus :data:`~recbole_llmser.augment.presentation.LLM_AUG_KEYS` (``llm_shuffle_candidates``) when the LLM answers a
stage (:func:`artifact_settings`): the offline and text-free backends show no prompt, so their folders (and
artifacts) are the same whatever that property says. Records of the LLM backend add ``presented`` (per stage, the
candidates in the order the prompt showed them; None where the stage did not ask the LLM) and ``llm_echo`` (the
stages whose answer repeated that order); its summary adds ``llm_echo`` (per stage: answers, echoes, rate) and the
structured-output mode its calls used (``llm.output_mode``).

Failed LLM calls: a user whose SNF or ARV call failed (the endpoint or the network, see
:data:`~recbole_llmser.augment.llm.RETRYABLE_ERROR_KINDS`) falls back (``snf_fallback``; CCG order for ARV), is
listed in the summary's ``llm_failed`` and, when it has a record, names the stages in the record's
``llm_failed``. A later run finding that artifact rebuilds it (``llm_retry_failed: true``, the default), logging
how many users it re-asks: the LLM cache answers every call that succeeded, so only the failed calls (and the ARV
calls of users whose SNF answer changes) reach the endpoint; the artifact and summary are replaced atomically.
``llm_retry_failed: false`` reuses the artifact as it is. The property is not part of the folder hash.

Ablations (properties): ``snf_mode: ccg_top`` keeps CCG's top M candidates without any filtering (an ASReP-like
reverse-model augmentation); ``snf_mode: random`` prepends M items drawn uniformly from the catalogue instead;
``arv_weight: <w>`` skips ARV and gives every user the same w (1.0 = no ARV). Neither calls the LLM for the
stage it replaces.

Baselines (``baselines.py``): ``snf_mode: cooccurrence`` (the most frequent direct predecessors of the user's first
training item in other users' training prefixes) and ``snf_mode: llm_only`` (the LLM, or the run's stand-in, picks
from a catalogue-wide pool by text similarity, no CCG) replace CCG as the source of P_u. Only the forward helper is
trained (ARV's, reused like CCG's); SNF, ARV, the records and DCT are the same. Their records say where P_u came
from (``pseudo_source``, ``source_rank``: ranks in the baseline's candidate list) and carry ``ccg_rank: null``; their
summary adds ``pseudo_source``; ``timings_s.ccg`` then holds the forward helper alone. ``llm_only`` on the LLM
backend asks the LLM for SNF even with ``arv_weight`` set (:func:`~recbole_llmser.augment.backends.asks_llm`).

Leakage: everything here is computed from training prefixes (the sequence minus its validation and test items,
:func:`~recbole_llmser.sequences.training_prefixes`); prompts show only training items' titles in their
history part.
"""

from __future__ import annotations

import json
import time
from logging import getLogger
from pathlib import Path

from recbole_llmser.augment import arv, baselines, ccg, snf
from recbole_llmser.augment.backends import LLM_STAGES, StageContext, backend_settings, model_name
from recbole_llmser.augment.backends import resolve_backend, stage_context
from recbole_llmser.augment.backends import asks_llm, has_client
from recbole_llmser.augment.llm import RETRYABLE_ERROR_KINDS, quiet_http_logs
from recbole_llmser.augment.presentation import LLM_AUG_KEYS, echo_rates, warn_if_echoing
from recbole_llmser.augment.prompts import ARV_TEMPLATE_VERSION, SNF_TEMPLATE_VERSION
from recbole_llmser.schema import AUG_KEYS, HASH_IF_SET_KEYS, PROPS
from recbole_llmser.sequences import dataset_prefixes
from recbole_llmser.utils import atomic_file, atomic_write_json, content_hash

ARTIFACT = "artifact.jsonl"
SUMMARY = "summary.json"


def artifact_settings(config, backend: str) -> dict:
    """The settings that identify an artifact: the AUG_KEYS, the LLM_AUG_KEYS when the LLM answers a stage, and the
    backend's own (:func:`~recbole_llmser.augment.backends.backend_settings`: the LM of ``lm_score``; nothing for
    the other backends)."""
    keys = AUG_KEYS + (LLM_AUG_KEYS if asks_llm(config, backend) else ())
    return {**{k: config[k] for k in keys}, **backend_settings(config, backend)}


def augmentation_dir(config, backend: str, sequences) -> Path:
    """``<checkpoint_dir>/<dataset>/augment/<hash of the artifact settings, the backend and the data>`` (a
    ``hash_if_set`` key at its default is left out: :data:`~recbole_llmser.schema.HASH_IF_SET_KEYS`)."""
    settings = {k: str(v) for k, v in artifact_settings(config, backend).items()
                if not (k in HASH_IF_SET_KEYS and v == PROPS[k].default)}
    digest = content_hash(settings, sequences, backend.encode())
    return Path(config["checkpoint_dir"]).resolve() / config["dataset"] / "augment" / digest[:16]


def run_augmentation(config, dataset, dry_run: bool = False):
    """Run CCG, SNF and ARV for ``dataset`` (our unbuilt SequentialDataset); returns the artifact path.

    With ``dry_run`` prints the LLM estimate (calls, tokens, cost) and returns None without calling. HTTP clients
    log no line per request meanwhile (:func:`~recbole_llmser.augment.llm.quiet_http_logs`)."""
    with quiet_http_logs():
        return _run_augmentation(config, dataset, dry_run)


def _run_augmentation(config, dataset, dry_run):
    start = time.monotonic()
    backend = resolve_backend(config)
    users, prefixes = dataset_prefixes(config, dataset)
    out_dir = augmentation_dir(config, backend, prefixes)
    reasked = 0
    if (out_dir / ARTIFACT).is_file() and (out_dir / SUMMARY).is_file() and not dry_run:
        reuse, reasked = _reuse_or_reask(config, backend, out_dir)
        if reuse:
            return out_dir / ARTIFACT
    chosen = set(snf.select_users({int(u): len(p) for u, p in zip(users, prefixes)}, config["aug_max_len"]))
    rows = [i for i, u in enumerate(users) if int(u) in chosen]
    if dry_run:
        return _dry_run(config, dataset, backend, users, prefixes, rows, out_dir.parent)
    getLogger().info(f"augmentation: backend {backend}, {len(rows)} of {len(users)} users selected, output {out_dir}")
    timings = {}

    t = time.monotonic()
    baseline = config["snf_mode"] in baselines.BASELINES
    if baseline:  # no CCG: the forward helper alone (ARV's; the text-free pool's)
        forward = baselines.forward_helper(config, dataset, users, prefixes, out_dir.parent / "models")
        candidates = ccg.Candidates(forward, None)
    else:
        candidates = ccg.run(config, dataset, users, prefixes, rows, out_dir.parent / "models")
    timings["ccg"] = time.monotonic() - t

    t = time.monotonic()  # item texts and their vectors (the offline stand-in's embeddings), the LLM client
    ctx = stage_context(config, dataset, backend, users, prefixes, rows, candidates.forward, out_dir.parent)
    timings["item_vectors"] = time.monotonic() - t

    t = time.monotonic()
    items, source = _baseline_candidates(ctx, out_dir.parent) if baseline else (_ccg_items(ctx, candidates), None)
    requests = snf.llm_requests(ctx, items)  # a generator: the LLM client streams it
    picks, pseudo = snf.run(ctx, items, requests)
    timings["snf"] = time.monotonic() - t

    t = time.monotonic()
    verification = arv.run(ctx, pseudo)
    timings["arv"] = time.monotonic() - t

    artifact = out_dir / ARTIFACT
    out_dir.mkdir(parents=True, exist_ok=True)
    write_artifact(artifact, _records(ctx, items, picks, pseudo, verification, source))
    timings["total"] = time.monotonic() - start
    _write_summary(ctx, out_dir, len(pseudo), verification, reasked, timings, source)
    return artifact


def _ccg_items(ctx: StageContext, candidates: ccg.Candidates):
    """CCG's K candidates per selected row, the last ``ccg_text_candidates`` of them from the similarity pool."""
    n_pool = int(ctx.config["ccg_text_candidates"])
    if not n_pool:
        return candidates.items
    pools, kind = baselines.similarity_pools(ctx, candidates.items.shape[1])
    getLogger().info(f"CCG: the last {n_pool} of {candidates.items.shape[1]} candidates per user from the "
                     f"{kind.replace('_', ' ')} (ccg_text_candidates)")
    if kind == "forward_pool":
        getLogger().warning(f"ccg_text_candidates={n_pool}: with backend {ctx.backend} (no item text) the pool is "
                            "the forward helper's own top items, not text similarity; the full_ranking preset was "
                            "chosen with a text pool and lost on amazon-fashion-ids without one: "
                            "--ccg_text_candidates=0 keeps CCG's candidates")
    return ccg.mix_candidates(candidates.items, pools, n_pool)


def _baseline_candidates(ctx: StageContext, root) -> tuple:
    """``(items, source)`` of a baseline (:func:`~recbole_llmser.augment.baselines.candidates`); the selected rows
    whose candidate list is empty (their prefix holds every training item) are left un-augmented."""
    items, source = baselines.candidates(ctx)
    keep = [row for row, found in enumerate(items) if len(found)]
    source["users_without_candidates"] = len(items) - len(keep)
    if len(keep) < len(items):
        getLogger().info(f"augmentation: {len(items) - len(keep)} selected user(s) have no {source['kind']} "
                         "candidate outside their own prefix; left un-augmented")
        ctx.rows = [ctx.rows[row] for row in keep]
        items = [items[row] for row in keep]
    return items, source


def _reuse_or_reask(config, backend, out_dir) -> tuple:
    """``(reuse, reasked)`` for an artifact already built: reuse it, or rebuild it re-asking ``reasked`` users whose
    LLM calls failed (None: a number of failed calls is known, not of users)."""
    logger = getLogger()
    artifact = out_dir / ARTIFACT
    reasked, unlisted = _failed_in(config, backend, out_dir / SUMMARY)
    if not reasked:
        logger.info(f"augmentation: reusing {artifact} (same configuration and data)")
        return True, 0
    what = ("failed LLM call(s) (its summary predates the list of their users)" if unlisted
            else "user(s) whose LLM calls failed")
    logger.info(f"augmentation: {artifact} holds {reasked} {what} when it was made; re-asking the LLM for them "
                "(answers that succeeded come from the LLM cache) and rewriting it (llm_retry_failed: false "
                "reuses it as is)")
    return False, None if unlisted else reasked


def _failed_in(config, backend, summary_path) -> tuple:
    """(n, unlisted): the n users of an existing artifact that fell back because their LLM calls failed, when a run
    should ask them again (``llm_retry_failed``, LLM backend); else n = 0. A summary from before users were listed
    (no ``llm_failed``: ``unlisted`` is True) gives its count of such failed calls instead."""
    if backend != "llm" or config["llm_retry_failed"] is False:
        return 0, False
    try:
        summary = json.loads(Path(summary_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        getLogger().warning(f"augmentation: {summary_path} unreadable ({type(err).__name__}); reusing its artifact")
        return 0, False
    listed = summary.get("llm_failed")
    if listed is None:
        failures = (summary.get("llm") or {}).get("failures") or {}
        return sum(n for kind, n in failures.items() if kind in RETRYABLE_ERROR_KINDS), True
    return len({user for users in listed.values() for user in users}), False


def _dry_run(config, dataset, backend, users, prefixes, rows, root) -> None:
    """Print what SNF and ARV would ask the LLM (calls, tokens, cost); ask nothing and train nothing. CCG's
    candidates come from the helper models, which a dry run does not train: the ``ccg_num_candidates`` most frequent
    training items outside each user's prefix stand in for them (a baseline's pool needs no helper: the real one).
    The number of calls is exact, the tokens an estimate."""
    if not has_client(config, backend):
        print(f"dry run: backend {backend}, snf_mode {config['snf_mode']}, arv_weight {config['arv_weight']}: "
              "no LLM calls")
        return None
    pool = config["snf_mode"] in baselines.BASELINES  # a baseline's own candidates: no helper model needed
    text_pool = config["snf_mode"] == "llm_only" and baselines.uses_text_pool(backend)  # needs the item vectors
    ctx = stage_context(config, dataset, backend, users, prefixes, rows, None, root, embed=text_pool)
    k = int(config["ccg_num_candidates"])
    if pool:
        items, _ = _baseline_candidates(ctx, root)
        stand_in = "the baseline's own candidates"
    else:
        popular = baselines.popularity_order(prefixes, baselines.run_tiebreak_keys(config, dataset))
        items = baselines.popular_outside([prefixes[i] for i in rows], popular, k)
        stand_in = (f"no helper model is trained, so the {k} most frequent training items outside each user's "
                    "prefix stand in for CCG's candidates and ARV's")
    estimate = ctx.client.estimate(snf.llm_requests(ctx, items)) + ctx.client.estimate(
        arv.dry_run_requests(ctx, items))
    print(f"dry run ({model_name(ctx)}, SNF + ARV; {stand_in}: calls exact, tokens estimated):\n"
          + estimate.format())
    return None


def write_artifact(path, lines) -> None:
    """Write the JSON ``lines`` (any iterable, consumed once), each followed by a newline, to ``path`` through a
    temp file and a rename; the records are streamed, never joined into one string."""
    with atomic_file(path) as f:
        for line in lines:
            f.write(line)
            f.write("\n")


def _records(ctx: StageContext, candidates, picks, pseudo: dict, verification: arv.Verification, source=None):
    """One JSON line per augmented row of ``pseudo``, yielded in row order (``source``: a baseline's, see
    :func:`_record`)."""
    config, tok = ctx.config, ctx.item_token
    beta, threshold = float(config["aug_decay_beta"]), int(config["aug_decay_threshold"])
    m = int(config["aug_num_pseudo"])
    predicted = verification.predicted
    for row, items in pseudo.items():
        i = ctx.rows[row]
        prefix = ctx.prefixes[i]
        w = verification.weights[row]
        yield json.dumps(_record(
            user=ctx.user_token(i), pseudo=[tok(x) for x in items], cands=[tok(x) for x in candidates[row]],
            snf_order=None if config["snf_mode"] == "random" else [tok(candidates[row][x]) for x in picks[row][:m]],
            masked=tok(prefix[-1]) if row in predicted else None,
            predicted=tok(predicted[row]) if row in predicted else None,
            w=w, w_tilde=arv.decayed_weight(w, len(items), len(prefix), threshold, m, beta),
            backend=ctx.backend, llm_model=_llm_model(ctx), text=config["item_text_field"] or "none",
            arv_status="verified" if row in predicted else ("mean" if config["arv_weight"] is None else "constant"),
            tokens=ctx.tokens.get(i), llm_failed=[stage for stage in LLM_STAGES if i in ctx.failed[stage]],
            llm=_llm_fields(ctx, i), source=source and source["kind"],
        ), ensure_ascii=False)


def _llm_fields(ctx: StageContext, user) -> dict | None:
    """What only a record of the LLM backend holds: the candidates as each prompt showed them, and the stages whose
    answer echoed that order (None for the other backends, whose records are unchanged)."""
    if ctx.backend != "llm":
        return None
    presented = {stage: [ctx.item_token(x) for x in ctx.shown[stage][user].items] if user in ctx.shown[stage]
                 else None for stage in LLM_STAGES}
    return {"presented": presented,
            "llm_echo": [stage for stage in LLM_STAGES if ctx.answered[stage].get(user)] or None}


def _llm_model(ctx: StageContext):
    """The model that answered SNF and ARV (:func:`~recbole_llmser.augment.backends.model_name`)."""
    return model_name(ctx)


def _record(user, pseudo, cands, snf_order, masked, predicted, w, w_tilde, backend, llm_model, text, arv_status,
            tokens, llm_failed, llm=None, source=None):
    """One artifact record. ``cands`` are CCG's candidates, or with ``source`` (a baseline: "cooccurrence",
    "text_pool", "forward_pool") the baseline's: then ``ccg_rank`` is None (no CCG ran) and ``pseudo_source`` and
    ``source_rank`` (1-based ranks in that list) come last, so the other modes' records are unchanged."""
    ranks = [cands.index(p) + 1 if p in cands else None for p in pseudo]
    return {
        "user_id": user, "pseudo_items": pseudo,
        "ccg_rank": None if source else ranks,
        "snf_order": snf_order, "masked_item": masked, "predicted_item": predicted,
        "w": round(float(w), 6), "w_tilde": round(float(w_tilde), 6), "arv_status": arv_status,
        "backend": backend, "llm_model": llm_model, "text": text,
        "templates": {"snf": SNF_TEMPLATE_VERSION, "arv": ARV_TEMPLATE_VERSION} if backend == "llm" else None,
        "tokens": {"prompt": tokens[0], "completion": tokens[1]} if tokens else None,
        "prompt_hashes": tokens[2] if tokens else None,
        "llm_failed": llm_failed or None,
        **(llm or {}),
        **({"pseudo_source": source, "source_rank": ranks} if source else {}),
    }


def _write_summary(ctx: StageContext, out_dir, augmented: int, verification, reasked, timings, source=None) -> None:
    config, artifact = ctx.config, out_dir / ARTIFACT
    summary = {
        "dataset": config["dataset"], "backend": ctx.backend, "text": config["item_text_field"] or "none",
        "llm_model": _llm_model(ctx), "users": len(ctx.users), "selected_users": len(ctx.rows),
        "augmented_users": augmented, "skipped_users": len(ctx.rows) - augmented,
        "verified_users": verification.verified, "mean_w": verification.mean_w,
        "snf_mode": config["snf_mode"], "arv_weight": config["arv_weight"],
        "llm": ctx.client.stats.as_dict() if ctx.client else None,
        **{stage: dict(sorted(counts.items())) for stage, counts in ctx.status.items()},  # answers come in any order
        "llm_failed": {stage: {ctx.user_token(i): kind for i, kind in sorted(failed.items())}
                       for stage, failed in ctx.failed.items()},
        "llm_reasked_users": reasked,
        "llm_echo": echo_rates(ctx.answered) if ctx.client else None,
        "timings_s": {k: round(v, 2) for k, v in timings.items()}, "artifact": str(artifact),
        "settings": artifact_settings(config, ctx.backend),
        **({"pseudo_source": source} if source else {}),
    }
    atomic_write_json(out_dir / SUMMARY, summary)
    logger = getLogger()
    if ctx.client:
        warn_if_echoing(summary["llm_echo"], ctx.client.settings.model, config["llm_echo_warn_rate"], logger)
    logger.info(f"augmentation: {augmented} users augmented (backend {ctx.backend}); artifact {artifact}, "
                f"summary {out_dir / SUMMARY}")
    n_failed = len(set(ctx.failed["snf"]) | set(ctx.failed["arv"]))
    if n_failed:
        logger.warning(f"augmentation: {n_failed} user(s) fell back because their LLM calls failed (listed in "
                       f"{SUMMARY} under llm_failed); a later run re-asks them (llm_retry_failed)")
