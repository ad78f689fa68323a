"""The lm_score backend: the scoring maths on a tiny random Llama (tests/test_tslrec.py's make_tiny_lm), the client
in the ask flow, and the augmentation stage end to end with its score cache."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recbole_llmser.augment import backends, lm_score, pipeline
from recbole_llmser.augment.llm import LLMRequest
from recbole_llmser.augment.llm_cache import ResponseCache
from recbole_llmser.augment.prompts import ARV_TEMPLATE_VERSION, SNF_TEMPLATE_VERSION, arv_messages, snf_messages
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.quick_start import run
from recbole_llmser.tslrec.lm import LMSpec
from tests.conftest import tiny_config_dict
from tests.test_tslrec import make_tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SMALL = dict(method="llmser", stage="augment", ccg_epochs=1, semantic_backend="tfidf", ccg_num_candidates=8,
             snf_num_picks=6, aug_num_pseudo=4, arv_num_candidates=5)


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny-llama")


def _causal_lm(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder).eval()


def _full_forward_logprobs(model, prefix, candidate):
    """Reference: one forward over prefix + candidate, the log-probability of each candidate token."""
    ids = torch.tensor([list(prefix) + list(candidate)])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    return np.array([float(logp[len(prefix) - 1 + j, t]) for j, t in enumerate(candidate)])


# ----- the scoring text ----------------------------------------------------------------------------------------
def test_prompt_parts_read_back_what_the_prompts_show():
    history, candidates = ["red hat", "blue 3. shoe"], ["green - scarf", "1. odd", "thing"]
    assert lm_score.prompt_parts(snf_messages(history, candidates, 2)) == (history, candidates)
    assert lm_score.prompt_parts(arv_messages([], candidates)) == ([], candidates)
    prefix = lm_score.scoring_prefix(ARV_TEMPLATE_VERSION, history)
    assert prefix.splitlines()[1:3] == ["- red hat", "- blue 3. shoe"] and prefix.endswith("interacted with:\n-")
    assert lm_score.scoring_prefix(SNF_TEMPLATE_VERSION, []) != lm_score.scoring_prefix(ARV_TEMPLATE_VERSION, [])
    with pytest.raises(LLMSeRError):
        lm_score.prompt_parts([{"role": "user", "content": "no candidates here"}])
    with pytest.raises(LLMSeRError):
        lm_score.scoring_prefix("other-v1", history)


# ----- the maths ---------------------------------------------------------------------------------------------
def test_length_normalisation_and_ranking():
    # per-token mean: a long title of likely tokens beats a short unlikely one although its sum is lower
    scores = lm_score.normalised_scores([np.array([-0.5, -0.5, -0.5, -0.5]), np.array([-1.0]), np.array([-0.5])])
    assert scores.tolist() == [-0.5, -1.0, -0.5]
    assert lm_score.ranking(scores) == [0, 2, 1]  # ties keep the order given
    assert lm_score.ranking([0.1, 0.3, 0.2]) == [1, 2, 0]


def test_cached_prefix_equals_full_forwards(lm_dir):
    model = _causal_lm(lm_dir)
    rng = np.random.default_rng(0)
    prefix = rng.integers(3, 200, size=17).tolist()
    candidates = [rng.integers(3, 200, size=n).tolist() for n in (1, 4, 2, 6, 3, 1, 5)]
    for batch in (1, 3, 32):  # several batches, padding, single-token candidates (no candidate forward)
        cached = lm_score.candidate_logprobs(model, prefix, candidates, batch)
        for got, cand in zip(cached, candidates):
            assert len(got) == len(cand)
            np.testing.assert_allclose(got, _full_forward_logprobs(model, prefix, cand), atol=1e-4)


def test_a_title_that_continues_the_prompt_scores_higher(lm_dir):
    """A hand-made LM: the blocks write nothing (the residual stream is the token's embedding), and the head scores
    token j by the similarity of the current token to j - 1, so 'the next token is this one + 1' is almost certain."""
    model = _causal_lm(lm_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = torch.nn.functional.normalize(model.model.embed_tokens.weight, dim=1)
        model.lm_head.weight.copy_(4.0 * torch.roll(emb, shifts=1, dims=0))  # row j = embedding of j - 1
    prefix = [20, 21, 22, 23]
    follows, scrambled, short = [24, 25, 26, 27], [27, 4, 60, 33], [24]
    scores = lm_score.normalised_scores(lm_score.candidate_logprobs(model, prefix, [scrambled, follows, short], 2))
    assert scores[1] > scores[0] + 1.0 and scores[2] > scores[0] + 1.0
    assert lm_score.ranking(scores)[-1] == 0


# ----- the client ------------------------------------------------------------------------------------------------
def _requests(n=3):
    titles = [f"product number {i} in colour red" for i in range(1, 30)]
    return [LLMRequest(id=f"snf:u{u}", template_version=SNF_TEMPLATE_VERSION,
                       messages=snf_messages(titles[u:u + 3], titles[10 + u:16 + u], 2)) for u in range(n)]


def test_client_ranks_by_score_and_its_cache_answers_a_rerun(lm_dir, tmp_path, monkeypatch):
    spec = LMSpec(Path(lm_dir), None, str(lm_dir))
    client = lm_score.LMScoreClient(lm_score.LMScorer(spec, batch_size=4), ResponseCache(tmp_path / "c.jsonl"),
                                    progress=False)
    requests = _requests() + _requests(1)  # the last one repeats the first: scored once
    results = client.run(requests, desc="SNF")
    # 3 distinct requests of 6 candidates: a prefix forward and 2 batches of 4 each
    assert client.stats.calls == 3 and client.stats.cache_hits == 0 and client.stats.forwards == 3 * 3
    for request, result in zip(requests, results):
        scores = client.scores(request)
        assert len(scores) == 6
        assert json.loads(result.text) == {"items": [i + 1 for i in lm_score.ranking(scores)]}
        assert result.prompt_tokens > 0 and result.completion_tokens == 0
    # a new client on the same cache file: no LM forward, nothing loaded, the same answers
    monkeypatch.setattr(lm_score, "candidate_logprobs", lambda *a, **k: pytest.fail("LM forward on a cached run"))
    again = lm_score.LMScoreClient(lm_score.LMScorer(spec), ResponseCache(tmp_path / "c.jsonl"), progress=False)
    assert [r.text for r in again.run(requests)] == [r.text for r in results]
    assert again.stats.calls == 0 and again.stats.cache_hits == 4 and again.scorer.model is None
    # another LM (other files) is another key
    other = LMSpec(Path(lm_dir), None, "another label")
    assert lm_score.LMScoreClient(lm_score.LMScorer(other), ResponseCache(tmp_path / "c.jsonl")).key(
        requests[0]) != client.key(requests[0])


def test_backend_choice_and_identity(tiny_data, lm_dir, tmp_cwd):
    from recbole_llmser.config import Config

    data, _ = tiny_data
    config = Config("SASRec", "tiny", config_dict=tiny_config_dict(
        data, **SMALL, llm_backend="lm_score", lm_score_model=str(lm_dir)), cmd_args=[])
    assert backends.resolve_backend(config) == "lm_score" and not backends.asks_llm(config, "lm_score")
    assert backends.backend_settings(config, "offline") == {} and backends.backend_settings(config, "llm") == {}
    ident = backends.backend_settings(config, "lm_score")
    assert ident["lm_score_model"] == str(Path(lm_dir).resolve()) and ident["lm_score_version"] == "lm-score-v1"
    config["lm_score_model"] = "minilm"
    with pytest.raises(LLMSeRError, match="encoder"):
        backends.backend_settings(config, "lm_score")
    config["lm_score_model"] = str(data)
    with pytest.raises(LLMSeRError, match="lm_score_model="):
        backends.backend_settings(config, "lm_score")


# ----- end to end ------------------------------------------------------------------------------------------------
def _augment(data, lm_dir, **extra):
    cfg = tiny_config_dict(data, **{**SMALL, "llm_backend": "lm_score", "lm_score_model": str(lm_dir),
                                    "lm_score_batch_size": 4, **extra})
    out = run("SASRec", "tiny", config_dict=cfg, cmd_args=[])
    path = Path(out["artifact"])
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return path, records, json.loads((path.parent / "summary.json").read_text())


def test_augment_stage_with_lm_score_and_a_cached_rerun(tiny_data, lm_dir, tmp_cwd, monkeypatch):
    data, sequences = tiny_data
    seen = []
    original = lm_score.LMScoreClient.run

    def spy(self, requests, desc="LM score"):
        seen.append((self, list(requests)))
        return original(self, requests, desc)

    monkeypatch.setattr(lm_score.LMScoreClient, "run", spy)
    path, records, summary = _augment(data, lm_dir)
    label = str(Path(lm_dir).resolve())
    assert summary["backend"] == "lm_score" and {r["backend"] for r in records} == {"lm_score"}
    assert len(records) == len(sequences) == summary["augmented_users"]
    assert summary["llm"]["model"] == label and summary["llm"]["backend"] == "lm_score"
    verified = sum(r["arv_status"] == "verified" for r in records)
    assert summary["llm"]["calls"] == len(records) + verified and summary["llm"]["completion_tokens"] == 0
    assert summary["snf_status"] == {"ok": len(records)} and summary["arv_status"] == {"ok": verified}
    assert all(stage["answers"] == 0 for stage in summary["llm_echo"].values())  # a ranking is never an echo
    # SNF kept the LM's best candidates, mapped back from the shuffled prompt: recompute them from the scores
    client = seen[0][0]
    snf_requests = {q.id: q for _, requests in seen for q in requests if q.template_version == SNF_TEMPLATE_VERSION}
    titles = {f"product number {i} in colour {['red', 'blue', 'green'][i % 3]}": f"i{i}" for i in range(1, 51)}
    for r in records:
        prefix = sequences[r["user_id"]][:-2]
        assert not set(r["pseudo_items"]) & set(prefix) and r["tokens"]["completion"] == 0
    by_user = {}
    for user in {r["user_id"] for r in records}:
        request = snf_requests[f"snf:{user}"]
        shown = [titles[t] for t in lm_score.prompt_parts(request.messages)[1]]
        by_user[user] = [shown[i] for i in lm_score.ranking(client.scores(request))][:4]
    assert all(r["snf_order"] == by_user[r["user_id"]] for r in records)

    # without the artifact, the score cache answers every request: no LM forward, the same records
    monkeypatch.setattr(lm_score, "candidate_logprobs", lambda *a, **k: pytest.fail("LM forward on a cached run"))
    path.unlink()
    again_path, again, summary2 = _augment(data, lm_dir)
    assert again_path == path and again == records
    assert summary2["llm"]["calls"] == 0 and summary2["llm"]["cache_hits"] == summary["llm"]["calls"]
    assert summary2["llm"]["forwards"] == 0


def test_plan_and_dry_run_load_no_lm(tiny_data, lm_dir, tmp_cwd, monkeypatch, capsys):
    from recbole_llmser.cli import main

    monkeypatch.setattr(lm_score.LMScorer, "load", lambda self: pytest.fail("the LM was loaded by a dry run"))
    data, _ = tiny_data
    settings = tiny_config_dict(data, **SMALL, llm_backend="lm_score", lm_score_model=str(lm_dir))
    argv = ["--model=SASRec", "--dataset=tiny", "--method=llmser", "--dry_run",
            *[f"--{k}={v}" for k, v in settings.items() if k not in ("method", "stage")]]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"LLM dry run: model {Path(lm_dir).resolve()}" in out and "calls needed" in out
    from recbole_llmser.config import Config
    from recbole_llmser.run_plan import plan_lines

    config = Config("SASRec", "tiny", config_dict={**settings, "method": "llmser"}, cmd_args=[])
    assert any(f"SNF and ARV by the local LM {lm_dir} ranking candidates by title likelihood" in line
               for line in plan_lines(config))


def test_the_folder_and_records_name_the_lm(tiny_data, lm_dir, tmp_cwd, tmp_path):
    from recbole_llmser.config import Config

    data, _ = tiny_data
    other = make_tiny_lm(tmp_path / "other-llama")
    dirs, names = [], []
    for model in (lm_dir, other):
        config = Config("SASRec", "tiny", config_dict=tiny_config_dict(
            data, **SMALL, llm_backend="lm_score", lm_score_model=str(model)), cmd_args=[])
        dirs.append(pipeline.augmentation_dir(config, "lm_score", [[1, 2]]))
        ctx = backends.StageContext(config, None, "lm_score", None, [], [], None, None)
        names.append(pipeline._llm_model(ctx))
    assert dirs[0] != dirs[1]
    assert names == [str(Path(lm_dir).resolve()), str(Path(other).resolve())]
