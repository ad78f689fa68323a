"""Peak memory of loading a dataset whose item titles hold pathological words, beside the clean dataset.

    python benchmarks/text_memory.py            # bundled amazon-beauty, about a minute

Each variant loads the dataset (RecBole's loader through ``create_dataset``, method none) in a fresh child process,
one after another, and reports the child's peak RSS; the ratios to the clean load are measured in the same run.
Variants: the clean ``.item``; one title with a 10,000- and one with a 100,000-character word, loaded with the
default caps (``item_text_token_max_chars``, ``item_text_max_chars``; target: within 1.2x of clean); and the
2,000-character word with the caps lifted (what happened before the caps; the 100,000-character word without
them needs tens of GB and is not run). Writes ``results/benchmarks/text_memory.md``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_report import write_markdown  # benchmarks/bench_report.py

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import sys
from recbole_llmser.config import Config
from recbole_llmser.data import create_dataset
config = Config("SASRec", sys.argv[1], config_dict={"data_path": sys.argv[2], "method": "none",
                "state": "WARNING", "show_progress": False, **eval(sys.argv[3])}, cmd_args=[])
create_dataset(config)
import resource
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def make_variant(source: Path, root: Path, name: str, word_chars: int) -> Path:
    """A copy of ``source`` (an atomic dataset folder) named ``name`` whose first title gets one long word."""
    folder = root / name
    folder.mkdir(parents=True)
    for path in source.iterdir():
        if path.suffix in (".inter", ".item"):
            shutil.copy(path, folder / f"{name}{path.suffix}")
    if word_chars:
        item = folder / f"{name}.item"
        lines = item.read_text(encoding="utf-8").split("\n")
        header = lines[0].split("\t")
        col = next(i for i, field in enumerate(header) if field.startswith("title:"))
        cells = lines[1].split("\t")
        cells[col] = cells[col] + " " + "x" * word_chars
        lines[1] = "\t".join(cells)
        item.write_text("\n".join(lines), encoding="utf-8")
    return folder


def peak_rss_mib(name: str, data_path: Path, settings: dict, cwd: Path) -> tuple:
    """(peak RSS in MiB, seconds) of one child process loading ``name``."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", CHILD, name, str(data_path), repr(settings)], cwd=cwd,
                          capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                                              "HF_HUB_OFFLINE": "1"})
    seconds = time.monotonic() - start
    if proc.returncode:
        raise SystemExit(f"child for {name} failed:\n{proc.stderr[-2000:]}")
    return int(proc.stdout.split()[-1]) / 1024, seconds  # the child's own peak (ru_maxrss: KiB on Linux)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=str(REPO / "dataset" / "amazon-beauty"), help="atomic dataset folder")
    parser.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "text_memory.md"))
    args = parser.parse_args(argv)
    source = Path(args.dataset)
    variants = [
        ("clean", 0, {}),
        ("word10k", 10_000, {}),
        ("word100k", 100_000, {}),
        ("word2k-uncapped", 2_000, {"item_text_token_max_chars": 10 ** 9, "item_text_max_chars": 10 ** 9}),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, chars, settings in variants:
            make_variant(source, tmp / "data", name, chars)
            mib, seconds = peak_rss_mib(name, tmp / "data", settings, tmp)
            rows.append((name, chars, settings, mib, seconds))
            print(f"{name:18s} peak RSS {mib:8.0f} MiB  ({seconds:.1f} s)", flush=True)
    clean = rows[0][3]
    lines = [
        "| variant | longest word | caps | peak RSS (MiB) | × clean | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, chars, settings, mib, seconds in rows:
        caps = "lifted" if settings else "default"
        lines.append(f"| {name} | {chars or 'as is'} | {caps} | {mib:.0f} | {mib / clean:.2f} | {seconds:.1f} |")
    verdict = all(mib <= 1.2 * clean for name, _, settings, mib, _ in rows if not settings)
    lines += ["", f"Target (every capped variant within 1.2× of clean): {'met' if verdict else 'NOT met'}."]
    out = Path(args.out)
    summary = f"Dataset: `{source.name}`; one child process per variant, run one after another; peak RSS of the child."
    write_markdown(out, "Item-text memory", "python benchmarks/text_memory.py", summary, lines, code_block=False)
    print("\n".join(lines))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
