"""A dataset's RecBole atomic files, read before RecBole reads them.

Two jobs, so that any RecBole atomic dataset runs without a yaml and no broken file ends in a traceback:

* **Field detection** (:func:`detect_fields`, pure): from the headers of ``<name>.inter`` and ``<name>.item``, the
  user, item and time fields, ``load_col`` and the item text field, for every one of these settings the user (or
  the dataset's property file) did not set. No float time column: interactions keep their order in the file
  (:data:`FILE_ORDER_FIELD`, filled in by :class:`~recbole_llmser.data.dataset.SequentialDataset`). No ``.item``,
  an empty one or no text field in it: the text-free path.
* **Validation** (:func:`check_atomic_file`): one streamed pass over each file RecBole will load, with the same
  CSV rules as RecBole's reader (pandas' python engine: tab-separated, ``"`` quotes), that stops at the first
  problem with one line ``<file>:<line>: <what> — <what to do>`` (:class:`~recbole_llmser.errors.LLMSeRError`).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from recbole_llmser.errors import LLMSeRError

#: RecBole 1.2.1's feature types (recbole/utils/enum_type.py FeatureType).
FEATURE_TYPES = ("token", "token_seq", "float", "float_seq")

#: Usual names, most likely first (compared case-insensitively). A field not named so is still found by its type.
USER_NAMES = ("user_id", "userid", "user", "uid", "reviewerid", "customer_id", "visitor_id", "session_id")
ITEM_NAMES = ("item_id", "itemid", "item", "iid", "asin", "parent_asin", "product_id", "movie_id", "book_id",
              "business_id", "track_id", "article_id", "venue_id")
TIME_NAMES = ("timestamp", "time", "unixreviewtime", "datetime", "date", "ts", "event_time", "created_at")
TEXT_NAMES = ("title", "name", "movie_title", "item_name", "product_name", "book_title", "track_name", "text",
              "description")

#: TIME_FIELD of a dataset without a time column: each interaction's position in ``<name>.inter``.
FILE_ORDER_FIELD = "file_order"

#: The settings :func:`detect_fields` may fill in.
DETECTED_KEYS = ("USER_ID_FIELD", "ITEM_ID_FIELD", "TIME_FIELD", "load_col", "item_text_field")


# ----- headers ----------------------------------------------------------------------------------------------
def parse_header(line: str, path, separator: str = "\t") -> list:
    """``[(field, type), ...]`` of an atomic file's header line; a one-line error for a malformed header."""
    fields = []
    for part in line.rstrip("\r\n").split(separator):
        name, colon, ftype = part.partition(":")
        if not colon or not name:
            raise LLMSeRError(f"{path}:1: header field {part!r} is not 'name:type' — write each header field as "
                              f"name:type with type one of {', '.join(FEATURE_TYPES)} (RecBole atomic files)")
        if ftype not in FEATURE_TYPES:
            raise LLMSeRError(f"{path}:1: header field {part!r} has type {ftype!r} — use one of "
                              f"{', '.join(FEATURE_TYPES)}")
        if name in (f for f, _ in fields):
            raise LLMSeRError(f"{path}:1: field '{name}' appears twice in the header — rename or remove one column")
        fields.append((name, ftype))
    return fields


def read_header(path, separator: str = "\t", encoding: str = "utf-8", need_record: bool = False):
    """The parsed header of ``path`` (see :func:`parse_header`), or None for an empty file (``need_record``: also
    for a file with nothing under its header)."""
    with open(path, "rb") as f:
        raw = f.readline()
        if need_record and not any(line.strip() for line in f):
            return None
    if not raw.strip():
        return None
    try:
        line = raw.decode(encoding)
    except UnicodeDecodeError:
        raise LLMSeRError(f"{path}:1: the header is not {encoding} text — re-save the file as {encoding} or set "
                          "--encoding=<its encoding>") from None
    return parse_header(line.lstrip("\ufeff"), path, separator)


# ----- detection (pure) -------------------------------------------------------------------------------------
def _by_name(fields, names, types, exclude=(), any_name=True):
    """The first of ``fields`` (``[(name, type)]``) of one of ``types`` whose name is in ``names`` (in the order of
    ``names``, case-insensitively), else (``any_name``) the first of those types in file order, else None."""
    usable = [name for name, ftype in fields if ftype in types and name not in exclude]
    lower = {name.lower(): name for name in reversed(usable)}
    for wanted in names:
        if wanted in lower:
            return lower[wanted]
    return usable[0] if usable and any_name else None


def detect_fields(inter_fields, item_fields, preset: dict, inter_path="<name>.inter", item_path="<name>.item"):
    """The dataset settings (:data:`DETECTED_KEYS`) for ``preset`` (the ones already set; they win) from the
    headers of the ``.inter`` file (``inter_fields``) and the ``.item`` file (``item_fields``: None when there is
    no such file or it is empty).

    Returns ``(settings, notes)``: ``settings`` holds only keys missing from ``preset``; ``notes`` are short
    phrases for the log (what was chosen and why). Raises a one-line error when the ``.inter`` file has no
    usable user or item field.
    """
    settings, notes = {}, []
    token_fields = [name for name, ftype in inter_fields if ftype == "token"]

    def pick(key, names, types, what, exclude=()):
        if key in preset:
            return preset[key]
        name = _by_name(inter_fields, names, types, exclude)
        if name is None:
            raise LLMSeRError(
                f"{inter_path}:1: no {what} field of type token in the header "
                f"({', '.join(f'{n}:{t}' for n, t in inter_fields)}) — the .inter file needs a user and an item "
                "column written as <field>:token (ids of any kind)")
        settings[key] = name
        return name

    user = pick("USER_ID_FIELD", USER_NAMES, ("token",), "user")
    item = pick("ITEM_ID_FIELD", ITEM_NAMES, ("token",), "item", exclude=(user,))
    if user == item and len(token_fields) < 2:
        raise LLMSeRError(f"{inter_path}:1: one token field ({user}) for both user and item — the .inter file needs "
                          "a user column and an item column")
    if "TIME_FIELD" in preset:
        time = preset["TIME_FIELD"]
    else:
        time = _by_name(inter_fields, TIME_NAMES, ("float",), any_name=False)
        if time is None:
            time = next((n for n, t in inter_fields if t == "float" and ("time" in n.lower() or "date" in n.lower())),
                        None)
        if time is None:
            time = FILE_ORDER_FIELD
            notes.append("no float time column: each user's interactions keep their order in the file")
        settings["TIME_FIELD"] = time

    if "item_text_field" in preset:
        text = preset["item_text_field"]
    else:
        text = None
        if item_fields is None:
            notes.append(f"no item text ({item_path} is missing or empty): the text-free path (backend model)")
        elif item not in (n for n, _ in item_fields):
            raise LLMSeRError(f"{item_path}:1: no '{item}' field (the item id field of the .inter file) in the "
                              f"header ({', '.join(n for n, _ in item_fields)}) — name the .item file's id column "
                              f"{item}:token")
        else:
            loadable = item_fields
            load_col = preset.get("load_col")
            if isinstance(load_col, dict):  # a load_col that was set: only the item fields it loads
                loadable = [(n, t) for n, t in item_fields if n in (load_col.get("item") or ())]
            text = _by_name(loadable, TEXT_NAMES, ("token_seq", "token"), exclude=(item,), any_name=False)
            if text is None:
                notes.append(f"no item text field in {item_path} (looked for {', '.join(TEXT_NAMES)}; set "
                             "item_text_field to use another): the text-free path (backend model)")
        settings["item_text_field"] = text

    if "load_col" not in preset:
        inter_cols = [user, item] + ([time] if time and time != FILE_ORDER_FIELD else [])
        settings["load_col"] = {"inter": inter_cols, **({"item": [item, text]} if text else {})}
    return settings, notes


def describe_fields(config, notes) -> str:
    """One log line: the fields, ``load_col`` and text field a dataset is read with, and the detection notes."""
    line = (f"user {config['USER_ID_FIELD']}, item {config['ITEM_ID_FIELD']}, time {config['TIME_FIELD']}, "
            f"item text {config['item_text_field'] or '~'}, load_col {config['load_col']}")
    return line + "".join(f"; {note}" for note in notes)


# ----- validation -------------------------------------------------------------------------------------------
class _Lines:
    """Decoded lines of a file read in binary, with the number of the line last read (for error messages)."""

    def __init__(self, f, path, encoding):
        self.f, self.path, self.encoding, self.number = f, path, encoding, 0

    def __iter__(self):
        for raw in self.f:
            self.number += 1
            try:
                yield raw.decode(self.encoding)
            except UnicodeDecodeError as err:
                raise LLMSeRError(
                    f"{self.path}:{self.number}: byte {raw[err.start:err.start + 1]!r} at column {err.start + 1} is "
                    f"not {self.encoding} text — re-save the file as {self.encoding} or set --encoding=<its "
                    "encoding>") from None


def check_atomic_file(path, load_fields, separator: str = "\t", encoding: str = "utf-8",
                      required=(), numeric=()) -> int:
    """Stream ``path`` once as RecBole's reader will and return its number of records.

    ``load_fields`` are the fields RecBole will load (each must be in the header); ``required`` the ones that may
    not be empty (ids, time); ``numeric`` the float ones that must parse as finite numbers. Raises a one-line
    :class:`LLMSeRError` naming the file and line for: a header that is malformed or lacks a loaded field, bytes
    that are not ``encoding`` text, a repeated header line, a row with more fields than the header (a tab inside a
    value), a quote that opens a value running past its line, a missing or empty required value, a value of a
    float field that is not a number.
    """
    with open(path, "rb") as f:
        lines = _Lines(f, path, encoding)
        it = iter(lines)
        head = next(it, "")
        if not head.strip():
            return 0
        header = parse_header(head.lstrip("\ufeff"), path, separator)
        names = [n for n, _ in header]
        missing = [field for field in load_fields if field not in names]
        if missing:
            raise LLMSeRError(f"{path}:1: no '{missing[0]}' column in the header ({', '.join(names)}) — add it, or "
                              "name the right column in the dataset settings (load_col, *_FIELD)")
        index = {field: names.index(field) for field in load_fields}
        head_cells = head.rstrip("\r\n").split(separator)
        reader = csv.reader(it, delimiter=separator, quotechar='"')
        records, first = 0, lines.number + 1
        try:
            for row in reader:
                start, first = first, lines.number + 1
                if not row or row == [""]:
                    continue  # blank line: pandas skips it
                if start != lines.number:
                    raise LLMSeRError(f"{path}:{start}: a '\"' opens a value that runs on to line {lines.number} — "
                                      "remove the quote or close it on the same line")
                if row == head_cells:
                    raise LLMSeRError(f"{path}:{start}: the header line appears again — remove this line")
                if len(row) > len(names):
                    raise LLMSeRError(f"{path}:{start}: {len(row)} values where the header has {len(names)} (a tab "
                                      "inside a value?) — remove the extra tab or quote the value")
                for field in required:
                    if index[field] >= len(row) or not row[index[field]].strip():
                        raise LLMSeRError(f"{path}:{start}: empty {field} — fill it in or remove the line")
                for field in numeric:
                    value = row[index[field]] if index[field] < len(row) else ""
                    if not _finite(value):
                        raise LLMSeRError(f"{path}:{start}: {field} {value[:40]!r} is not a number — fix the value "
                                          "or remove the line")
                records += 1
        except csv.Error as err:
            raise LLMSeRError(f"{path}:{lines.number}: {err} — fix this line") from None
    return records


def _finite(value: str) -> bool:
    try:
        number = float(value)
    except ValueError:
        return False
    return number == number and number not in (float("inf"), float("-inf"))


def check_dataset_files(config, folder, name) -> None:
    """Validate ``<folder>/<name>.inter`` (and ``.item`` when the config loads it) for the config's fields, once
    per file version in a process. Raises a one-line :class:`LLMSeRError`."""
    separator, encoding = config["field_separator"] or "\t", config["encoding"] or "utf-8"
    load_col = config["load_col"] if isinstance(config["load_col"], dict) else {}
    uid, iid, time = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"], config["TIME_FIELD"]
    inter = Path(folder) / f"{name}.inter"
    fields = list(load_col.get("inter") or [uid, iid])
    for field in (uid, iid):
        if field not in fields:
            raise LLMSeRError(f"load_col.inter = {fields}: it lacks the {'user' if field == uid else 'item'} id field "
                              f"'{field}' — add it to load_col.inter")
    timed = [time] if time and time != FILE_ORDER_FIELD else []
    if timed and time not in fields:
        raise LLMSeRError(f"load_col.inter = {fields}: time field '{time}' (TIME_FIELD) was not loaded; add it to "
                          "load_col.inter — it orders each user's interactions")
    n = _checked(inter, fields, separator, encoding, required=[uid, iid] + timed, numeric=timed)
    if n == 0:
        raise LLMSeRError(f"{inter}: no interactions (the file is empty or holds only a header) — add one "
                          "interaction per line under the header")
    item = Path(folder) / f"{name}.item"
    if "item" in load_col and load_col["item"]:
        if not item.is_file():
            raise LLMSeRError(f"load_col.item = {load_col['item']} but {item} does not exist — add the file or remove "
                              "load_col.item")
        if _checked(item, list(load_col["item"]), separator, encoding, required=[iid]) == 0:
            raise LLMSeRError(f"{item}: no items (the file is empty or holds only a header) — add the items' texts, "
                              "or drop load_col.item and set --item_text_field=~ (the text-free path)")


_CHECKED = {}


def _checked(path, fields, separator, encoding, **kinds) -> int:
    stat = os.stat(path)
    key = (str(path), stat.st_size, stat.st_mtime_ns, tuple(fields), separator, encoding, repr(sorted(kinds.items())))
    if key not in _CHECKED:
        _CHECKED[key] = check_atomic_file(path, fields, separator, encoding, **kinds)
    return _CHECKED[key]
