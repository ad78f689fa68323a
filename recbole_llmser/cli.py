"""Command line: ``run_recbole_llmser.py`` / ``recbole-llmser``. Imports nothing heavy until it runs (``--help``
answers at once).

Takes RecBole's ``--model``, ``--dataset``, ``--config_files`` and any ``--key=value`` property override.
Errors the user can fix print one line (``recbole_llmser: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from recbole_llmser.methods import METHODS, SECRET_KEYS, STAGES
from recbole_llmser.run_plan import SHORT_CPU_SETTINGS
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.utils import scrub_args


EPILOG = f"""\
properties: any other --key=value overrides a property (lists as in yaml: --eval_protocols="[uni100, full]");
  every key, its default and meaning: docs/properties.md. Common ones:
  --epochs=N --train_batch_size=N --learning_rate=X --MAX_ITEM_LIST_LENGTH=N   training
  --data_path=DIR        folder that holds <dataset>/ with RecBole atomic files (no yaml needed)
  --run_name=NAME        name the run folder: a stopped run resumes, a finished one returns its results
  --show_progress=False  no progress bars (logs, CI)
  --seed=N --use_gpu=False --llm_backend=offline|openai --llm_model=NAME
short settings for a first run on a CPU (the defaults are the paper's, hours to days on a CPU):
  {SHORT_CPU_SETTINGS}
outputs: saved/<dataset>/<run folder>/ (config.yaml, results.json, checkpoint); log/<model>/*.log;
  augmentation and TSLRec caches under saved/<dataset>/augment/ and saved/<dataset>/tslrec/
"""


def build_parser(prog=None) -> argparse.ArgumentParser:
    """The command line's parser; ``prog`` defaults to the name the program was started as."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train and evaluate a RecBole sequential model, optionally with LLM-based augmentation "
                    "(LLMSeR) and/or LLM-enhanced item embeddings (TSLRec).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", "-m", default="SASRec", help="RecBole sequential model (default SASRec)")
    parser.add_argument("--dataset", "-d", default="amazon-beauty", help="dataset name (default amazon-beauty)")
    parser.add_argument("--config_files", default=None, help="space-separated yaml files, applied in order")
    parser.add_argument("--method", default=None, choices=METHODS,
                        help="llmser = LLM-based augmentation + dual-channel training; tslrec = LLM-enhanced item "
                             "embeddings; llmser+tslrec = both; none = the plain backbone")
    parser.add_argument("--stage", default=None, choices=STAGES,
                        help="all (default), augment (artifacts only: LLMSeR's augmentation, TSLRec's table), "
                             "reconstruct (TSLRec's stage 1 only) or train (needs --aug_file / --tsl_embedding_file)")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the run's plan (stages, backends, epochs, protocols), then stop; llmser adds the "
                             "LLM calls, tokens and cost the augmentation would need, tslrec the stages' sizes")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = build_parser().parse_known_args(argv)
    bad = [a for a in scrub_args(rest, SECRET_KEYS) if not (a.startswith("--") and "=" in a)]
    if bad:
        print(f"recbole_llmser: error: unrecognized argument(s) {' '.join(bad)}; properties are --key=value",
              file=sys.stderr)
        return 2
    overrides = [f"--{k}={v}" for k, v in (("method", args.method), ("stage", args.stage)) if v]
    config_files = args.config_files.strip().split() if args.config_files else None
    try:
        from recbole_llmser.quick_start import run

        run(args.model, args.dataset, config_file_list=config_files, cmd_args=rest + overrides, dry_run=args.dry_run)
    except LLMSeRError as err:
        print(f"recbole_llmser: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("recbole_llmser: interrupted", file=sys.stderr)
        return 130
    return 0
