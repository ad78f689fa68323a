"""Each backbone trains one epoch on tiny data through our run(), evaluates, and writes its outputs."""

import json

import pytest
import torch
import yaml

from recbole_llmser.config import Config
from recbole_llmser.data import create_dataset, data_preparation
from recbole_llmser.evaluation import evaluate_split
from recbole_llmser.quick_start import objective_function, run
from recbole_llmser.trainer import SequentialTrainer, kept_epoch
from recbole_llmser.registry import get_model
from tests.conftest import Interrupted, stopped_after_epoch, tiny_config_dict


@pytest.mark.parametrize("model", ["SASRec", "GRU4Rec", "BERT4Rec"])
def test_backbone_trains_and_evaluates(model, tiny_data, tmp_cwd):
    data, sequences = tiny_data
    cfg = tiny_config_dict(data, llm_api_key="sk-NEVER-WRITTEN")
    result = run(model, "tiny", config_dict=cfg, cmd_args=[])

    assert set(result["test"]) == {"uni20", "full"}
    for protocol, res in result["test"].items():
        assert res["overall"]["n"] == len(sequences)
        assert sum(g["n"] for g in res["groups"]) == len(sequences)
        assert [g["name"] for g in res["groups"]] == ["tail", "medium", "head"]
        for key in ("hit@5", "hit@10", "hit@20", "ndcg@5", "ndcg@10", "ndcg@20"):
            assert 0.0 <= res["overall"][key] <= 1.0
    # group sizes follow the number of training items (sequence length - 2) and bounds [4, 7]
    lengths = [len(s) - 2 for s in sequences.values()]
    sizes = [g["n"] for g in result["test"]["full"]["groups"]]
    assert sizes == [sum(x <= 4 for x in lengths), sum(4 < x <= 7 for x in lengths), sum(x > 7 for x in lengths)]

    run_dir = tmp_cwd / "saved" / "tiny"
    (out,) = list(run_dir.iterdir())
    saved = json.loads((out / "results.json").read_text())
    assert saved["test"] == json.loads(json.dumps(result["test"]))
    dumped = (out / "config.yaml").read_text()
    assert yaml.safe_load(dumped)["model"] == model
    for path in tmp_cwd.rglob("*"):
        if path.is_file():
            assert b"sk-NEVER-WRITTEN" not in path.read_bytes(), path
    assert result["checkpoint"] and result["checkpoint"].startswith(str(out))
    # one epoch (tiny_config_dict): validated once, and that epoch's checkpoint is the one kept
    assert result["epochs_trained"] == 1 and result["best_epoch"] == 1 and len(result["valid_curve"]) == 1
    assert result["valid_curve"][0][1] == pytest.approx(result["best_valid_score"], abs=1e-6)


def test_kept_epoch_follows_recbole_early_stopping():
    from recbole.utils import early_stopping

    def replay(scores, bigger=True):  # what Trainer.fit does at each validation: (epoch kept, final cur_step)
        best, step, kept = (float("-inf") if bigger else float("inf")), 0, None
        for epoch_idx, score in enumerate(scores):
            best, step, _, update = early_stopping(score, best, step, max_step=100, bigger=bigger)
            kept = epoch_idx + 1 if update else kept
        return kept, step

    curves = [[0.1, 0.3, 0.2, 0.3, 0.25], [0.5, 0.4, 0.3], [0.2, 0.2], [0.1, 0.2, 0.3]]
    for scores, bigger in [(c, b) for c in curves for b in (True, False)]:
        kept, step = replay(scores, bigger)
        assert kept_epoch(list(enumerate(scores)), step) == kept, (scores, bigger)
    tie = [0.1, 0.3, 0.3, 0.2]
    assert kept_epoch(list(enumerate(tie)), replay(tie)[1]) == 3  # a tie updates, as in RecBole
    assert kept_epoch([], 0) is None
    assert kept_epoch([(5, 0.2)], 3) is None  # resumed: the kept epoch was validated before this process


def _tiny_setup(data, model="SASRec", **extra):
    config = Config(model, "tiny", config_dict=tiny_config_dict(data, **extra), cmd_args=[])
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    net = get_model(model)(config, train._dataset)
    return config, dataset, (train, valid, test), net


def test_full_ranking_matches_recbole_evaluator(tiny_data, tmp_cwd):
    config, dataset, (train, valid, test), net = _tiny_setup(tiny_data[0], eval_protocols=["full"])
    trainer = SequentialTrainer(config, net)
    trainer.fit(train, valid, saved=False, show_progress=False)
    ours = evaluate_split(net, test, dataset, config)["full"]["overall"]
    recbole = trainer.evaluate(test, load_best_model=False)
    for k in (5, 10, 20):
        assert ours[f"hit@{k}"] == pytest.approx(float(recbole[f"hit@{k}"]), abs=1e-4)
        assert ours[f"ndcg@{k}"] == pytest.approx(float(recbole[f"ndcg@{k}"]), abs=1e-4)


def test_checkpoints_never_collide_and_load_on_recent_torch(tiny_data, tmp_cwd):
    config, dataset, (train, valid, test), net = _tiny_setup(tiny_data[0])
    a, b = SequentialTrainer(config, net), SequentialTrainer(config, net)
    assert a.saved_model_file != b.saved_model_file  # built within the same second
    a.fit(train, valid, saved=True, show_progress=False)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    a.evaluate(valid, load_best_model=True)  # torch>=2.6 weights_only default would fail here
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    c = SequentialTrainer(config, net)
    c.resume_checkpoint(a.saved_model_file)
    assert c.start_epoch == 1


def test_objective_function_like_recbole(tiny_data, tmp_cwd):
    cfg = tiny_config_dict(tiny_data[0], model="GRU4Rec", dataset="tiny")
    out = objective_function(config_dict=cfg)
    assert out["model"] == "GRU4Rec"
    assert set(out["test_result"]) == {"uni20", "full"}
    assert out["valid_score_bigger"] is True


@pytest.mark.parametrize("model,method", [("SASRec", "none"), ("SASRec", "llmser"), ("BERT4Rec", "llmser")])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(model, method, tiny_data, tmp_cwd, monkeypatch):
    """Stopped after its second validated epoch, a named run continues from train_state.pth on the next call and
    ends exactly as the same run without the interruption (same batches, dropout, masks and negatives)."""
    from tests.test_dct import _random_artifact

    data, sequences = tiny_data
    extra = {}
    if method == "llmser":  # dual-channel training: SASRec on windows, BERT4Rec on rows
        extra["aug_file"] = str(_random_artifact(tmp_cwd / "aug.jsonl", sequences))
    cfg = tiny_config_dict(data, method=method, epochs=4, stopping_step=10, eval_protocols=["uni20"], **extra)
    straight = run(model, "tiny", config_dict={**cfg, "run_name": "straight"}, cmd_args=[])

    with stopped_after_epoch(monkeypatch, 1), pytest.raises(Interrupted):
        run(model, "tiny", config_dict={**cfg, "run_name": "resumed"}, cmd_args=[])
    folder = tmp_cwd / "saved" / "tiny" / "resumed"
    assert (folder / "train_state.pth").is_file() and not (folder / "results.json").exists()
    resumed = run(model, "tiny", config_dict={**cfg, "run_name": "resumed"}, cmd_args=[])

    assert straight["resumed_at_epoch"] is None and resumed["resumed_at_epoch"] == 3
    assert resumed["epochs_trained"] == straight["epochs_trained"] == 4
    for key in ("valid_curve", "best_epoch", "best_valid_score", "valid", "test"):
        assert resumed[key] == straight[key], key
    assert not (folder / "train_state.pth").exists() and (folder / "results.json").is_file()


def test_a_named_run_folder_refuses_other_settings_and_returns_a_finished_run(tiny_data, tmp_cwd, monkeypatch):
    from recbole_llmser.errors import LLMSeRError

    cfg = tiny_config_dict(tiny_data[0], epochs=3, eval_protocols=["uni20"], run_name="mine")
    with stopped_after_epoch(monkeypatch, 0), pytest.raises(Interrupted):
        run("SASRec", "tiny", config_dict=cfg, cmd_args=[])
    with pytest.raises(LLMSeRError, match=r"holds an unfinished run with other settings \(learning_rate\)"):
        run("SASRec", "tiny", config_dict={**cfg, "learning_rate": 0.01}, cmd_args=[])
    with pytest.raises(LLMSeRError, match=r"other settings \(.*\bmodel\b"):
        run("GRU4Rec", "tiny", config_dict={**cfg, "show_progress": True}, cmd_args=[])
    result = run("SASRec", "tiny", config_dict={**cfg, "show_progress": True}, cmd_args=[])  # not a setting
    assert result["resumed_at_epoch"] == 2 and result["epochs_trained"] == 3
    again = run("SASRec", "tiny", config_dict=cfg, cmd_args=[])  # finished with these settings: its results, as kept
    assert again == {**result, "finished_earlier": True} and result["finished_earlier"] is False
    with pytest.raises(LLMSeRError, match=r"holds a finished run with other settings \(learning_rate\); delete it"):
        run("SASRec", "tiny", config_dict={**cfg, "learning_rate": 0.01}, cmd_args=[])
    # a run made before a property existed: the property at its default is the same run, another value is not
    saved = tmp_cwd / "saved" / "tiny" / "mine" / "config.yaml"
    before = yaml.safe_load(saved.read_text())
    del before["aug_eval_min_weight"]
    saved.write_text(yaml.safe_dump(before))
    assert run("SASRec", "tiny", config_dict=cfg, cmd_args=[])["finished_earlier"] is True
    with pytest.raises(LLMSeRError, match=r"other settings \(aug_eval_min_weight\)"):
        run("SASRec", "tiny", config_dict={**cfg, "aug_eval_min_weight": 0.5}, cmd_args=[])
    with pytest.raises(LLMSeRError, match="run_name"):
        run("SASRec", "tiny", config_dict={**cfg, "run_name": "../elsewhere"}, cmd_args=[])


def test_a_dataset_loaded_without_its_time_field_fails_with_one_line(tiny_data, tmp_cwd):
    from recbole_llmser.errors import LLMSeRError

    cfg = tiny_config_dict(tiny_data[0], load_col={"inter": ["user_id", "item_id"], "item": ["item_id", "title"]})
    with pytest.raises(LLMSeRError, match=r"time field 'timestamp' \(TIME_FIELD\) was not loaded; add it to load_col"):
        run("SASRec", "tiny", config_dict=cfg, cmd_args=[])
    assert not (tmp_cwd / "saved").exists() or not any((tmp_cwd / "saved").rglob("config.yaml"))
