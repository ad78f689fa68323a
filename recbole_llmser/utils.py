"""Small helpers: paths, content hashes, atomic writes and file digests, secret scrubbing."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np


PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent


def content_hash(settings: dict, sequences=(), *extras: bytes) -> str:
    """Hex sha256 of ``settings`` (canonical JSON), then ``extras``, then each item-id sequence (int64 bytes and a
    separator): the identity of a cached artifact (a changed setting or sequence gives a new hash)."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for extra in extras:
        h.update(extra)
    for seq in sequences:
        h.update(np.asarray(seq, dtype=np.int64).tobytes() + b"|")
    return h.hexdigest()


def unique_stem(*parts: str) -> str:
    """A file stem that two processes (or two models in one second) never share."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    return "-".join([*(str(p) for p in parts if p), stamp, uuid.uuid4().hex[:8]])


@contextmanager
def atomic_file(path, mode: str = "w", before_replace=None, after_replace=None):
    """Open a temp file beside ``path`` for writing; on success it is fsync'd and renamed to ``path``, on any
    error deleted: a reader never sees a half-written ``path``. ``before_replace(tmp)`` and ``after_replace()`` run
    just before and just after the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file what open() would have
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
        if after_replace is not None:
            after_replace()
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and a rename."""
    with atomic_file(path) as f:
        f.write(text)


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


# ----- content digests: files this package wrote, and the inputs a run was started on ------------------------
#: Suffix of the file that records the sha256 of a file this package wrote (``<name>.sha256``, sha256sum's format).
DIGEST_SUFFIX = ".sha256"


def file_sha256(path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of the file at ``path``, read in chunks (any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def digest_path(path, digest_dir=None) -> Path:
    """Where the sha256 of ``path`` is recorded: ``<path>.sha256`` beside it, or in ``digest_dir``."""
    path = Path(path)
    return (Path(digest_dir) if digest_dir else path.parent) / f"{path.name}{DIGEST_SUFFIX}"


def _write_digests(path, digests, digest_dir=None) -> None:
    name = Path(path).name
    atomic_write_text(digest_path(path, digest_dir), "".join(f"{d}  {name}\n" for d in digests))


def recorded_digests(path, digest_dir=None) -> list:
    """The sha256 values recorded for ``path`` (empty when none is)."""
    try:
        text = digest_path(path, digest_dir).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    return [line.split()[0] for line in text.splitlines() if line.split()]


def record_digest(path, digest_dir=None) -> str:
    """Record the sha256 of ``path`` (a file this package has just written); returns it."""
    digest = file_sha256(path)
    _write_digests(path, [digest], digest_dir)
    return digest


def digest_problem(path, digest_dir=None):
    """None when ``path`` is a file whose sha256 is the one recorded for it (see :func:`record_digest`), else a short
    reason ("has no recorded sha256 ...", "changed since it was written ..."); the file must exist."""
    recorded = recorded_digests(path, digest_dir)
    if not recorded:
        return f"has no recorded sha256 ({digest_path(path, digest_dir)})"
    if file_sha256(path) not in recorded:
        return f"its sha256 differs from the one recorded in {digest_path(path, digest_dir)}"
    return None


@contextmanager
def atomic_file_with_digest(path, mode: str = "wb"):
    """:func:`atomic_file` that also records the new file's sha256 in ``<path>.sha256``. While the new file replaces
    the old one, the record lists both digests, so a process stopped at any point leaves ``path`` matching it."""
    path, digests = Path(path), []

    def record_both(tmp):
        digest = file_sha256(tmp)
        old = [d for d in recorded_digests(path) if d != digest][:1] if path.is_file() else []
        digests[:] = [digest, *old]
        _write_digests(path, digests)

    def keep_new():
        if len(digests) > 1:
            _write_digests(path, digests[:1])

    with atomic_file(path, mode, record_both, keep_new) as f:
        yield f


def scrub_args(args, secret_keys) -> list:
    """``--key=value`` command-line strings with the value of every key in ``secret_keys`` replaced by ``***``
    (also ``--key value``: the next word)."""
    out, hide_next = [], False
    for arg in args:
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        arg = str(arg)
        name, eq, _ = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name in secret_keys:
            out.append(f"--{name}=***" if eq else arg)
            hide_next = not eq
        else:
            out.append(arg)
    return out
