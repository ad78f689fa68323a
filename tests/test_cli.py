"""Bad input through the command line: one clear line on stderr, exit status 2, nothing left behind."""

import subprocess
import sys
from pathlib import Path

import pytest

from recbole_llmser.cli import main
from tests.conftest import TINY, write_tiny_dataset

REPO = Path(__file__).resolve().parents[1]


def _tiny_args(data):
    args = [f"--{k}={v}" for k, v in TINY.items() if not isinstance(v, list) and k != "state"]
    return args + [f"--data_path={data}", "--eval_protocols=['uni20']"]


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("recbole_llmser: error: ")
    return err[0]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model=NoSuchRec"], "no such model"),
        (["--model=SASRec", "--epochs=-3"], "'epochs'"),
        (["--model=SASRec", "--eval_protocols=['pop100']"], "'eval_protocols'"),
        (["--model=SASRec", "stray"], "unrecognized argument"),
    ],
)
def test_bad_arguments(argv, needle, tmp_cwd, capsys):
    assert main(argv + ["--dataset=amazon-fashion-ids"]) == 2
    assert needle in _error_line(capsys)
    assert not (tmp_cwd / "saved").exists()


def test_unknown_dataset(tmp_cwd, capsys):
    assert main(["--model=SASRec", "--dataset=nowhere", f"--data_path={tmp_cwd}"]) == 2
    line = _error_line(capsys)
    assert "nowhere" in line and str(tmp_cwd / "nowhere") in line
    assert not (tmp_cwd / "saved").exists()


def test_missing_item_text_field(tmp_cwd, capsys):
    write_tiny_dataset(tmp_cwd / "data", with_item=False)
    argv = ["--model=SASRec", "--dataset=tiny", "--item_text_field=title", *_tiny_args(tmp_cwd / "data")]
    assert main(argv) == 2
    assert "'title'" in _error_line(capsys)


def test_malformed_config_file(tmp_cwd, capsys):
    bad = tmp_cwd / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    assert main(["--model=SASRec", "--dataset=amazon-fashion-ids", f"--config_files={bad}"]) == 2
    assert str(bad) in _error_line(capsys)


def test_amazon_fashion_offline_is_one_line(tmp_cwd, capsys):
    # mirrors on a closed local port: what an offline machine sees, without touching the internet
    argv = ["--model=SASRec", "--dataset=amazon-fashion", f"--data_path={tmp_cwd}", "--raw_mirrors=['http://127.0.0.1:9/']"]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "AMAZON_FASHION.json.gz" in line and str(tmp_cwd / "amazon-fashion") in line
    leftovers = [p for p in (tmp_cwd / "amazon-fashion").rglob("*")] if (tmp_cwd / "amazon-fashion").exists() else []
    assert leftovers == []


def test_script_trains_and_prints_grouped_metrics(tmp_cwd):
    write_tiny_dataset(tmp_cwd / "data")
    cmd = [sys.executable, str(REPO / "run_recbole_llmser.py"), "--model=GRU4Rec", "--dataset=tiny",
           "--item_text_field=title", "--load_col={'inter':['user_id','item_id','timestamp'],'item':['item_id','title']}",
           "--state=INFO", *_tiny_args(tmp_cwd / "data")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "test [uni20]" in out and "tail" in out and "head" in out
    assert "outputs" in out


def test_script_error_has_no_traceback(tmp_cwd):
    cmd = [sys.executable, str(REPO / "run_recbole_llmser.py"), "--model=SASRec", "--dataset=amazon-fashion-ids",
           "--epochs=-1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("recbole_llmser: error: property 'epochs'")


def test_a_key_given_with_a_space_is_not_echoed(tmp_cwd, capsys):
    assert main(["--model=SASRec", "--dataset=amazon-fashion-ids", "--llm_api_key", "sk-SPACED123"]) == 2
    line = _error_line(capsys)
    assert "unrecognized argument" in line and "sk-SPACED123" not in line and "***" in line


def test_help_names_the_common_options_and_imports_nothing_heavy():
    code = ("import sys, contextlib, io\nfrom recbole_llmser.cli import main\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n    try:\n        main(['--help'])\n    except SystemExit:\n"
            "        pass\nprint(out.getvalue())\nprint('HEAVY', sorted({'torch', 'recbole', 'pandas'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert "HEAVY []" in proc.stdout  # --help answers without importing torch, RecBole or pandas
    for needle in ("--epochs", "--run_name", "--show_progress", "--data_path", "docs/properties.md",
                   "--ccg_epochs=1", "saved/<dataset>/"):
        assert needle in proc.stdout, needle
