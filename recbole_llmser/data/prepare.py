"""Make sure a dataset's RecBole atomic files exist before RecBole loads them.

:func:`prepare_dataset` is called by :func:`recbole_llmser.data.create_dataset` first:

1. ``<data_path>/<name>.inter`` exists: use the atomic files as they are.
2. Otherwise, when the dataset's yaml names a ``dataset_builder`` (``amazon2018``), build them from the raw files,
   downloading the raw files from ``raw_mirrors`` when they are not on disk.
3. Otherwise: a one-line :class:`LLMSeRError` that says where the atomic files belong.

In every case the ``item_text_field`` must be a column of ``<name>.item``, and the files RecBole will load pass
:func:`~recbole_llmser.data.atomic.check_dataset_files` (one line naming the file and line otherwise).

The ``amazon2018`` builder is the LLMSeR paper's Amazon 2018 preprocessing (Fashion): implicit feedback from every
review, one single-pass user/item count filter followed by a user-length filter, chronological order per user,
and item titles from the metadata. The pure steps (:func:`parse_reviews`, :func:`parse_meta_titles`,
:func:`filter_interactions`, :func:`order_and_break_ties`, :func:`clean_title`, :func:`title_or_fallback`,
:func:`atomic_tsv`) are separate from the thin I/O around them.

Nothing half-written is ever left behind: downloads stream into a temp file in the target folder that is
renamed into place only once complete and verified; the atomic files are written through a temp file and a
rename, the ``.item`` file first and the ``.inter`` file last (its presence means "done").
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import html
import http.client
import io
import json
import logging
import os
import re
import socket
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from recbole_llmser.data.atomic import check_dataset_files, read_header
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.utils import atomic_write_text

#: Raw file roles of the ``amazon2018`` builder (keys of ``raw_files`` and ``raw_paths``).
RAW_ROLES = ("reviews", "meta")

#: Atomic-file headers written by the ``amazon2018`` builder.
INTER_HEADER = ("user_id:token", "item_id:token", "timestamp:float")
ITEM_HEADER = ("item_id:token", "title:token_seq")

#: Seconds added per tied timestamp: float32's spacing at Unix times of 2^30..2^31 s (2004-2038), so every
#: shifted value stays exactly representable in RecBole's float32 tensors.
TIE_STEP = 128

DEFAULT_DOWNLOAD_TIMEOUT = 30.0
CHUNK_BYTES = 1 << 20
USER_AGENT = "recbole_llmser (python urllib)"

#: Strings that pandas.read_csv (RecBole's reader) turns into NaN, i.e. an empty title.
PANDAS_NA_STRINGS = frozenset(
    "#N/A|#N/A N/A|#NA|-1.#IND|-1.#QNAN|-NaN|-nan|1.#IND|1.#QNAN|<NA>|N/A|NA|NULL|NaN|None|n/a|nan|null".split("|")
)

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NOT_IN_TOKEN = re.compile(r'[\s"\x00-\x1f\x7f-\x9f]')

#: What one failed download attempt may raise (all mean: try the next mirror).
DOWNLOAD_ERRORS = (OSError, http.client.HTTPException, EOFError, zlib.error, ValueError)


def _log():
    return logging.getLogger()


def _cfg(config, key, default=None):
    """``config[key]``, or ``default`` when missing/None (works for our Config and for plain dicts)."""
    try:
        value = config[key]
    except (KeyError, TypeError):
        value = None
    return default if value is None else value


def _one_line(err) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, LLMSeRError) else f"{type(err).__name__}: {text}"


# ===== entry point =========================================================================================
def prepare_dataset(config) -> Path:
    """Make sure ``<data_path>/<dataset>.inter`` exists (building it if the dataset has a builder).

    Returns the dataset folder. Raises :class:`LLMSeRError` (one line) for anything the user can fix.
    """
    name = str(config["dataset"])
    folder = Path(os.path.abspath(str(config["data_path"])))
    inter = folder / f"{name}.inter"
    if inter.is_file():
        _log().info(f"dataset '{name}': using the atomic files in {folder}")
    else:
        builder = _cfg(config, "dataset_builder")
        if builder is None:
            raise LLMSeRError(
                f"dataset '{name}': no atomic file {inter} and no builder in properties/dataset/{name}.yaml; "
                f"put RecBole atomic files ({name}.inter, optional {name}.item) in {folder} "
                f"or pass --data_path=<folder that contains {name}/>"
            )
        build = BUILDERS.get(builder)
        if build is None:
            raise LLMSeRError(
                f"dataset '{name}': dataset_builder '{builder}' is unknown (known: {', '.join(sorted(BUILDERS))}); "
                f"fix properties/dataset/{name}.yaml"
            )
        _log().info(f"dataset '{name}': {inter} not found; building it with the '{builder}' builder")
        build(config, folder, name)
    check_item_text_field(config, folder, name)
    check_dataset_files(config, folder, name)
    note = getattr(config, "fields_note", None)
    if note:
        _log().info(f"dataset '{name}': {note}")
    return folder


def item_file_fields(path, separator: str = "\t", encoding: str = "utf-8") -> list:
    """Field names in the header line (``field:type`` separated by ``separator``) of an atomic file."""
    return [name for name, _ in read_header(path, separator, encoding) or []]


def check_item_text_field(config, folder, name) -> None:
    """If ``item_text_field`` is set, it must be a field in the header of ``<folder>/<name>.item``."""
    field = config["item_text_field"]
    if not field:
        return
    item = Path(folder) / f"{name}.item"
    if not item.is_file():
        raise LLMSeRError(
            f"dataset '{name}': item text field '{field}' (item_text_field) needs {item}, which does not exist; "
            f"add that file or set --item_text_field=~"
        )
    fields = item_file_fields(item, _cfg(config, "field_separator", "\t"), _cfg(config, "encoding", "utf-8"))
    if field not in fields:
        raise LLMSeRError(
            f"dataset '{name}': item text field '{field}' (item_text_field) is not in {item} "
            f"(fields: {', '.join(fields) or 'none'}); set --item_text_field=<field> or --item_text_field=~"
        )


# ===== pure steps ==========================================================================================
def _is_token(value) -> bool:
    """A usable RecBole token id: a non-empty string without whitespace or quotes that pandas reads as itself."""
    return (
        isinstance(value, str)
        and value != ""
        and value not in PANDAS_NA_STRINGS
        and _NOT_IN_TOKEN.search(value) is None
    )


def _as_time(value):
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def parse_reviews(lines):
    """Parse review JSON lines into ``(rows, n_bad)``.

    ``rows`` are ``(reviewerID, asin, unixReviewTime)`` tuples in file order (every rating kept: implicit
    feedback). Lines that are not valid JSON, or lack a usable ``reviewerID``, ``asin`` or integer
    ``unixReviewTime``, are skipped and counted in ``n_bad``. Blank lines are ignored.
    """
    rows, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            bad += 1
            continue
        if not isinstance(rec, dict):
            bad += 1
            continue
        user, item, stamp = rec.get("reviewerID"), rec.get("asin"), _as_time(rec.get("unixReviewTime"))
        if not (_is_token(user) and _is_token(item)) or stamp is None:
            bad += 1
            continue
        rows.append((user, item, stamp))
    return rows, bad


def clean_title(text) -> str:
    """HTML-unescape, then collapse all whitespace (tabs, newlines, control characters) to single spaces.

    Returns ``""`` for a missing title, a non-string, or a title that RecBole's pandas reader would read back as
    missing (``N/A``, ``null``, ...).
    """
    if not isinstance(text, str):
        return ""
    text = html.unescape(text)
    text = " ".join(_CONTROL.sub(" ", text).split())
    return "" if text in PANDAS_NA_STRINGS else text


def title_or_fallback(asin: str, text) -> str:
    """The cleaned title, or ``item <asin>`` when there is none."""
    return clean_title(text) or f"item {asin}"


def parse_meta_titles(lines, wanted=None):
    """Parse metadata JSON lines into ``(titles, n_bad)``: ``asin`` -> cleaned title.

    The first non-empty title seen for an asin wins (the metadata repeats some asins). Records without a title
    are not an error. Only asins in ``wanted`` are kept when it is given. Lines that are not valid JSON or have
    no usable ``asin`` are counted in ``n_bad``.
    """
    titles, bad = {}, 0
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1
            continue
        asin = rec.get("asin") if isinstance(rec, dict) else None
        if not _is_token(asin):
            bad += 1
            continue
        if asin in titles or (wanted is not None and asin not in wanted):
            continue
        title = clean_title(rec.get("title"))
        if title:
            titles[asin] = title
    return titles, bad


def filter_interactions(rows, min_user: int, min_item: int) -> list:
    """The paper's filter, in row order.

    One single pass drops the interactions of users with fewer than ``min_user`` and of items with fewer than
    ``min_item`` interactions, both counted on ``rows`` at once; then users left with fewer than ``min_user``
    interactions are dropped. Not iterated to a fixed point, so an item may end with fewer than ``min_item``.
    ``rows`` are ``(user, item, ...)`` tuples.
    """
    users = Counter(r[0] for r in rows)
    items = Counter(r[1] for r in rows)
    kept = [r for r in rows if users[r[0]] >= min_user and items[r[1]] >= min_item]
    remaining = Counter(r[0] for r in kept)
    return [r for r in kept if remaining[r[0]] >= min_user]


def order_and_break_ties(rows, step: int = TIE_STEP) -> list:
    """Group ``(user, item, time)`` rows per user (users in order of first appearance), chronological.

    Within a user: a stable sort by time (ties keep row order); the k-th row (k = 0, 1, ...) among those that
    share one raw time gets ``time + step * k``, so any later sort, stable or not, keeps this order. Should a
    shifted time reach the next raw time, it is moved to ``previous + step`` so times stay strictly increasing
    (never happens with whole-day Amazon timestamps).
    """
    per_user = {}
    for user, item, stamp in rows:
        per_user.setdefault(user, []).append((item, stamp))
    out = []
    for user, seq in per_user.items():
        seq.sort(key=lambda pair: pair[1])
        prev_raw = prev_out = None
        k = 0
        for item, stamp in seq:
            k = k + 1 if stamp == prev_raw else 0
            shifted = stamp + step * k
            if prev_out is not None and shifted <= prev_out:
                shifted = prev_out + step
            out.append((user, item, shifted))
            prev_raw, prev_out = stamp, shifted
    return out


def atomic_tsv(header, rows) -> str:
    """Tab-separated text for an atomic file: ``csv`` with QUOTE_MINIMAL, so RecBole's pandas reader
    (``read_csv(engine="python", sep="\\t")``) reads every field back exactly, quotes included."""
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


# ===== raw files: find or download =========================================================================
def _raw_mapping(config, key, name) -> dict:
    value = _cfg(config, key)
    ok = isinstance(value, dict) and all(isinstance(value.get(r), str) and value.get(r) for r in RAW_ROLES)
    if not ok:
        raise LLMSeRError(
            f"dataset '{name}': property '{key}' = {value!r}: expected a mapping with keys "
            f"{' and '.join(RAW_ROLES)} (file names); fix properties/dataset/{name}.yaml"
        )
    return value


def _mirrors(config, name) -> list:
    value = _cfg(config, "raw_mirrors", [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(m, str) and m for m in value):
        raise LLMSeRError(
            f"dataset '{name}': property 'raw_mirrors' = {value!r}: expected a list of base URLs; "
            f"fix properties/dataset/{name}.yaml"
        )
    return list(value)


def mirror_url(mirror: str, path: str) -> str:
    return mirror.rstrip("/") + "/" + path.lstrip("/")


class IncompleteDownload(OSError):
    """The server closed the connection before sending Content-Length bytes."""


def _content_length(response):
    value = response.headers.get("Content-Length") if response.headers else None
    return int(value) if value and value.strip().isdigit() else None


def _verify_gzip(path) -> None:
    """Read the whole gzip stream; raises EOFError/BadGzipFile/zlib.error on a truncated or non-gzip file."""
    with gzip.open(path, "rb") as f:
        while f.read(CHUNK_BYTES):
            pass


def download(url: str, dest, timeout: float, show_progress: bool = True) -> int:
    """Stream ``url`` into ``dest`` through a temp file in the same folder; returns the size in bytes.

    ``timeout`` bounds every connect and read. The temp file is renamed to ``dest`` only when the body is
    complete (Content-Length matched, when given) and is a complete gzip stream; it is deleted on any failure.
    """
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                length = _content_length(response)
                got = 0
                with tqdm(
                    total=length, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                    disable=not show_progress,
                ) as bar:
                    while True:
                        chunk = response.read(CHUNK_BYTES)
                        if not chunk:
                            break
                        out.write(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
            if length is not None and got != length:
                raise IncompleteDownload(f"got {got} of {length} bytes")
            out.flush()
            os.fsync(out.fileno())
        _verify_gzip(tmp)
        os.replace(tmp, dest)
        return got
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _unreachable(err) -> bool:
    """A connection-level failure (DNS, refused, timeout): skip this mirror for the remaining files."""
    if isinstance(err, urllib.error.HTTPError):
        return False
    return isinstance(err, (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError))


def find_or_download_raw(config, folder: Path, name: str) -> dict:
    """Paths of the raw files (role -> Path): in ``folder``, else in its parent, else downloaded into ``folder``."""
    files = _raw_mapping(config, "raw_files", name)
    found, missing = {}, []
    for role in RAW_ROLES:
        for candidate in (folder / files[role], folder.parent / files[role]):
            if candidate.is_file():
                found[role] = candidate
                _log().info(f"dataset '{name}': raw {role} file {candidate}")
                break
        else:
            missing.append(role)
    if missing:
        found.update(_download_missing(config, folder, name, files, missing))
    return found


def _download_missing(config, folder: Path, name: str, files: dict, missing: list) -> dict:
    paths = _raw_mapping(config, "raw_paths", name)
    mirrors = _mirrors(config, name)
    timeout = float(_cfg(config, "download_timeout", DEFAULT_DOWNLOAD_TIMEOUT))
    show = bool(_cfg(config, "show_progress", True))
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LLMSeRError(
            f"dataset '{name}': cannot create {folder} for the raw downloads ({_one_line(err)}); "
            f"pass --data_path=<writable folder>"
        ) from None
    got, failed, dead, last = {}, [], set(), None
    for role in missing:
        dest = folder / files[role]
        for mirror in mirrors:
            if mirror in dead:
                continue
            url = mirror_url(mirror, paths[role])
            _log().info(f"dataset '{name}': downloading {url} -> {dest} (timeout {timeout:g} s)")
            start = time.monotonic()
            try:
                size = download(url, dest, timeout, show)
            except DOWNLOAD_ERRORS as err:
                if isinstance(err, urllib.error.HTTPError):
                    err.close()
                last = f"{url}: {_one_line(err)}"
                _log().warning(f"dataset '{name}': download failed after {time.monotonic() - start:.1f} s: {last}")
                if _unreachable(err):
                    dead.add(mirror)
                continue
            _log().info(f"dataset '{name}': saved {dest} ({size:,} bytes)")
            got[role] = dest
            break
        else:
            failed.append(files[role])
    if failed:
        for path in created:  # the folders made above, if still empty
            try:
                path.rmdir()
            except OSError:
                break
        why = f"last error: {last}" if last else "raw_mirrors is empty"
        raise LLMSeRError(
            f"dataset '{name}': raw files {', '.join(failed)} are missing and every mirror in raw_mirrors failed "
            f"or was unreachable ({why}); put them in {folder}, or put the atomic files {name}.inter and "
            f"{name}.item there"
        )
    return got


def _read_gz(path, parse, **kwargs):
    try:
        with gzip.open(path, "rb") as f:
            return parse(f, **kwargs)
    except (OSError, EOFError, zlib.error) as err:
        raise LLMSeRError(
            f"{path}: not a complete gzip file ({_one_line(err)}); delete it to download it again, or replace it"
        ) from None


def _min_count(config, key, name) -> int:
    value = _cfg(config, key, 1)
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise LLMSeRError(f"dataset '{name}': property '{key}' = {value!r}: expected an integer >= 1")
    return value


# ===== builders ============================================================================================
def build_amazon2018(config, folder: Path, name: str) -> None:
    """Build ``<name>.item`` and ``<name>.inter`` in ``folder`` from Amazon 2018 review and metadata files."""
    log = _log()
    start = time.monotonic()
    min_user = _min_count(config, "min_user_inter", name)
    min_item = _min_count(config, "min_item_inter", name)
    raw = find_or_download_raw(config, folder, name)

    rows, bad = _read_gz(raw["reviews"], parse_reviews)
    log.info(
        f"dataset '{name}': {len(rows):,} raw interactions, {len({r[0] for r in rows}):,} users, "
        f"{len({r[1] for r in rows}):,} items from {raw['reviews']}"
        + (f"; skipped {bad:,} malformed lines (bad JSON or no reviewerID/asin/unixReviewTime)" if bad else "")
    )
    if not rows:
        raise LLMSeRError(
            f"{raw['reviews']}: no review lines with reviewerID, asin and unixReviewTime; replace the file"
        )
    kept = order_and_break_ties(filter_interactions(rows, min_user, min_item))
    users = len({r[0] for r in kept})
    items = list(dict.fromkeys(r[1] for r in kept))
    log.info(
        f"dataset '{name}': after filtering (users >= {min_user}, items >= {min_item} in one pass, then users "
        f">= {min_user}): {users:,} users, {len(items):,} items, {len(kept):,} interactions"
    )
    if not kept:
        raise LLMSeRError(
            f"dataset '{name}': no interactions left after filtering with min_user_inter={min_user} and "
            f"min_item_inter={min_item}; lower them or use a larger raw file"
        )
    _warn_float32(kept, name)

    titles, bad_meta = _read_gz(raw["meta"], parse_meta_titles, wanted=set(items))
    item_rows = [(asin, title_or_fallback(asin, titles.get(asin))) for asin in items]
    fallback = sum(1 for asin in items if asin not in titles)
    log.info(
        f"dataset '{name}': titles for {len(items) - fallback:,} of {len(items):,} items from {raw['meta']}; "
        f"{fallback:,} items have no title and use 'item <asin>'"
        + (f"; skipped {bad_meta:,} malformed metadata lines" if bad_meta else "")
    )

    item_path, inter_path = folder / f"{name}.item", folder / f"{name}.inter"
    try:
        atomic_write_text(item_path, atomic_tsv(ITEM_HEADER, item_rows))
        atomic_write_text(inter_path, atomic_tsv(INTER_HEADER, kept))  # last: its presence means "done"
    except OSError as err:
        raise LLMSeRError(
            f"dataset '{name}': cannot write {inter_path} ({_one_line(err)}); make {folder} writable "
            f"or pass --data_path=<writable folder>"
        ) from None
    log.info(f"dataset '{name}': wrote {item_path} and {inter_path} in {time.monotonic() - start:.1f} s")


def _warn_float32(rows, name) -> None:
    import numpy as np

    stamps = np.array([r[2] for r in rows], dtype=np.float64)
    inexact = int(np.count_nonzero(stamps.astype(np.float32).astype(np.float64) != stamps))
    if inexact:
        _log().warning(
            f"dataset '{name}': {inexact:,} timestamps are not exactly representable in float32; RecBole may "
            "round them and reorder interactions that are less than 128 s apart"
        )


#: dataset_builder name -> function(config, folder, name).
BUILDERS = {"amazon2018": build_amazon2018}
