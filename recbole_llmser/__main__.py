"""``python -m recbole_llmser``: the command line (as ``run_recbole_llmser.py``), or ``python -m recbole_llmser runs
[--checkpoint_dir=saved]``: the runs under a checkpoint folder with their state and key settings."""

from __future__ import annotations

import sys


def runs(argv) -> int:
    """Print one line per run folder under ``--checkpoint_dir`` (default ``saved``)."""
    import argparse

    from tabulate import tabulate

    from recbole_llmser.run_folder import list_runs

    parser = argparse.ArgumentParser(prog="python -m recbole_llmser runs",
                                     description="List the run folders (<checkpoint_dir>/<dataset>/<run>/).")
    parser.add_argument("--checkpoint_dir", default="saved")
    args = parser.parse_args(argv)
    found = list_runs(args.checkpoint_dir)
    if not found:
        print(f"no run folders under {args.checkpoint_dir}/")
        return 0
    rows = []
    for r in found:
        ndcg = r["test_ndcg@10"]
        shown = f"{ndcg[1]:.4f} ({ndcg[0]})" if ndcg and ndcg[1] is not None else ""
        rows.append([r["dataset"], r["run"], r["state"], r["stage"] or "", r["model"], r["method"], r["seed"],
                     r["epochs"], shown, r["updated"] or ""])
    print(tabulate(rows, headers=["dataset", "run", "state", "stage", "model", "method", "seed", "epochs",
                                  "test NDCG@10", "updated"]))
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["runs"]:
        return runs(argv[1:])
    from recbole_llmser.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
