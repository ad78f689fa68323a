"""Shared fixtures: a tiny synthetic sequential dataset with titles, written to a temp dir, and a temp cwd
(RecBole writes log/, log_tensorboard/ and saved/ into the working directory)."""

from __future__ import annotations

import contextlib
import random

import pytest

#: Small model and run settings that every training test uses (1 epoch, seconds on a CPU).
TINY = {
    "method": "none",
    "epochs": 1,
    "train_batch_size": 64,
    "eval_batch_size": 64,
    "MAX_ITEM_LIST_LENGTH": 10,
    "hidden_size": 16,
    "inner_size": 32,
    "embedding_size": 16,
    "n_layers": 1,
    "n_heads": 1,
    "eval_protocols": ["uni20", "full"],
    "show_progress": False,
    "state": "WARNING",
    "use_gpu": False,
}


def write_tiny_dataset(root, name="tiny", n_users=40, n_items=50, seed=0, with_item=True, lengths=(5, 12)):
    """RecBole atomic files under root/name: users with ``lengths`` (inclusive) interactions, distinct items per
    user."""
    rng = random.Random(seed)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\ttimestamp:float"]
    sequences = {}
    for u in range(1, n_users + 1):
        length = rng.randint(*lengths)
        items = rng.sample(range(1, n_items + 1), length)
        sequences[f"u{u}"] = [f"i{i}" for i in items]
        for t, i in enumerate(items):
            lines.append(f"u{u}\ti{i}\t{1000 * u + t}")
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    if with_item:
        rows = ["item_id:token\ttitle:token_seq"]
        rows += [f"i{i}\tproduct number {i} in colour {['red', 'blue', 'green'][i % 3]}" for i in range(1, n_items + 1)]
        (folder / f"{name}.item").write_text("\n".join(rows) + "\n")
    return sequences


@pytest.fixture
def tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_data(tmp_path):
    """(data_path, sequences) for a dataset called 'tiny' with titles."""
    data = tmp_path / "data"
    sequences = write_tiny_dataset(data)
    return data, sequences


def tiny_config_dict(data_path, **extra):
    cfg = dict(TINY)
    cfg.update(
        data_path=str(data_path),
        load_col={"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]},
        item_text_field="title",
        group_bounds=[4, 7],
    )
    cfg.update(extra)
    return cfg


class Interrupted(Exception):
    """What a test raises to stop a run part-way, as Ctrl-C or the end of a session would."""


@contextlib.contextmanager
def stopped_after_epoch(monkeypatch, epoch_idx, exc=Interrupted):
    """Inside the block, training raises ``exc`` right after it saved its state for ``epoch_idx`` (0-based)."""
    from recbole_llmser.trainer import SequentialTrainer

    original = SequentialTrainer._save_train_state

    def save_then_stop(self, path, idx, train_data):
        original(self, path, idx, train_data)
        if idx == epoch_idx:
            raise exc

    monkeypatch.setattr(SequentialTrainer, "_save_train_state", save_then_stop)
    try:
        yield
    finally:
        monkeypatch.setattr(SequentialTrainer, "_save_train_state", original)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run far faster on one thread (no waiting for a second thread on a busy 2-core machine); a module
    opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spy_llm_requests(monkeypatch) -> list:
    """``(cache key, request)`` of every request the LLM client is asked, in the order it reads them (the pipeline
    streams its requests through :meth:`LLMClient.stream`; :meth:`LLMClient.run` goes through the same stream)."""
    from recbole_llmser.augment.llm import LLMClient

    asked = []
    original = LLMClient._answers

    def spy(self, requests, *args, **kwargs):
        def seen(requests):
            for request in requests:
                asked.append((self.key(request), request))
                yield request

        return original(self, seen(requests), *args, **kwargs)

    monkeypatch.setattr(LLMClient, "_answers", spy)
    return asked

