"""Progress never goes silent: a bar with show_progress, heartbeat lines in the log without."""

import logging

from recbole_llmser.progress import HeartbeatLoader, Progress, progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_heartbeat_lines_without_a_bar(caplog):
    caplog.set_level(logging.INFO)
    clock = Clock()
    with Progress(100, "CCG scoring", False, unit="batches", heartbeat_s=60, clock=clock) as p:
        for _ in range(10):
            clock.now += 10  # 10 s a batch: a line after 60 s
            p.update()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "CCG scoring: 6/100 batches (6 %), 0.1 batches/s, about 16 min left"
    assert lines[-1] == "CCG scoring: 10 batches in 2 min" and len(lines) == 2


def test_a_short_loop_says_nothing_and_a_bar_logs_nothing(caplog):
    caplog.set_level(logging.INFO)
    assert list(progress(range(5), "quick", False)) == [0, 1, 2, 3, 4]
    with Progress(3, "bar", True, unit="texts") as p:
        p.update(3)
        assert p.bar is not None and p.bar.n == 3
    assert caplog.records == []


def test_heartbeat_loader_passes_the_loader_through():
    class Loader:
        shuffle = True

        def __iter__(self):
            return iter([1, 2, 3])

        def __len__(self):
            return 3

    wrapped = HeartbeatLoader(Loader(), "train epoch 0")
    assert list(wrapped) == [1, 2, 3] and len(wrapped) == 3 and wrapped.shuffle is True


def test_the_first_batches_give_an_estimate_of_the_whole_pass():
    clock, told = Clock(), []

    class Loader:
        def __iter__(self):
            for i in range(100):
                clock.now += 2  # 2 s a batch
                yield i

        def __len__(self):
            return 100

    loader = HeartbeatLoader(Loader(), "train epoch 0", heartbeat=False,
                             on_estimate=lambda *a: told.append(a), clock=clock)
    assert list(loader) == list(range(100))
    assert told == [(200.0, 5, 100)]  # after 5 batches (5 % of 100): 100 batches x 2 s
