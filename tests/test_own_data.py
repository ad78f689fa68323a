"""A user's own RecBole atomic dataset, with no yaml, through the command line: field detection, every method, and
every kind of broken file (one line, exit 2, no traceback, nothing left behind)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from recbole_llmser.cli import main
from recbole_llmser.config import Config
from recbole_llmser.data.atomic import FILE_ORDER_FIELD, check_atomic_file, detect_fields, parse_header
from recbole_llmser.data.dataset import cap_token_seqs
from recbole_llmser.errors import LLMSeRError

#: Short run settings, as a user would type them (no yaml anywhere).
ARGS = ["--epochs=1", "--ccg_epochs=1", "--MAX_ITEM_LIST_LENGTH=10", "--ccg_max_len=10", "--hidden_size=16",
        "--inner_size=16", "--embedding_size=16", "--n_layers=1", "--n_heads=1", "--train_batch_size=64",
        "--eval_batch_size=64", "--show_progress=False", "--use_gpu=False", "--eval_protocols=[uni20, full]",
        "--snf_num_picks=4", "--ccg_num_candidates=6", "--aug_num_pseudo=3", "--arv_num_candidates=4"]


def asin_dataset(root: Path, name="shop", n_users=30, n_items=40, seed=0):
    """Amazon-shaped atomic files: ASIN ids, a unix timestamp, and a ``.item`` with the title after other fields."""
    rng = random.Random(seed)
    folder = root / name
    folder.mkdir(parents=True)
    asins = [f"B0{rng.randrange(10 ** 8):08d}" for _ in range(n_items)]
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for _ in range(n_users):
        user = f"A{rng.randrange(16 ** 12):012X}"
        for t, asin in enumerate(rng.sample(asins, rng.randint(3, 9))):
            lines.append(f"{user}\t{asin}\t5.0\t{1_400_000_000 + 86_400 * t}")
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = ["item_id:token\tbrand:token\ttitle:token_seq\tprice:float"]
    rows += [f"{a}\tbrand{i % 4}\tShiny product {i} in {['red', 'blue', 'green'][i % 3]}\t{i}.5"
             for i, a in enumerate(asins)]
    (folder / f"{name}.item").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def int_dataset(root: Path, name="ints", n_users=30, n_items=40, seed=1):
    """Integer ids starting at 0, no time column, no ``.item``."""
    rng = random.Random(seed)
    folder = root / name
    folder.mkdir(parents=True)
    lines = ["user_id:token\titem_id:token"]
    for user in range(n_users):
        lines += [f"{user}\t{item}" for item in rng.sample(range(n_items), rng.randint(3, 9))]
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _run(tmp_cwd, name, *extra):
    keys = {arg.split("=", 1)[0] for arg in extra}
    args = [arg for arg in ARGS if arg.split("=", 1)[0] not in keys]
    return main([f"--dataset={name}", f"--data_path={tmp_cwd / 'data'}", *args, *extra])


def _results(tmp_cwd, name):
    found = list((tmp_cwd / "saved" / name).glob("*/results.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


@pytest.fixture
def log(caplog):
    """What a run logs (RecBole's file handler belongs to the first run of the process)."""
    caplog.set_level(logging.INFO)
    return caplog


# ----- detection (pure) --------------------------------------------------------------------------------------
def test_detect_fields_from_headers():
    inter = parse_header("reviewerID:token\tasin:token\toverall:float\tunixReviewTime:float", "x.inter")
    item = parse_header("asin:token\tbrand:token\tname:token_seq", "x.item")
    settings, notes = detect_fields(inter, item, {})
    assert settings == {"USER_ID_FIELD": "reviewerID", "ITEM_ID_FIELD": "asin", "TIME_FIELD": "unixReviewTime",
                        "item_text_field": "name",
                        "load_col": {"inter": ["reviewerID", "asin", "unixReviewTime"], "item": ["asin", "name"]}}
    assert notes == []


def test_detect_fields_without_time_or_text_and_preset_wins():
    inter = parse_header("u:token\ti:token\tscore:float", "x.inter")
    settings, notes = detect_fields(inter, None, {})
    assert settings["TIME_FIELD"] == FILE_ORDER_FIELD and settings["item_text_field"] is None
    assert settings["load_col"] == {"inter": ["u", "i"]}
    assert any("order in the file" in n for n in notes) and any("text-free" in n for n in notes)
    item = parse_header("i:token\tbrand:token", "x.item")
    assert detect_fields(inter, item, {})[0]["item_text_field"] is None  # brand is no text field
    preset = {"TIME_FIELD": "score", "item_text_field": "brand"}
    settings, _ = detect_fields(inter, item, preset)
    assert "TIME_FIELD" not in settings and "item_text_field" not in settings
    assert settings["load_col"] == {"inter": ["u", "i", "score"], "item": ["i", "brand"]}


@pytest.mark.parametrize("header, needle", [
    ("user_id\titem_id", "not 'name:type'"),
    ("user_id:token\titem_id:str", "type 'str'"),
    ("user_id:token\tuser_id:token", "appears twice"),
])
def test_malformed_headers(header, needle):
    with pytest.raises(LLMSeRError, match=needle) as err:
        parse_header(header, "x.inter")
    assert str(err.value).startswith("x.inter:1: ")


def test_inter_without_item_field():
    with pytest.raises(LLMSeRError, match="x.inter:1: no item field"):
        detect_fields(parse_header("user_id:token\ttimestamp:float", "x.inter"), None, {}, "x.inter")


def test_text_caps():
    values = [["short", "words"], ["w" * 100_000, "tail"], ["a"] * 50]
    capped, cut = cap_token_seqs(values, token_max=8, text_max=20)
    assert cut == 2 and capped[0] == ["short", "words"]
    assert list(capped[1]) == ["w" * 8, "tail"] and len(capped[2]) == 10  # 10 one-letter words + 9 spaces <= 20


def test_users_yaml_wins_and_detection_is_logged_once_per_config(tmp_path):
    folder = asin_dataset(tmp_path)
    config = Config("SASRec", "shop", config_dict={"data_path": str(tmp_path)}, cmd_args=[])
    assert (config["USER_ID_FIELD"], config["ITEM_ID_FIELD"], config["TIME_FIELD"]) == ("user_id", "item_id",
                                                                                          "timestamp")
    assert config["item_text_field"] == "title"
    assert config["load_col"] == {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]}
    assert "read from the files' headers" in config.fields_note
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("item_text_field: ~\nload_col:\n  inter: [user_id, item_id, timestamp, rating]\n")
    config = Config("SASRec", "shop", config_file_list=[str(yaml_file)], config_dict={"data_path": str(tmp_path)},
                    cmd_args=[])
    assert config["item_text_field"] is None
    assert config["load_col"] == {"inter": ["user_id", "item_id", "timestamp", "rating"]}
    assert folder.is_dir()


# ----- every method on data shaped unlike the bundled sets, through the CLI ----------------------------------
@pytest.mark.parametrize("maker, name, extra", [
    (asin_dataset, "shop", ["--model=SASRec", "--method=llmser"]),
    (asin_dataset, "shop", ["--model=GRU4Rec", "--method=none"]),
    (int_dataset, "ints", ["--model=SASRec", "--method=llmser"]),
    (int_dataset, "ints", ["--model=BERT4Rec", "--method=none"]),
    (int_dataset, "ints", ["--model=GRU4Rec", "--method=llmser", "--dct_mode=sample"]),
])
def test_own_dataset_without_yaml_trains(maker, name, extra, tmp_cwd, capsys, log):
    maker(tmp_cwd / "data", name)
    assert _run(tmp_cwd, name, *extra) == 0, capsys.readouterr().err
    result = _results(tmp_cwd, name)
    assert set(result["test"]) == {"uni20", "full"}
    assert [g["name"] for g in result["test"]["full"]["groups"]] == ["tail", "medium", "head"]
    assert result["test"]["full"]["overall"]["n"] == 30
    log = log.text
    assert f"dataset '{name}': user user_id, item item_id" in log and "read from the files' headers" in log
    if name == "ints":
        assert "order in the file" in log and "text-free" in log
        if "--method=llmser" in extra:
            assert "backend model" in log


def test_own_dataset_tslrec_and_stages(tmp_cwd, tmp_path, capsys):
    from tests.test_tslrec import make_tiny_lm

    asin_dataset(tmp_cwd / "data", "shop")
    lm = make_tiny_lm(tmp_path / "lm")
    tsl = [f"--tsl_lm={lm}", "--tsl_num_categories=4", "--tsl_batch_size=8", "--tsl_max_tokens=64"]
    assert _run(tmp_cwd, "shop", "--model=SASRec", "--method=llmser+tslrec", *tsl) == 0, capsys.readouterr().err
    assert _results(tmp_cwd, "shop")["tsl_embedding_file"]
    assert _run(tmp_cwd, "shop", "--model=SASRec", "--method=llmser", "--stage=augment") == 0
    artifact = next((tmp_cwd / "saved" / "shop" / "augment").rglob("artifact.jsonl"))
    assert _run(tmp_cwd, "shop", "--model=SASRec", "--method=llmser", "--stage=train",
                f"--aug_file={artifact}", "--run_name=trained") == 0, capsys.readouterr().err
    assert (tmp_cwd / "saved" / "shop" / "trained" / "results.json").is_file()


def test_own_dataset_user_with_one_interaction_and_pathological_title(tmp_cwd, capsys, log):
    folder = asin_dataset(tmp_cwd / "data", "shop")
    lines = (folder / "shop.item").read_text(encoding="utf-8").splitlines()
    with open(folder / "shop.inter", "a", encoding="utf-8") as f:
        f.write(f"LONELYUSER\t{lines[1].split()[0]}\t5.0\t1400000000\n")
        f.write("ANOTHERUSER\tB0NOTINITEM\t5.0\t1400000000\n")  # an item the .item file lacks
    lines[3] = lines[3].split("\t")[0] + "\tbrandX\tA " + "x" * 20_000 + " title\t1.0"
    (folder / "shop.item").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert _run(tmp_cwd, "shop", "--model=SASRec", "--method=none") == 0, capsys.readouterr().err
    assert "1 users have a single interaction" in log.text
    assert "title values were longer than item_text_max_chars" in log.text
    assert "1 interactions name a user or item missing from the .user / .item file and were dropped" in log.text


# ----- broken files: one line, exit 2, nothing written -------------------------------------------------------
def _edit(path: Path, fn):
    path.write_bytes(fn(path.read_bytes()))


def _replace_line(number, new: bytes):
    def fn(data):
        lines = data.split(b"\n")
        lines[number - 1] = new
        return b"\n".join(lines)
    return fn


BAD = {
    "non-numeric timestamp": ("shop.inter", _replace_line(5, b"AUSER\tB000000001\t5.0\tyesterday"),
                              "shop.inter:5: timestamp 'yesterday' is not a number"),
    "repeated header line": ("shop.inter",
                             _replace_line(7, b"user_id:token\titem_id:token\trating:float\ttimestamp:float"),
                             "shop.inter:7: the header line appears again"),
    "duplicated column": ("shop.inter", _replace_line(1, b"user_id:token\titem_id:token\titem_id:token\ttime:float"),
                          "shop.inter:1: field 'item_id' appears twice"),
    "empty item id": ("shop.inter", _replace_line(4, b"AUSER\t\t5.0\t1400000000"), "shop.inter:4: empty item_id"),
    "tab inside a title": ("shop.item", _replace_line(3, b"B012345678\tbrand\tTwo\tparts\t1.0"),
                           "shop.item:3: 5 values where the header has 4"),
    "unclosed quote in a title": ("shop.item", _replace_line(3, b'B012345678\tbrand\t"Quoted title\t1.0'),
                                  "shop.item:3: a '\"' opens a value"),
    "non-utf-8 in .inter": ("shop.inter", _replace_line(6, b"AUSER\tB0\xff\xfe\t5.0\t1400000000"),
                            "shop.inter:6: byte b'\\xff' at column 9 is not utf-8 text"),
    "non-utf-8 in .item": ("shop.item", _replace_line(2, b"B012345678\tbrand\tCaf\xe9 cup\t1.0"),
                           "shop.item:2: byte b'\\xe9'"),
    "empty .inter": ("shop.inter", lambda data: b"", "shop.inter: the file is empty"),
    "header-only .inter": ("shop.inter", lambda data: data.split(b"\n")[0] + b"\n", "shop.inter: no interactions"),
    "header without types": ("shop.inter", _replace_line(1, b"user_id\titem_id\trating\ttimestamp"),
                             "shop.inter:1: header field 'user_id' is not 'name:type'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_broken_files_give_one_line(case, tmp_cwd, capsys):
    file, edit, needle = BAD[case]
    folder = asin_dataset(tmp_cwd / "data", "shop")
    _edit(folder / file, edit)
    before = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    for method in ("llmser", "none", "tslrec"):
        assert _run(tmp_cwd, "shop", "--model=SASRec", f"--method={method}") == 2, method
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("recbole_llmser: error: "), (method, err)
        assert needle in err[0] and " — " in err[0], err[0]
        assert str(folder) in err[0]
    assert not (tmp_cwd / "saved").exists()  # nothing half-written
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_missing_required_column_named_in_users_yaml(tmp_cwd, capsys):
    asin_dataset(tmp_cwd / "data", "shop")
    yaml_file = tmp_cwd / "shop.yaml"
    yaml_file.write_text("TIME_FIELD: time\nload_col:\n  inter: [user_id, item_id, time]\n")
    assert _run(tmp_cwd, "shop", "--model=SASRec", f"--config_files={yaml_file}", "--method=none") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shop.inter:1: no 'time' column in the header" in err[0]


@pytest.mark.parametrize("content", [b"", b"item_id:token\ttitle:token_seq\n"])
def test_empty_item_file_takes_the_text_free_path(content, tmp_cwd, capsys, log):
    folder = asin_dataset(tmp_cwd / "data", "shop")
    (folder / "shop.item").write_bytes(content)
    assert _run(tmp_cwd, "shop", "--model=SASRec", "--method=llmser") == 0, capsys.readouterr().err
    assert "text-free" in log.text


def test_quotes_that_close_on_their_line_are_fine(tmp_path):
    path = tmp_path / "q.item"
    path.write_text('item_id:token\ttitle:token_seq\ni1\t"Quoted" hat\ni2\tMen 12" boot\n', encoding="utf-8")
    assert check_atomic_file(path, ["item_id", "title"], required=["item_id"]) == 2


def test_dataset_name_is_not_a_path(tmp_cwd, capsys):
    assert main(["--dataset=../x", *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a dataset name, not a path" in err[0]


def test_catalogue_too_small_for_sampled_protocol(tmp_cwd, capsys):
    int_dataset(tmp_cwd / "data", "ints")
    assert _run(tmp_cwd, "ints", "--model=SASRec", "--method=none", "--eval_protocols=[uni100, full]") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval_protocols uni100" in err[0] and "--eval_protocols=" in err[0]
    assert not list((tmp_cwd / "saved").glob("ints/*/results.json"))
