"""recbole_llmser.data.prepare: atomic-file checks, the amazon2018 builder, and its downloads (offline).

Every download here goes to a server on 127.0.0.1 or to a closed local port; an autouse guard makes any
other host lookup fail, so no test can reach the internet.
"""

from __future__ import annotations

import gzip
import http.server
import io
import json
import logging
import socket
import threading
from pathlib import Path

import pandas as pd
import pytest

from recbole_llmser.config import Config
from recbole_llmser.data.prepare import (
    atomic_tsv,
    clean_title,
    filter_interactions,
    order_and_break_ties,
    parse_meta_titles,
    parse_reviews,
    prepare_dataset,
    title_or_fallback,
)
from recbole_llmser.errors import LLMSeRError

NAME = "amazon-fashion"
REVIEWS = "AMAZON_FASHION.json.gz"
META = "meta_AMAZON_FASHION.json.gz"
RAW_PATHS = {"reviews": "categoryFiles/AMAZON_FASHION.json.gz", "meta": "metaFiles2/meta_AMAZON_FASHION.json.gz"}
DAY = 86400
T0 = 1_400_000_000 - 1_400_000_000 % DAY  # a whole day, like unixReviewTime


# ----- offline guard ---------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _local_network_only(monkeypatch):
    real = socket.getaddrinfo

    def guarded(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", b"127.0.0.1", b"localhost"):
            raise socket.gaierror(socket.EAI_NONAME, f"test guard: no network access to {host!r}")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", guarded)
    monkeypatch.setenv("no_proxy", "*")


# ----- pure functions --------------------------------------------------------------------------------------
def test_filter_is_single_pass_not_iterated():
    # min 2/2. Items x, y occur once: u3 and u4 lose one row each and are then dropped (1 row left).
    # That leaves b and c with one interaction each; an iterated filter would now drop b and c, then u1 and u2,
    # and end empty. The paper's single pass keeps u1 and u2 as they are.
    rows = [("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 1), ("u2", "c", 2),
            ("u3", "b", 1), ("u3", "x", 2), ("u4", "c", 1), ("u4", "y", 2)]
    assert filter_interactions(rows, 2, 2) == [("u1", "a", 1), ("u1", "b", 2), ("u2", "a", 1), ("u2", "c", 2)]


def test_filter_counts_users_and_items_on_unfiltered_data():
    # u2 has 3 rows (kept by the user count), but item z is rare: u2 drops to 2 rows -> removed afterwards.
    rows = [("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3), ("u2", "a", 1), ("u2", "b", 2), ("u2", "z", 3),
            ("u3", "a", 1), ("u3", "b", 2), ("u3", "c", 3), ("u4", "c", 1), ("u4", "q", 2)]
    out = filter_interactions(rows, 3, 3)
    assert {r[0] for r in out} == {"u1", "u3"}
    assert out == [r for r in rows if r[0] in ("u1", "u3")]  # row order is kept


def test_order_and_break_ties():
    rows = [("u1", "c", T0 + DAY), ("u2", "x", T0), ("u1", "a", T0), ("u1", "b", T0), ("u2", "y", T0),
            ("u1", "d", T0 + DAY), ("u2", "z", T0 - DAY), ("u1", "e", T0)]
    assert order_and_break_ties(rows) == [
        ("u1", "a", T0), ("u1", "b", T0 + 128), ("u1", "e", T0 + 256),  # ties keep raw-file order
        ("u1", "c", T0 + DAY), ("u1", "d", T0 + DAY + 128),
        ("u2", "z", T0 - DAY), ("u2", "x", T0), ("u2", "y", T0 + 128),  # users in order of first appearance
    ]


def test_tie_shift_never_reorders_close_raw_times():
    out = order_and_break_ties([("u", "a", 1000), ("u", "b", 1000), ("u", "c", 1100)])
    assert [r[1] for r in out] == ["a", "b", "c"]
    assert [r[2] for r in out] == [1000, 1128, 1256]  # strictly increasing even when 128 s overlaps 1100


def test_shifted_times_are_exact_in_float32():
    import numpy as np

    out = order_and_break_ties([("u", str(k), T0) for k in range(40)])
    stamps = np.array([r[2] for r in out], dtype=np.float64)
    assert np.array_equal(stamps.astype(np.float32).astype(np.float64), stamps)
    assert len(set(stamps.astype(np.float32).tolist())) == 40


def test_clean_title_and_fallback():
    assert clean_title("  Tom &amp; Jerry&#39;s\t\n  &quot;Best&quot;\r\nShirt ") == "Tom & Jerry's \"Best\" Shirt"
    assert clean_title("a\x00b\x1fc\u2028d") == "a b c d"
    assert clean_title("&lt;b&gt;") == "<b>"
    for missing in (None, "", "   \t", 123, ["x"], "N/A", " null ", "&#78;A"):
        assert clean_title(missing) == ""
    assert title_or_fallback("B01", None) == "item B01"
    assert title_or_fallback("B01", " \n") == "item B01"
    assert title_or_fallback("B01", "Hat") == "Hat"


def test_parse_reviews_skips_and_counts_bad_lines():
    lines = [
        json.dumps({"reviewerID": "U1", "asin": "A1", "unixReviewTime": T0, "overall": 1.0}).encode(),
        b"{not json",
        json.dumps({"reviewerID": "U1", "asin": "A2"}).encode(),  # no time
        json.dumps({"reviewerID": "U 2", "asin": "A2", "unixReviewTime": T0}).encode(),  # space in id
        json.dumps(["U1", "A1"]).encode(),
        b"",
        b"\xff\xfe\n",  # not UTF-8
        json.dumps({"reviewerID": "U3", "asin": "A3", "unixReviewTime": str(T0)}).encode(),
    ]
    rows, bad = parse_reviews(lines)
    assert rows == [("U1", "A1", T0), ("U3", "A3", T0)]
    assert bad == 5


def test_parse_meta_first_non_empty_title_wins():
    lines = [json.dumps(r) for r in (
        {"asin": "A1", "title": "First"}, {"asin": "A1", "title": "Second"},
        {"asin": "A2"}, {"asin": "A2", "title": "  "}, {"asin": "A2", "title": "Late &amp; real"},
        {"asin": "A3", "title": "unwanted"},
    )] + ["oops"]
    titles, bad = parse_meta_titles(lines, wanted={"A1", "A2"})
    assert titles == {"A1": "First", "A2": "Late & real"}
    assert bad == 1


def test_atomic_tsv_round_trips_through_pandas_python_engine():
    titles = ['"No Makeup" Makeup Kit!', 'He said "hi"', "plain", "'single' & <tags>", '"', 'ends"']
    text = atomic_tsv(("item_id:token", "title:token_seq"), [(f"I{k}", t) for k, t in enumerate(titles)])
    assert text.splitlines()[0] == "item_id:token\ttitle:token_seq"
    df = pd.read_csv(io.StringIO(text), sep="\t", dtype=str, engine="python")
    assert df["title:token_seq"].tolist() == titles


# ----- raw fixture files -----------------------------------------------------------------------------------
A, B, C, D = "B00000000A", "B00000000B", "B00000000C", "B00000000D"
TITLE_A_RAW = '"Quoted" Slim\tFit &amp; Co.\n  Shirt'
TITLE_A = '"Quoted" Slim Fit & Co. Shirt'
TITLE_C = '"Hello" <World>'


def _review(user, item, day):
    return json.dumps({"overall": 5.0, "reviewerID": user, "asin": item, "unixReviewTime": T0 + day * DAY,
                       "reviewTime": "x", "reviewText": "t\tt"})


def raw_bytes():
    """Gzip bytes of a tiny reviews file and metadata file, and the expected result."""
    reviews = [
        _review("U1", B, 0), _review("U1", A, 0), _review("U1", C, 1),  # A and B tie: raw order B, A
        _review("U2", A, 0), _review("U2", B, 1), _review("U2", D, 2),
        "{this is not json",
        _review("U3", D, 5), _review("U3", A, 3), _review("U3", C, 4), _review("U3", "ZZZZZZZZZ1", 6),
        json.dumps({"reviewerID": "U9", "asin": A}),  # no unixReviewTime
        _review("U4", B, 0), _review("U4", C, 0), _review("U4", D, 0),  # three-way tie
        _review("U5", A, 0), _review("U5", "ZZZZZZZZZ2", 1),  # 2 rows: dropped
        _review("U6", B, 0), _review("U6", C, 1), _review("U6", "ZZZZZZZZZ3", 2),  # 3 rows, 2 after: dropped
    ]
    meta = [
        json.dumps({"asin": A, "title": TITLE_A_RAW, "brand": "x"}),
        json.dumps({"asin": A, "title": "a later duplicate"}),
        json.dumps({"asin": B, "brand": "no title"}),
        "not json either",
        json.dumps({"asin": C, "title": "&quot;Hello&quot;   &lt;World&gt; "}),
        json.dumps({"asin": D, "title": ""}),
        json.dumps({"asin": D, "title": "Plain D"}),
        json.dumps({"asin": "ZZZZZZZZZ1", "title": "filtered out"}),
    ]
    return (gzip.compress("\n".join(reviews).encode() + b"\n", mtime=0),  # mtime=0: same bytes on every call
            gzip.compress("\n".join(meta).encode() + b"\n", mtime=0))


EXPECTED_INTER = [
    ("U1", B, T0), ("U1", A, T0 + 128), ("U1", C, T0 + DAY),
    ("U2", A, T0), ("U2", B, T0 + DAY), ("U2", D, T0 + 2 * DAY),
    ("U3", A, T0 + 3 * DAY), ("U3", C, T0 + 4 * DAY), ("U3", D, T0 + 5 * DAY),
    ("U4", B, T0), ("U4", C, T0 + 128), ("U4", D, T0 + 256),
]
EXPECTED_TITLES = {A: TITLE_A, B: f"item {B}", C: TITLE_C, D: "Plain D"}


def write_raw(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    reviews, meta = raw_bytes()
    (folder / REVIEWS).write_bytes(reviews)
    (folder / META).write_bytes(meta)


def make_config(data_path, **extra):
    config_dict = {"data_path": str(data_path), "show_progress": False, "raw_mirrors": []}
    config_dict.update(extra)
    return Config(model="SASRec", dataset=NAME, config_dict=config_dict, cmd_args=[])


def read_tsv(path):
    return pd.read_csv(path, sep="\t", dtype=str, engine="python")


def assert_built(folder: Path):
    inter = read_tsv(folder / f"{NAME}.inter")
    assert list(inter.columns) == ["user_id:token", "item_id:token", "timestamp:float"]
    assert [tuple(r[:2]) + (int(r[2]),) for r in inter.itertuples(index=False)] == EXPECTED_INTER
    item = read_tsv(folder / f"{NAME}.item")
    assert list(item.columns) == ["item_id:token", "title:token_seq"]
    assert dict(zip(item["item_id:token"], item["title:token_seq"])) == EXPECTED_TITLES
    assert [p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix in (".tmp", ".part")] == []


# ----- building ----------------------------------------------------------------------------------------------
def test_build_from_files_in_dataset_folder_then_load_with_recbole(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # RecBole writes log folders into the cwd
    folder = tmp_path / "data" / NAME
    write_raw(folder)
    assert prepare_dataset(make_config(tmp_path / "data")) == folder
    assert_built(folder)
    item_lines = (folder / f"{NAME}.item").read_text(encoding="utf-8").splitlines()
    assert f'{A}\t"""Quoted"" Slim Fit & Co. Shirt"' in item_lines  # CSV-quoted: a leading quote round-trips

    from recbole_llmser.data import create_dataset

    config = make_config(tmp_path / "data", eval_protocols=["full"])  # 4 items: too few for uni100
    dataset = create_dataset(config)  # prepare (a no-op now) + RecBole's loader
    assert dataset.user_num - 1 == 4 and dataset.item_num - 1 == 4 and dataset.inter_num == 12
    tokens = dataset.field2id_token["title"]
    for asin, title in EXPECTED_TITLES.items():
        iid = dataset.token2id(dataset.iid_field, asin)
        words = [tokens[w] for w in dataset.item_feat["title"][iid].tolist() if w != 0]
        assert " ".join(words) == title
    # Times are distinct within every user (ties broken by the +128 s shift), so any sort keeps the order.
    feat = dataset.inter_feat
    assert not feat.duplicated([dataset.uid_field, dataset.time_field]).any()
    u4 = feat[feat[dataset.uid_field] == dataset.token2id(dataset.uid_field, "U4")]
    ordered = u4.sort_values(dataset.time_field, kind="quicksort")[dataset.iid_field].tolist()
    assert list(dataset.id2token(dataset.iid_field, ordered)) == [B, C, D]


def test_build_uses_raw_files_in_parent_folder_and_is_not_rebuilt(tmp_path, caplog):
    write_raw(tmp_path)  # the user's data_path, not the dataset folder
    caplog.set_level(logging.INFO)
    folder = prepare_dataset(make_config(tmp_path))
    assert folder == tmp_path / NAME
    assert_built(folder)
    assert not (folder / REVIEWS).exists()
    log = caplog.text
    assert "skipped 2 malformed lines" in log and "skipped 1 malformed metadata lines" in log
    assert "4 users, 4 items, 12 interactions" in log and "1 items have no title" in log

    inter = folder / f"{NAME}.inter"
    before = inter.stat().st_mtime_ns
    (tmp_path / REVIEWS).unlink()  # not needed any more: the .inter exists
    prepare_dataset(make_config(tmp_path))
    assert inter.stat().st_mtime_ns == before


def test_truncated_local_raw_file_is_a_clear_error(tmp_path):
    write_raw(tmp_path / NAME)
    data = (tmp_path / NAME / REVIEWS).read_bytes()
    (tmp_path / NAME / REVIEWS).write_bytes(data[: len(data) // 2])
    with pytest.raises(LLMSeRError) as err:
        prepare_dataset(make_config(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / NAME / REVIEWS) in msg and "gzip" in msg
    assert not (tmp_path / NAME / f"{NAME}.inter").exists() and not (tmp_path / NAME / f"{NAME}.item").exists()


# ----- downloads ---------------------------------------------------------------------------------------------
class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    requests: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.requests.append(self.path)
        mode, _, rest = self.path.lstrip("/").partition("/")
        body = self.files.get(rest)
        if mode == "missing" or body is None:
            self.send_error(404)
            return
        if mode == "html":
            body = b"<html>maintenance</html>"
        self.send_response(200)
        if mode != "nolen":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode in ("drop", "nolen"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture()
def server():
    reviews, meta = raw_bytes()
    handler = type("Handler", (_Handler,), {"files": {RAW_PATHS["reviews"]: reviews, RAW_PATHS["meta"]: meta},
                                            "requests": []})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield base, handler.requests
    httpd.shutdown()
    httpd.server_close()


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.mark.parametrize("first", ["missing", "closed"])
def test_download_falls_back_to_the_second_mirror(tmp_path, server, first, caplog):
    base, requests = server
    first_url = f"{base}/missing/" if first == "missing" else closed_port_url()
    caplog.set_level(logging.INFO)
    folder = prepare_dataset(make_config(tmp_path, raw_mirrors=[first_url, f"{base}/good/"], download_timeout=5))
    assert_built(folder)
    assert (folder / REVIEWS).read_bytes() == raw_bytes()[0] and (folder / META).read_bytes() == raw_bytes()[1]
    good = [p for p in requests if p.startswith("/good/")]
    assert good == [f"/good/{RAW_PATHS['reviews']}", f"/good/{RAW_PATHS['meta']}"]
    failures = [r for r in caplog.records if r.levelno == logging.WARNING and "download failed" in r.getMessage()]
    # A 404 is per file; an unreachable mirror is skipped for the remaining files.
    assert len(failures) == (2 if first == "missing" else 1)


def test_every_mirror_failing_is_one_clear_line_and_leaves_nothing(tmp_path, server):
    base, _ = server
    mirrors = [closed_port_url(), f"{base}/missing/", f"{base}/html/", closed_port_url()]
    with pytest.raises(LLMSeRError) as err:
        prepare_dataset(make_config(tmp_path, raw_mirrors=mirrors, download_timeout=2))
    msg = str(err.value)
    folder = tmp_path / NAME
    assert "\n" not in msg
    for part in (str(folder), REVIEWS, META, f"{NAME}.inter", f"{NAME}.item", "raw_mirrors"):
        assert part in msg
    assert not folder.exists()  # created for the download, removed again since it stayed empty


def test_folders_made_for_the_download_are_removed_again(tmp_path):
    data_path = tmp_path / "new" / "deeper"
    with pytest.raises(LLMSeRError, match="unreachable"):
        prepare_dataset(make_config(data_path, raw_mirrors=[closed_port_url()]))
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_is_left_empty_when_all_mirrors_fail(tmp_path):
    folder = tmp_path / NAME
    folder.mkdir()
    with pytest.raises(LLMSeRError, match="unreachable"):
        prepare_dataset(make_config(tmp_path, raw_mirrors=[closed_port_url(), closed_port_url()]))
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("mode", ["drop", "nolen"])
def test_connection_dropped_mid_body_leaves_no_partial_file(tmp_path, server, mode):
    base, requests = server
    with pytest.raises(LLMSeRError) as err:
        prepare_dataset(make_config(tmp_path, raw_mirrors=[f"{base}/{mode}/"], download_timeout=5))
    assert REVIEWS in str(err.value)
    assert {"drop": "IncompleteDownload: got", "nolen": "EOFError"}[mode] in str(err.value)  # how it was caught
    assert requests  # the server was reached and sent half of each file
    assert not (tmp_path / NAME).exists() or list((tmp_path / NAME).iterdir()) == []


def test_hanging_mirror_is_bounded_by_download_timeout(tmp_path, server):
    import time

    base, _ = server
    with socket.socket() as hang:  # accepts connections (backlog) but never answers
        hang.bind(("127.0.0.1", 0))
        hang.listen(8)
        start = time.monotonic()
        folder = prepare_dataset(make_config(
            tmp_path, raw_mirrors=[f"http://127.0.0.1:{hang.getsockname()[1]}/", f"{base}/good/"],
            download_timeout=0.5,
        ))
        elapsed = time.monotonic() - start
    assert_built(folder)
    assert elapsed < 5  # one 0.5 s timeout, then the mirror is skipped for the second file


# ----- errors without a builder ----------------------------------------------------------------------------
def test_unknown_dataset_without_files_is_one_line(tmp_path):
    config = Config(model="SASRec", dataset="no-such-data", config_dict={"data_path": str(tmp_path)}, cmd_args=[])
    with pytest.raises(LLMSeRError) as err:
        prepare_dataset(config)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / "no-such-data" / "no-such-data.inter") in msg and "--data_path" in msg
    assert not (tmp_path / "no-such-data").exists()


def _atomic_dataset(tmp_path, name, item_header=None):
    folder = tmp_path / name
    folder.mkdir()
    (folder / f"{name}.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\n")
    if item_header is not None:
        (folder / f"{name}.item").write_text(item_header + "\ni\tx\n")
    return folder


def test_existing_atomic_files_pass_when_the_text_field_is_there(tmp_path):
    folder = _atomic_dataset(tmp_path, "mine", "item_id:token\ttitle:token_seq\tbrand:token")
    config = Config(model="SASRec", dataset="mine",
                    config_dict={"data_path": str(tmp_path), "item_text_field": "title"}, cmd_args=[])
    assert prepare_dataset(config) == folder
    config = Config(model="SASRec", dataset="mine", config_dict={"data_path": str(tmp_path)}, cmd_args=[])
    assert prepare_dataset(config) == folder  # item_text_field ~: no check


def test_missing_text_field_names_the_field(tmp_path):
    _atomic_dataset(tmp_path, "mine", "item_id:token\tbrand:token")
    config = Config(model="SASRec", dataset="mine",
                    config_dict={"data_path": str(tmp_path), "item_text_field": "title"}, cmd_args=[])
    with pytest.raises(LLMSeRError) as err:
        prepare_dataset(config)
    msg = str(err.value)
    assert "\n" not in msg and "'title'" in msg and "item_id, brand" in msg and "--item_text_field" in msg
    assert str(tmp_path / "mine" / "mine.item") in msg


def test_missing_item_file_names_the_field_and_file(tmp_path):
    _atomic_dataset(tmp_path, "mine")
    config = Config(model="SASRec", dataset="mine",
                    config_dict={"data_path": str(tmp_path), "item_text_field": "title"}, cmd_args=[])
    with pytest.raises(LLMSeRError) as err:
        prepare_dataset(config)
    assert "'title'" in str(err.value) and str(tmp_path / "mine" / "mine.item") in str(err.value)
