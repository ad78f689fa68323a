"""The property key lists the experiment runner depends on: which properties leave a run's id alone, which the
runner sets itself, and which effective settings a run's record keeps."""

from recbole_llmser.schema import NON_SEMANTIC_KEYS, RECORDED_SETTINGS  # derived from the property schema

__all__ = ["NON_SEMANTIC_KEYS", "RECORDED_SETTINGS", "RUNNER_DEFAULTS", "RUNNER_KEYS"]

#: Properties the runner sets for every run unless the plan does (not part of the id: NON_SEMANTIC_KEYS).
RUNNER_DEFAULTS = {"show_progress": False}
#: Set by the runner for every run, never by a plan: each run trains in the folder ``<model>-<method>-<id>``
#: under ``<checkpoint_dir>/<dataset>/``, so a run that was stopped (Ctrl-C, timeout, a lost machine) resumes
#: from its last validated epoch the next time the plan runs.
RUNNER_KEYS = ("run_name",)
