"""``python -m recbole_llmser.experiments <plan.yaml> [--dry_run | --report_only | --only ...]`` (see the package
docstring); the runner also starts each run as ``python -m recbole_llmser.experiments --_child <job.json>``."""

import sys

from recbole_llmser.experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
