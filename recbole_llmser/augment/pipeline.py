"""The augmentation stage: CCG -> SNF -> ARV -> one artifact per (dataset, augmentation configuration).

Outputs, under ``<checkpoint_dir>/<dataset>/augment/``:

* ``<config hash>/artifact.jsonl`` — one record per augmented user (see :func:`_record`), written atomically;
* ``<config hash>/summary.json`` — counts (users, calls, cache hits, tokens, failures by kind), timings per stage,
  ``llm_failed``: per stage (``snf``, ``arv``), the users whose LLM call failed (user -> error kind), and
  ``llm_reasked_users``: how many users a rebuild of the artifact asked again (0: built afresh);
* ``models/`` — the reverse and forward helper checkpoints (explicit names, reused when unchanged);
* ``llm_cache.jsonl`` — every finished LLM call (crash-safe; shared by all configurations of the dataset);
* ``embeddings/`` — item text embeddings of the semantic backend (computed once per dataset and backend).

Backends, named in the log, the summary and every record:

* ``llm``: an OpenAI-compatible endpoint picks the items (SNF) and the masked item (ARV);
* ``offline``: no endpoint configured (or ``llm_backend: offline``): the documented stand-in
  :class:`~recbole_llmser.augment.offline_ranker.OfflineRanker` ranks candidates by text similarity to the history;
* ``model``: the dataset has no item text (``text: none``): SNF keeps the candidates the forward helper model
  scores highest after the user's history, ARV takes the forward model's top candidate and measures
  w_u with the cosine of the forward model's item embeddings.

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

Leakage: everything here is computed from training prefixes (the sequence minus its validation and test items,
:func:`~recbole_llmser.augment.candidates.training_prefixes`); prompts show only training items' titles in their
history part.
"""

from __future__ import annotations

import json
import time
from logging import getLogger
from pathlib import Path

import numpy as np

from recbole_llmser.augment import candidates as ccg
from recbole_llmser.augment import filter as filt
from recbole_llmser.augment.filter import keep_pseudo_items, select_users
from recbole_llmser.augment.reliability import decayed_weight, fill_unverifiable, reliability
from recbole_llmser.augment.similarity import cosine01
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.utils import atomic_write_json, atomic_write_text, content_hash

ARTIFACT = "artifact.jsonl"
SUMMARY = "summary.json"

#: Properties that define an augmentation; a change gives a new artifact folder.
AUG_KEYS = (
    "dataset", "item_text_field", "seed", "MAX_ITEM_LIST_LENGTH",
    "ccg_model", "ccg_epochs", "ccg_batch_size", "ccg_max_len", "ccg_model_args", "ccg_num_candidates",
    "snf_num_picks", "aug_num_pseudo", "snf_history_max", "snf_fallback", "title_max_chars",
    "arv_num_candidates", "aug_decay_beta", "aug_decay_threshold", "aug_max_len", "snf_mode", "arv_weight",
    "llm_model", "llm_temperature", "llm_max_tokens", "llm_seed", "llm_structured_output",
    "semantic_backend", "semantic_model", "semantic_model_path", "offline_ranker_decay", "semantic_match_threshold",
)


def resolve_backend(config) -> str:
    """'llm', 'offline' or 'model' (no item text), from ``llm_backend`` and the configured endpoint."""
    from recbole_llmser.augment.llm import settings_from_config

    if not config["item_text_field"]:
        return "model"
    choice = config["llm_backend"] or "auto"
    if choice not in ("auto", "openai", "offline"):
        raise LLMSeRError(f"property 'llm_backend' = {choice!r}: expected auto, openai or offline")
    if choice == "offline":
        return "offline"
    configured = settings_from_config(config).configured
    if choice == "openai" and not configured:
        raise LLMSeRError("llm_backend=openai but no endpoint or key: set OPENAI_BASE_URL and/or OPENAI_API_KEY")
    return "llm" if configured else "offline"


def augmentation_dir(config, backend: str, sequences) -> Path:
    """``<checkpoint_dir>/<dataset>/augment/<hash of the AUG_KEYS, the backend and the data>``."""
    digest = content_hash({k: str(config[k]) for k in AUG_KEYS}, sequences, backend.encode())
    return Path(config["checkpoint_dir"]).resolve() / config["dataset"] / "augment" / digest[:16]


def item_texts(dataset, field):
    """Item texts in RecBole's internal id order (index 0 = padding: ''), from the unbuilt dataset."""
    feat = dataset.item_feat
    ids = feat[dataset.iid_field].to_numpy()
    texts = [""] * dataset.item_num
    tokens = dataset.field2id_token[field]
    for iid, value in zip(ids, feat[field].tolist()):
        if isinstance(value, (list, np.ndarray)):  # token_seq: word ids
            texts[int(iid)] = " ".join(str(tokens[w]) for w in value if w != 0)
        else:
            texts[int(iid)] = str(tokens[value]) if value != 0 else ""
    return texts


def prompt_titles(dataset, texts, max_chars: int) -> list:
    """Each item's name in prompts, in RecBole's id order: its text (``texts``, from :func:`item_texts`) cleaned and
    capped at ``max_chars``, else ``item <RecBole token>`` (every item when ``texts`` is None)."""
    from recbole_llmser.augment.prompts import clean_title

    tokens = dataset.field2id_token[dataset.iid_field]
    texts = [""] * dataset.item_num if texts is None else texts
    return [clean_title(t, max_chars, fallback=f"item {tokens[i]}") for i, t in enumerate(texts)]


class _Titles:
    """Prompt titles of item ids (see :func:`prompt_titles`)."""

    def __init__(self, values):
        self.values = values

    def __call__(self, items):
        return [self.values[int(i)] for i in items]


def run_augmentation(config, dataset, dry_run: bool = False):
    """Run CCG, SNF and ARV for ``dataset`` (our unbuilt SequentialDataset); returns the artifact path.

    With ``dry_run`` prints the LLM estimate (calls, tokens, cost) and returns None without calling. HTTP clients
    log no line per request meanwhile (:func:`~recbole_llmser.augment.llm.quiet_http_logs`)."""
    from recbole_llmser.augment.llm import quiet_http_logs

    with quiet_http_logs():
        return _run_augmentation(config, dataset, dry_run)


def _run_augmentation(config, dataset, dry_run):
    logger = getLogger()
    start = time.monotonic()
    timings = {}
    backend = resolve_backend(config)
    users, seqs = ccg.user_sequences(dataset.inter_feat, dataset.uid_field, dataset.iid_field, dataset.time_field)
    prefixes = ccg.training_prefixes(config, seqs)
    out_dir = augmentation_dir(config, backend, prefixes)
    artifact = out_dir / ARTIFACT
    reasked = 0
    if artifact.is_file() and (out_dir / SUMMARY).is_file() and not dry_run:
        reasked, unlisted = _failed_in(config, backend, out_dir / SUMMARY)
        if not reasked:
            logger.info(f"augmentation: reusing {artifact} (same configuration and data)")
            return artifact
        what = ("failed LLM call(s) (its summary predates the list of their users)" if unlisted
                else "user(s) whose LLM calls failed")
        logger.info(f"augmentation: {artifact} holds {reasked} {what} when it was made; re-asking the LLM for them "
                    "(answers that succeeded come from the LLM cache) and rewriting it (llm_retry_failed: false "
                    "reuses it as is)")
        reasked = None if unlisted else reasked
    root = out_dir.parent
    tok = lambda i: dataset.id2token(dataset.iid_field, int(i))  # noqa: E731
    utok = lambda u: dataset.id2token(dataset.uid_field, int(u))  # noqa: E731

    lengths = {int(u): len(p) for u, p in zip(users, prefixes)}
    chosen = set(select_users(lengths, config["aug_max_len"]))
    idx = [i for i, u in enumerate(users) if int(u) in chosen]
    logger.info(f"augmentation: backend {backend}, {len(idx)} of {len(users)} users selected, output {out_dir}")
    K, k, M = int(config["ccg_num_candidates"]), int(config["snf_num_picks"]), int(config["aug_num_pseudo"])
    n_arv = int(config["arv_num_candidates"])
    batch = int(config["eval_batch_size"])

    # ----- CCG: reverse and forward helper models on training prefixes ------------------------------------
    t = time.monotonic()
    models_dir = root / "models"
    rev_seqs = [p[::-1] for p in prefixes]
    reverse = ccg.train_helper(config, dataset, list(users), rev_seqs, "reverse", models_dir)
    forward = ccg.train_helper(config, dataset, list(users), prefixes, "forward", models_dir)
    cands = ccg.score_top_k(reverse, [rev_seqs[i] for i in idx], [prefixes[i] for i in idx], K, batch, "CCG",
                            bool(config["show_progress"]))
    timings["ccg"] = time.monotonic() - t

    # ----- SNF ----------------------------------------------------------------------------------------------
    t = time.monotonic()
    stats = {"snf_status": {}, "arv_status": {}}
    failed = {"snf": {}, "arv": {}}  # stage -> {user index: error kind} of calls that failed (RETRYABLE_ERROR_KINDS)
    texts = item_texts(dataset, config["item_text_field"]) if backend != "model" else None
    matcher = None
    if texts is not None:
        emb, matcher = _item_vectors(config, texts, root)
    else:
        emb = _model_vectors(forward)
    tokens = {}  # user index -> [prompt tokens, completion tokens, prompt keys]
    snf_mode, const_w = config["snf_mode"], config["arv_weight"]
    if snf_mode != "filter" or const_w is not None:
        logger.info(f"augmentation ablation: snf_mode={snf_mode}, arv_weight={const_w}")
    client = _llm_client(config, root) if backend == "llm" and (snf_mode == "filter" or const_w is None) else None
    titles = _Titles(prompt_titles(dataset, texts, int(config["title_max_chars"]))) if texts is not None else None
    hist_max = int(config["snf_history_max"])
    if backend == "offline":
        from recbole_llmser.augment.offline_ranker import OfflineRanker

        ranker = OfflineRanker.from_config(config)
    if client is not None and snf_mode == "filter":
        from recbole_llmser.augment.llm import LLMRequest
        from recbole_llmser.augment.prompts import SNF_TEMPLATE_VERSION, expected_answer_tokens, snf_messages, snf_schema

        requests = [
            LLMRequest(id=f"snf:{utok(users[i])}", template_version=SNF_TEMPLATE_VERSION,
                       messages=snf_messages(titles(prefixes[i][-hist_max:]), titles(cands[row]), k),
                       schema=snf_schema(k, K), expected_completion_tokens=expected_answer_tokens(k))
            for row, i in enumerate(idx)
        ]
    if dry_run:
        if client is None:
            print(f"dry run: backend {backend}, snf_mode {snf_mode}, arv_weight {const_w}: no LLM calls")
            return None
        # ARV's candidates come from P_u, which only SNF's answers give: estimate them with CCG's top items
        arv = [_arv_request(utok(users[i]), titles(prefixes[i][:-1][-hist_max:]), titles(cands[row][:n_arv]), n_arv)
               for row, i in enumerate(idx) if len(prefixes[i]) >= 2] if const_w is None else []
        estimate = client.estimate(requests if snf_mode == "filter" else []) + client.estimate(arv)
        print(f"dry run ({config['llm_model']}, SNF + ARV, ARV candidates approximated by CCG order):\n"
              + estimate.format())
        return None
    if snf_mode != "filter":  # ablations: CCG's own order, or random items in place of the candidates
        snf_picks = [list(range(K)) for _ in idx]
    elif client is not None:
        snf_picks = _llm_picks(client, requests, [titles(c) for c in cands], k, M, config, matcher,
                               stats["snf_status"], "SNF", tokens, idx, failed["snf"])
    elif backend == "offline":
        snf_picks = [ranker.rank(emb[prefixes[i][-hist_max:]], emb[cands[row]], k) for row, i in enumerate(idx)]
    else:  # model: forward-model scores of the K candidates after the user's history
        snf_picks = _model_rank([prefixes[i] for i in idx], cands, forward, batch)
    if snf_mode == "random":
        drawn = filt.random_pseudo_items(dataset.item_num, [prefixes[i] for i in idx], M, int(config["seed"]))
        pseudo = dict(enumerate(drawn))
    else:
        pseudo = {row: keep_pseudo_items(picks, list(cands[row]), M)
                  for row, picks in enumerate(snf_picks) if picks is not None}
    timings["snf"] = time.monotonic() - t

    # ----- ARV ----------------------------------------------------------------------------------------------
    t = time.monotonic()
    rows = [row for row in pseudo if len(prefixes[idx[row]]) >= 2] if const_w is None else []
    histories = [np.concatenate([pseudo[row], prefixes[idx[row]][:-1]]) for row in rows]
    exclude = [np.unique(h) for h in histories]
    arv_cands = ccg.score_top_k(forward, histories, exclude, n_arv, batch, "ARV",
                                bool(config["show_progress"])) if rows else np.zeros((0, n_arv), int)
    if client is not None and rows:
        requests = [_arv_request(utok(users[idx[row]]), titles(prefixes[idx[row]][:-1][-hist_max:]),
                                 titles(arv_cands[j]), n_arv) for j, row in enumerate(rows)]
        picks = _llm_picks(client, requests, [titles(c) for c in arv_cands], 1, 1, config, matcher,
                           stats["arv_status"], "ARV", tokens, [idx[row] for row in rows], failed["arv"],
                           fallback="ccg_order")
        picked = [p[0] for p in picks]
    elif backend == "offline":
        picked = [ranker.pick(emb[prefixes[idx[row]][:-1][-hist_max:]], emb[arv_cands[j]]) for j, row in enumerate(rows)]
    else:
        picked = [0 for _ in rows]  # the forward model's own top candidate
    weights, predicted = {}, {}
    for j, row in enumerate(rows):
        masked = int(prefixes[idx[row]][-1])
        pred = int(arv_cands[j][picked[j]])
        predicted[row] = pred
        weights[row] = reliability(pred, masked, cosine01(emb[pred], emb[masked]))
    weights.update({row: 0.0 for row in pseudo if row not in weights})
    weights, fill = fill_unverifiable(weights, set(rows), default=1.0 if const_w is None else float(const_w))
    timings["arv"] = time.monotonic() - t

    # ----- artifact -------------------------------------------------------------------------------------------
    beta, threshold = float(config["aug_decay_beta"]), int(config["aug_decay_threshold"])
    model_name = config["llm_model"] if backend == "llm" else None
    lines = []
    for row, items in pseudo.items():
        i = idx[row]
        prefix = prefixes[i]
        w = weights[row]
        lines.append(json.dumps(_record(
            user=utok(users[i]), pseudo=[tok(x) for x in items], cands=[tok(x) for x in cands[row]],
            snf_order=None if snf_mode == "random" else [tok(cands[row][x]) for x in snf_picks[row][:M]],
            masked=tok(prefix[-1]) if row in predicted else None,
            predicted=tok(predicted[row]) if row in predicted else None,
            w=w, w_tilde=decayed_weight(w, len(items), len(prefix), threshold, M, beta),
            backend=backend, llm_model=model_name, text=config["item_text_field"] or "none",
            arv_status="verified" if row in predicted else ("mean" if const_w is None else "constant"),
            tokens=tokens.get(i), llm_failed=[stage for stage, users_failed in failed.items() if i in users_failed],
        ), ensure_ascii=False))
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(artifact, "\n".join(lines) + ("\n" if lines else ""))
    timings["total"] = time.monotonic() - start
    summary = {
        "dataset": config["dataset"], "backend": backend, "text": config["item_text_field"] or "none",
        "llm_model": model_name, "users": len(users), "selected_users": len(idx), "augmented_users": len(pseudo),
        "skipped_users": len(idx) - len(pseudo), "verified_users": len(rows), "mean_w": fill,
        "snf_mode": snf_mode, "arv_weight": const_w,
        "llm": client.stats.as_dict() if client else None, **stats,
        "llm_failed": {stage: {utok(users[i]): kind for i, kind in sorted(f.items())} for stage, f in failed.items()},
        "llm_reasked_users": reasked,
        "timings_s": {k: round(v, 2) for k, v in timings.items()}, "artifact": str(artifact),
        "settings": {k: config[k] for k in AUG_KEYS},
    }
    atomic_write_json(out_dir / SUMMARY, summary)
    logger.info(f"augmentation: {len(pseudo)} users augmented (backend {backend}); artifact {artifact}, "
                f"summary {out_dir / SUMMARY}")
    n_failed = len(set(failed["snf"]) | set(failed["arv"]))
    if n_failed:
        logger.warning(f"augmentation: {n_failed} user(s) fell back because their LLM calls failed (listed in "
                       f"{SUMMARY} under llm_failed); a later run re-asks them (llm_retry_failed)")
    return artifact


def _failed_in(config, backend, summary_path) -> tuple:
    """(n, unlisted): the n users of an existing artifact that fell back because their LLM calls failed, when a run
    should ask them again (``llm_retry_failed``, LLM backend); else n = 0. A summary from before users were listed
    (no ``llm_failed``: ``unlisted`` is True) gives its count of such failed calls instead."""
    from recbole_llmser.augment.llm import RETRYABLE_ERROR_KINDS

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


def _record(user, pseudo, cands, snf_order, masked, predicted, w, w_tilde, backend, llm_model, text, arv_status,
            tokens, llm_failed):
    from recbole_llmser.augment.prompts import ARV_TEMPLATE_VERSION, SNF_TEMPLATE_VERSION

    return {
        "user_id": user, "pseudo_items": pseudo,
        "ccg_rank": [cands.index(p) + 1 if p in cands else None for p in pseudo],
        "snf_order": snf_order, "masked_item": masked, "predicted_item": predicted,
        "w": round(float(w), 6), "w_tilde": round(float(w_tilde), 6), "arv_status": arv_status,
        "backend": backend, "llm_model": llm_model, "text": text,
        "templates": {"snf": SNF_TEMPLATE_VERSION, "arv": ARV_TEMPLATE_VERSION} if backend == "llm" else None,
        "tokens": {"prompt": tokens[0], "completion": tokens[1]} if tokens else None,
        "prompt_hashes": tokens[2] if tokens else None,
        "llm_failed": llm_failed or None,
    }


def _item_vectors(config, texts, root):
    """(item text vectors, a title matcher for answers that quote titles) from the semantic backend."""
    from recbole_llmser.augment.embedding_cache import item_embeddings
    from recbole_llmser.augment.semantic import build_backend
    from recbole_llmser.augment.similarity import nearest

    backend = build_backend(config)
    vectors = item_embeddings(backend, texts, config["semantic_cache_dir"] or root / "embeddings",
                              config["dataset"], config["item_text_field"])
    threshold = float(config["semantic_match_threshold"])

    def matcher(answers, candidate_titles):
        return nearest(backend.encode(answers), backend.encode(candidate_titles), threshold)

    return vectors, matcher


def _model_vectors(model):
    table = getattr(model, "item_embedding", None)
    if table is None:
        raise LLMSeRError(f"ccg_model={type(model).__name__} has no item_embedding; text-free ARV needs one")
    return table.weight.detach().cpu().numpy()


def _model_rank(histories, cands, model, batch):
    """Per user, candidate indices ordered by the forward model's score after the history."""
    out = []
    for start, scores in ccg.batch_scores(model, histories, batch):
        scores = scores.cpu().numpy()
        for r, c in enumerate(cands[start:start + len(scores)]):
            out.append([int(j) for j in np.argsort(-scores[r][c], kind="stable")])
    return out


def _llm_client(config, root):
    from recbole_llmser.augment.llm import LLMClient, ResponseCache, settings_from_config

    return LLMClient(settings_from_config(config), ResponseCache(root / "llm_cache.jsonl"),
                     progress=bool(config["show_progress"]))


def _llm_picks(client, requests, cand_titles, want, keep, config, matcher, status, stage, tokens, users, failed,
               fallback=None):
    """Ask the LLM; map each answer onto its candidates (never outside them); apply the fallback policy.

    Adds each call's tokens and prompt hash to ``tokens[user index]``, and the error kind of each call that failed
    (:attr:`~recbole_llmser.augment.llm.LLMResult.retryable`) to ``failed[user index]``."""
    from recbole_llmser.augment.llm import BudgetExceeded
    from recbole_llmser.augment.matching import apply_fallback, match_answer

    try:
        results = client.run(requests, desc=stage)
    except BudgetExceeded as err:
        raise LLMSeRError(
            f"LLM token budget llm_budget_tokens={err.budget} spent during {stage} ({err.finished} calls finished "
            f"and cached); re-run with a larger --llm_budget_tokens to resume"
        ) from None
    policy = fallback or config["snf_fallback"]
    picks = []
    for request, result, titles, user in zip(requests, results, cand_titles, users):
        used = tokens.setdefault(user, [0, 0, []])
        used[0] += result.prompt_tokens or 0
        used[1] += result.completion_tokens or 0
        used[2].append(client.key(request)[:16])
        if result.ok:
            match = match_answer(result.text, titles, want, semantic=matcher)
        else:
            match = match_answer("", titles, want)
            status[f"error:{result.error_kind}"] = status.get(f"error:{result.error_kind}", 0) + 1
            if result.retryable:
                failed[user] = result.error_kind
        status[match.status] = status.get(match.status, 0) + 1
        filled = apply_fallback(match, len(titles), keep, policy)
        picks.append(None if filled is None else list(filled.indices))
    return picks


def _arv_request(user, history_titles, cand_titles, n_arv):
    from recbole_llmser.augment.llm import LLMRequest
    from recbole_llmser.augment.prompts import ARV_TEMPLATE_VERSION, arv_messages, arv_schema, expected_answer_tokens

    return LLMRequest(id=f"arv:{user}", template_version=ARV_TEMPLATE_VERSION,
                      messages=arv_messages(history_titles, cand_titles), schema=arv_schema(n_arv),
                      expected_completion_tokens=expected_answer_tokens(1))
