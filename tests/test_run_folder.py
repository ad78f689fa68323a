"""One folder per run: log, status, config, checkpoints and results together; ``python -m recbole_llmser runs``."""

import json
import logging
import os

import pytest

from recbole_llmser.__main__ import main as module_main
from recbole_llmser.quick_start import run
from recbole_llmser.run_folder import STATUS, list_runs, run_state
from tests.conftest import Interrupted, stopped_after_epoch, tiny_config_dict


def _status(run_dir):
    return json.loads((run_dir / STATUS).read_text())


def test_a_run_keeps_everything_in_its_folder(tiny_data, tmp_cwd, capsys):
    cfg = tiny_config_dict(tiny_data[0], state="INFO", tensorboard=True)
    result = run("SASRec", "tiny", config_dict=cfg, cmd_args=[])
    run_dir = tmp_cwd / "saved" / "tiny" / result["run_dir"].rsplit("/", 1)[-1]
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "inputs.json", "results.json", "status.json", f"{run_dir.name}.log", "tensorboard"} <= names
    assert "run.lock" not in names and "train_state.pth" not in names and "train_state.pth.sha256" not in names
    assert not (tmp_cwd / "log").exists() and not (tmp_cwd / "log_tensorboard").exists()
    status = _status(run_dir)
    assert status["state"] == "finished" and status["stage"] == "results" and status["pid"] == os.getpid()
    log = (run_dir / f"{run_dir.name}.log").read_text()
    assert f"run folder: {run_dir}" in log.splitlines()[0] and "test [full]" in log
    assert "General Hyper Parameters" in log  # the config dump: in the log file ...
    assert "General Hyper Parameters" not in capsys.readouterr().err  # ... not on the console


def test_a_stopped_run_says_so_and_runs_lists_it(tiny_data, tmp_cwd, monkeypatch, capsys):
    cfg = tiny_config_dict(tiny_data[0], epochs=3, run_name="stopped")
    with stopped_after_epoch(monkeypatch, 0), pytest.raises(Interrupted):
        run("SASRec", "tiny", config_dict=cfg, cmd_args=[])
    run_dir = tmp_cwd / "saved" / "tiny" / "stopped"
    status = _status(run_dir)
    assert status["state"] == "failed" and status["stage"] == "train"
    with stopped_after_epoch(monkeypatch, 1, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        run("SASRec", "tiny", config_dict=cfg, cmd_args=[])
    assert _status(run_dir)["state"] == "stopped"
    # a process that died without a word (kill -9): its status still says running, its lock names a dead pid
    (run_dir / "run.lock").write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": os.uname().nodename}))
    (run_dir / STATUS).write_text(json.dumps({**_status(run_dir), "state": "running"}))
    assert run_state(run_dir)["state"] == "stopped (process gone)"
    finished = run("SASRec", "tiny", config_dict=tiny_config_dict(tiny_data[0]), cmd_args=[])
    states = {r["run"]: r for r in list_runs(tmp_cwd / "saved")}
    assert states["stopped"]["state"] == "stopped (process gone)"
    assert states[finished["run_dir"].rsplit("/", 1)[-1]]["state"] == "finished"
    capsys.readouterr()
    assert module_main(["runs", f"--checkpoint_dir={tmp_cwd / 'saved'}"]) == 0
    out = capsys.readouterr().out
    assert "stopped (process gone)" in out and "finished" in out and "SASRec" in out


def test_other_file_handlers_are_left_alone(tiny_data, tmp_cwd, tmp_path):
    """Only RecBole's own ./log/ file moves into the run folder: a handler on another file (pytest's on os.devnull,
    a user's) keeps its file."""
    other = tmp_path / "mine.log"
    handler = logging.FileHandler(other)
    logging.getLogger().addHandler(handler)
    try:
        run("SASRec", "tiny", config_dict=tiny_config_dict(tiny_data[0], state="INFO"), cmd_args=[])
        assert handler in logging.getLogger().handlers and other.is_file() and other.stat().st_size > 0
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert os.path.exists(os.devnull) and not os.path.isfile(os.devnull)
