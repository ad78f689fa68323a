"""Issue 29 (items 5-7): a resumed run checks its data files; secrets never reach a file; one process per named run
folder; an empty augmentation artifact is an error; checkpoints are unpickled only when this package wrote them."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recbole_llmser.cli import main
from recbole_llmser.compat import load_checkpoint
from recbole_llmser.config import Config
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.quick_start import run
from recbole_llmser.run_folder import INPUTS, LOCK, _lock, _unlock
from recbole_llmser.utils import atomic_file_with_digest, digest_path, digest_problem, file_sha256, recorded_digests
from tests.conftest import Interrupted, stopped_after_epoch, tiny_config_dict


def _interrupted_run(cfg, monkeypatch, model="SASRec"):
    """Run ``cfg`` (a named run) and stop it after its first validated epoch; returns its folder."""
    with stopped_after_epoch(monkeypatch, 0), pytest.raises(Interrupted):
        run(model, "tiny", config_dict=cfg, cmd_args=[])
    folder = Path(cfg.get("checkpoint_dir", "saved")).resolve() / "tiny" / cfg["run_name"]
    assert (folder / "train_state.pth").is_file() and not (folder / "results.json").exists()
    return folder


def _artifact(path, sequences):
    from tests.test_dct import _random_artifact

    return _random_artifact(path, sequences)


# ----- item 5: a resumed (or finished) run refuses data that changed since it started --------------------------
@pytest.mark.parametrize("changed", [".inter", ".item", "aug_file"])
def test_a_resumed_run_refuses_a_data_file_that_changed_and_resumes_once_restored(changed, tiny_data, tmp_cwd,
                                                                                   monkeypatch):
    data, sequences = tiny_data
    extra = {}
    if changed == "aug_file":
        extra = {"method": "llmser", "aug_file": str(_artifact(tmp_cwd / "aug.jsonl", sequences))}
    cfg = tiny_config_dict(data, epochs=3, stopping_step=10, eval_protocols=["uni20"], run_name="mine", **extra)
    folder = _interrupted_run(cfg, monkeypatch)
    recorded = json.loads((folder / INPUTS).read_text())["files"]
    assert {".inter", ".item"} <= set(recorded) and ("aug_file" in recorded) == (changed == "aug_file")

    target = Path(extra["aug_file"]) if changed == "aug_file" else data / "tiny" / f"tiny{changed}"
    original = target.read_bytes()
    lines = original.decode().splitlines(keepends=True)
    target.write_bytes("".join(lines[:-1]).encode())  # one interaction / item / record fewer: still loads
    with pytest.raises(LLMSeRError) as err:
        run("SASRec", "tiny", config_dict=cfg, cmd_args=[])
    message = str(err.value)
    assert "\n" not in message and str(target.resolve()) in message and "changed since" in message
    assert "restore the file" in message and "run_name" in message
    assert (folder / "train_state.pth").is_file()  # nothing was trained or removed
    assert not (folder / LOCK).exists()  # the refused run let go of the folder

    target.write_bytes(original)
    result = run("SASRec", "tiny", config_dict=cfg, cmd_args=[])
    assert result["resumed_at_epoch"] == 2 and result["epochs_trained"] == 3
    # a finished run is not returned for data it was not trained on either
    target.write_bytes(original + b"\n")  # a blank line: the same data to RecBole and to the artifact reader
    with pytest.raises(LLMSeRError, match="changed since the finished run"):
        run("SASRec", "tiny", config_dict=cfg, cmd_args=[])
    target.write_bytes(original)
    assert run("SASRec", "tiny", config_dict=cfg, cmd_args=[])["finished_earlier"] is True


# ----- item 6: secrets ---------------------------------------------------------------------------------------
def test_secrets_on_the_command_line_reach_no_file(tiny_data, tmp_cwd, monkeypatch):
    data, _ = tiny_data
    cmd = ["--llm_api_key=sk-SECRET123", "--embedding_api_key=emb-SECRET456", "--run_name=secret", "--epochs=2"]
    cfg = tiny_config_dict(data, eval_protocols=["uni20"])
    config = Config("SASRec", "tiny", config_dict=cfg, cmd_args=cmd)
    assert config.secret("llm_api_key") == "sk-SECRET123" and config.secret("embedding_api_key") == "emb-SECRET456"
    assert b"SECRET" not in pickle.dumps(config)
    assert "SECRET" not in repr({k: v for k, v in vars(config).items() if k != "_secrets"})  # only secret() has it

    def no_secret_on_disk():
        files = [p for p in tmp_cwd.rglob("*") if p.is_file() and data not in p.parents]
        assert any(p.name == "train_state.pth" for p in files) or any(p.name == "results.json" for p in files)
        for path in files:
            content = path.read_bytes()
            assert b"SECRET123" not in content and b"SECRET456" not in content, path

    with stopped_after_epoch(monkeypatch, 0), pytest.raises(Interrupted):
        run("SASRec", "tiny", config_dict=cfg, cmd_args=cmd)
    no_secret_on_disk()  # config.yaml, inputs.json, the checkpoint, train_state.pth, the log
    result = run("SASRec", "tiny", config_dict=cfg, cmd_args=cmd)
    no_secret_on_disk()  # results.json, the checkpoint, the log
    checkpoint = load_checkpoint(result["checkpoint"], map_location="cpu")
    assert "--llm_api_key=***" in checkpoint["config"]._cmd_args  # what was given, not its value
    assert list((tmp_cwd / "saved").rglob("*.log"))  # the log (in the run folder) was among the files read


def test_a_secret_given_twice_is_not_echoed():
    with pytest.raises(LLMSeRError) as err:
        Config("SASRec", "amazon-fashion-ids", cmd_args=["--llm_api_key=sk-ONE", "--llm_api_key=sk-TWO"])
    assert "--llm_api_key" in str(err.value) and "sk-ONE" not in str(err.value) and "sk-TWO" not in str(err.value)


def test_a_secret_is_kept_as_typed():
    c = Config("SASRec", "amazon-fashion-ids", cmd_args=["--llm_api_key=1e5", "--embedding_api_key=[key]"])
    assert c.secret("llm_api_key") == "1e5" and c.secret("embedding_api_key") == "[key]"


# ----- item 7a: one process per run folder ------------------------------------------------------------------
def test_a_second_run_with_the_same_run_name_is_refused_while_the_first_runs(tiny_data, tmp_cwd):
    data, _ = tiny_data
    cfg = tiny_config_dict(data, eval_protocols=["uni20"], run_name="busy")
    folder = tmp_cwd / "saved" / "tiny" / "busy"
    folder.mkdir(parents=True)
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (folder / LOCK).write_text(json.dumps({"pid": first.pid, "host": socket.gethostname(), "started": "now"}))
        with pytest.raises(LLMSeRError) as err:
            run("SASRec", "tiny", config_dict=cfg, cmd_args=[])
        message = str(err.value)
        assert "\n" not in message and "in use by another run" in message and f"pid {first.pid}" in message
        assert (folder / LOCK).is_file() and not (folder / "config.yaml").exists()  # the first run's lock stays
    finally:
        first.kill()
        first.wait()
    # its process is gone: the lock is stale, taken over with a warning; the run trains and lets go of it
    result = run("SASRec", "tiny", config_dict=cfg, cmd_args=[])
    assert result["epochs_trained"] == 1 and not (folder / LOCK).exists()


def test_the_lock_is_exclusive_and_released_when_a_run_stops(tiny_data, tmp_cwd, monkeypatch):
    folder = tmp_cwd / "f"
    folder.mkdir()
    _lock(folder)
    with pytest.raises(LLMSeRError, match=f"pid {os.getpid()}"):  # the same run folder, taken twice
        _lock(folder)
    _unlock(folder)
    assert not (folder / LOCK).exists()
    _lock(folder)  # free again
    _unlock(folder)

    cfg = tiny_config_dict(tiny_data[0], epochs=2, eval_protocols=["uni20"], run_name="stopped")
    run_folder = _interrupted_run(cfg, monkeypatch)  # stopped by an exception: the lock is gone
    assert not (run_folder / LOCK).exists()
    run("SASRec", "tiny", config_dict=cfg, cmd_args=[])
    assert not (run_folder / LOCK).exists()


def test_a_lock_left_empty_by_a_dead_process_is_taken_over_only_when_old(tmp_cwd):
    folder = tmp_cwd / "f"
    folder.mkdir()
    (folder / LOCK).write_text("")  # a process that died between creating and writing it ... or is writing now
    with pytest.raises(LLMSeRError, match="a process that is starting"):
        _lock(folder)
    os.utime(folder / LOCK, (0, 0))
    _lock(folder)
    assert json.loads((folder / LOCK).read_text())["pid"] == os.getpid()
    _unlock(folder)


# ----- item 7b: an augmentation artifact without records ----------------------------------------------------
def test_an_empty_augmentation_artifact_is_an_error(tiny_data, tmp_cwd, capsys):
    from tests.test_cli import _tiny_args

    data, _ = tiny_data

    def train_on(artifact, *extra):  # TINY's --method=none first: the last --method wins
        return main([*_tiny_args(data), "--model=SASRec", "--dataset=tiny", "--method=llmser", "--stage=train",
                     f"--aug_file={artifact}", *extra])

    empty = tmp_cwd / "empty.jsonl"
    empty.write_text("\n\n")  # blank lines only
    assert train_on(empty) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"recbole_llmser: error: {empty}: no augmentation records")
    assert not list(tmp_cwd.rglob("results.json"))

    bad = tmp_cwd / "bad.jsonl"
    bad.write_text("".join(json.dumps({"user_id": "nobody", "pseudo_items": [], "w_tilde": 1.0}) + "\n"
                           for _ in range(3)))
    assert train_on(bad, "--aug_bad_records=skip") == 2
    assert "no usable augmentation records — all 3 were skipped (unknown user: 3)" in capsys.readouterr().err
    assert not list(tmp_cwd.rglob("results.json"))


# ----- item 7c: only files this package wrote are unpickled -------------------------------------------------
class _Payload:
    """A pickle that creates a file when it is loaded (what a foreign checkpoint can do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, marker):
    torch.save({"state_dict": _Payload(marker)}, path)


def test_the_best_checkpoint_loads_only_when_its_recorded_sha256_matches(tiny_data, tmp_cwd):
    cfg = tiny_config_dict(tiny_data[0], eval_protocols=["uni20"])
    result = run("SASRec", "tiny", config_dict=cfg, cmd_args=[])
    ckpt = Path(result["checkpoint"])
    assert digest_path(ckpt).is_file() and digest_problem(ckpt) is None
    assert recorded_digests(ckpt) == [file_sha256(ckpt)]
    assert load_checkpoint(ckpt, map_location="cpu")["state_dict"]

    marker = tmp_cwd / "pwned"
    _plant(ckpt, marker)  # another program's file under the checkpoint's name
    with pytest.raises(LLMSeRError) as err:
        load_checkpoint(ckpt, map_location="cpu")
    assert str(err.value).startswith(f"{ckpt} was not written by recbole_llmser (or changed since")
    assert "delete it to retrain" in str(err.value) and not marker.exists()
    digest_path(ckpt).unlink()
    with pytest.raises(LLMSeRError, match="has no recorded sha256"):
        load_checkpoint(ckpt, map_location="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("tampered", ["checkpoint", "train_state"])
def test_a_resumed_run_refuses_a_foreign_checkpoint_or_training_state(tampered, tiny_data, tmp_cwd, monkeypatch):
    cfg = tiny_config_dict(tiny_data[0], epochs=3, eval_protocols=["uni20"], run_name="mine")
    folder = _interrupted_run(cfg, monkeypatch)
    state_file = folder / "train_state.pth"
    if tampered == "checkpoint":
        (target,) = [p for p in folder.glob("*.pth") if p.name != state_file.name]
        _plant(target, tmp_cwd / "pwned")
        fix = f"delete its run folder {folder}"
    else:
        target = state_file
        state = torch.load(target, weights_only=True)
        state["best_valid_score"] = 1.0  # edited by hand: not the file this package wrote
        torch.save(state, target)
        fix = "delete it to train this run from the start"
    trained = []
    monkeypatch.setattr("recbole_llmser.trainer.SequentialTrainer._train_epoch",
                        lambda *a, **k: trained.append(1))
    with pytest.raises(LLMSeRError) as err:
        run("SASRec", "tiny", config_dict=cfg, cmd_args=[])
    message = str(err.value)
    assert message.startswith(f"{target} was not written by recbole_llmser") and fix in message
    assert trained == [] and not (tmp_cwd / "pwned").exists()  # refused before any training


def test_a_digest_record_matches_the_file_at_every_step_of_a_rewrite(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    with atomic_file_with_digest(path) as f:
        f.write(b"first")
    first = recorded_digests(path)
    seen = []
    real_replace = os.replace

    def replace(src, dst):  # just before the new file takes the old one's place
        seen.append((recorded_digests(path), digest_problem(path)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with atomic_file_with_digest(path) as f:
        f.write(b"second")
    monkeypatch.undo()
    assert all(problem is None for _, problem in seen)  # at every rename the file matches the record
    assert any(first[0] in records and len(records) == 2 for records, _ in seen)  # old and new, while replacing
    assert len(recorded_digests(path)) == 1 and digest_problem(path) is None and path.read_bytes() == b"second"


def test_a_helper_checkpoint_that_was_not_written_here_is_retrained_not_loaded(tiny_data, tmp_cwd, monkeypatch,
                                                                             caplog):
    from recbole.trainer import Trainer

    from recbole_llmser.helper_models import helper_digest_dir
    from tests.test_augment import _augment

    data, _ = tiny_data
    artifact, _, _ = _augment(data)
    models = artifact.parent.parent / "models"
    helpers = sorted(models.iterdir())
    assert len(helpers) == 2 and all(digest_problem(h, helper_digest_dir(models)) is None for h in helpers)

    marker = tmp_cwd / "pwned"
    _plant(helpers[0], marker)
    artifact.unlink()  # so that the stage runs again and needs its helpers
    trained = []
    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: trained.append(1) or fit(self, *a, **k))
    with caplog.at_level("WARNING"):
        _augment(data)
    assert not marker.exists() and len(trained) == 1  # the planted one retrained, the other reused
    assert f"{helpers[0]} was not written by recbole_llmser" in caplog.text
    assert all(digest_problem(h, helper_digest_dir(models)) is None for h in helpers)
    assert sorted(models.iterdir()) == helpers
