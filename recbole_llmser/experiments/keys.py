"""The property key lists the experiment runner depends on: which properties leave a run's id alone, which the
runner sets itself, and which effective settings a run's record keeps."""

#: Properties that do not change a run's numbers: left out of the run id, so changing them does not re-run.
NON_SEMANTIC_KEYS = frozenset({
    "show_progress", "state", "gpu_id", "checkpoint_dir", "llm_concurrency", "llm_timeout", "llm_max_retries",
    "log_wandb", "wandb_project",
})
#: Properties the runner sets for every run unless the plan does (not part of the id: NON_SEMANTIC_KEYS).
RUNNER_DEFAULTS = {"show_progress": False}
#: Set by the runner for every run, never by a plan: each run trains in the folder ``<model>-<method>-<id>``
#: under ``<checkpoint_dir>/<dataset>/``, so a run that was stopped (Ctrl-C, timeout, a lost machine) resumes
#: from its last validated epoch the next time the plan runs.
RUNNER_KEYS = ("run_name",)
#: Effective properties copied from the run's config.yaml into its runs.jsonl record (plus every overridden key).
RECORDED_SETTINGS = (
    "device", "epochs", "stopping_step", "MAX_ITEM_LIST_LENGTH", "train_batch_size", "learning_rate", "hidden_size",
    "loss_type", "valid_metric", "eval_protocols", "group_bounds", "group_names", "ccg_model", "ccg_epochs",
    "ccg_num_candidates", "snf_num_picks", "aug_num_pseudo", "aug_decay_beta", "aug_decay_threshold",
    "llm_backend", "llm_model", "semantic_backend", "dct_mode",
)
