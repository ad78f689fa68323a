"""The augmentation-quality benchmark (benchmarks/augment_quality.py) on tiny text-free data: the backends that need
no item text run (random pick, CCG order, the forward-model backend), the text backends are skipped with a line
saying why. No quality is asserted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import write_tiny_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import augment_quality  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_text_free_dataset_runs_the_text_free_backends(tmp_cwd, capsys):
    write_tiny_dataset(tmp_cwd / "data", with_item=False, n_users=40, n_items=60, lengths=(7, 12))
    out = tmp_cwd / "augment_quality.md"
    augment_quality.main(["--dataset=tiny", f"--data_path={tmp_cwd / 'data'}", "--users=15", "--ccg_epochs=1",
                          "--ccg_batch_size=64", "--ccg_max_len=10", f"--workdir={tmp_cwd / 'work'}", f"--out={out}"])
    text = out.read_text()
    assert "sampled users with >= 4 training items" in text and "15 sampled users" in text
    assert "no item text field" in text and "offline, lm_score and llm skipped" in text
    lines = text.splitlines()
    snf_at = next(i for i, line in enumerate(lines) if line.startswith("(a) prior-item recovery"))
    arv_at = next(i for i, line in enumerate(lines) if line.startswith("(b) masked-item recovery"))
    snf_rows = {line[2:36].strip(): line[36:].split() for line in lines[snf_at + 2:arv_at]}
    arv_rows = {line[2:36].strip(): line[36:].split() for line in lines[arv_at + 2:] if line.startswith("  ")}
    backends = {"random pick", "CCG order", "model (forward helper)"}
    assert set(snf_rows) == backends and set(arv_rows) == backends
    for row in snf_rows.values():
        at_m, at_k = float(row[0]), float(row[1])
        assert 0.0 <= at_m <= at_k <= 1.0
    # the text-free ARV takes the forward helper's top candidate: CCG order's pick
    assert arv_rows["model (forward helper)"][:3] == arv_rows["CCG order"][:3]
    assert "offline stand-in" not in text and "lm_score (" not in text
    assert capsys.readouterr().out.rstrip().endswith(f"written to {out}")
