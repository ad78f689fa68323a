"""The plan a run prints before any work, and --dry_run for every method."""

import logging

import pytest

from recbole_llmser.cli import main
from recbole_llmser.config import Config
from recbole_llmser.run_plan import SHORT_CPU_SETTINGS, heavy_on_cpu, plan_lines
from recbole_llmser.trainer import epoch_estimate
from tests.conftest import TINY, write_tiny_dataset


def _config(data, **extra):
    return Config("SASRec", "tiny", config_dict={"data_path": str(data), "use_gpu": False, **extra}, cmd_args=[])


def test_paper_settings_on_a_cpu_warn_and_show_the_short_settings(tmp_path):
    write_tiny_dataset(tmp_path)
    paper = _config(tmp_path)
    assert heavy_on_cpu(paper)
    lines = plan_lines(paper)
    assert lines[0].startswith("plan: SASRec on tiny, method llmser, stage all, device cpu")
    assert any("CCG reverse and ARV forward SASRec helpers, 30 epochs each" in line for line in lines)
    assert any("offline embedding stand-in" in line for line in lines)
    assert any("K=20 candidates, k=15 picks, M=12 pseudo items per user" in line for line in lines)
    preset = _config(tmp_path, aug_num_pseudo=2)  # a preset's M shows in the plan
    assert any("M=2 pseudo items per user" in line for line in plan_lines(preset))
    assert any("up to 200 epochs" in line for line in lines)
    assert any("hours to days" in line and SHORT_CPU_SETTINGS in line for line in lines)
    short = _config(tmp_path, epochs=1, ccg_epochs=1, MAX_ITEM_LIST_LENGTH=20, method="none", use_gpu=True)
    if "cuda" not in str(short["device"]):  # the device line agrees with what is used
        assert "device cpu (no CUDA device found: use_gpu has no effect)" in plan_lines(short)[0]
    assert not heavy_on_cpu(short)
    assert not any("hours to days" in line or "LLMSeR" in line for line in plan_lines(short))


def test_text_free_and_tslrec_plans(tmp_path):
    write_tiny_dataset(tmp_path, with_item=False)
    lines = plan_lines(_config(tmp_path, method="llmser+tslrec", tsl_lm="minilm"))
    assert any("forward helper model (no item text)" in line for line in lines)
    assert any("TSLRec: stage 1 tunes minilm" in line for line in lines)


@pytest.mark.parametrize("method", ["none", "llmser", "tslrec", "llmser+tslrec"])
def test_dry_run_prints_the_plan_for_every_method(method, tmp_cwd, caplog, tmp_path):
    from tests.test_tslrec import make_tiny_lm

    write_tiny_dataset(tmp_cwd / "data")
    caplog.set_level(logging.INFO)
    args = [f"--{k}={v}" for k, v in TINY.items() if not isinstance(v, list) and k not in ("state", "method")]
    extra = [f"--tsl_lm={make_tiny_lm(tmp_path / 'lm')}", "--tsl_num_categories=4"] if "tslrec" in method else []
    assert main(["--model=SASRec", "--dataset=tiny", f"--data_path={tmp_cwd / 'data'}", f"--method={method}",
                 "--dry_run", "--ccg_epochs=1", "--eval_protocols=[full]", *args, *extra]) == 0
    assert f"plan: SASRec on tiny, method {method}" in caplog.text and "(dry run: nothing is trained)" in caplog.text
    assert not list((tmp_cwd / "saved").glob("tiny/*/results.json"))


def test_epoch_estimate_wording():
    assert epoch_estimate(120, 200, True, 13, 256) == (
        "an epoch takes about 2 min (measured on 13 of 256 batches); at most 200 epochs take about 6.7 h at this "
        "pace (early stopping may end sooner)")
    assert epoch_estimate(3, 1, True) == "an epoch takes about 3 s"
    assert epoch_estimate(600, 30, False, 4, 4) == "an epoch takes about 10 min; 30 epochs take about 5.0 h at this pace"


def test_the_short_settings_are_the_demos():
    from recbole_llmser.utils import REPO_DIR

    demo = next(line for line in (REPO_DIR / "Makefile").read_text().splitlines() if line.startswith("DEMO_ARGS"))
    assert demo.split("?=", 1)[1].strip() == SHORT_CPU_SETTINGS  # what the plan and --help suggest is what make demo runs
