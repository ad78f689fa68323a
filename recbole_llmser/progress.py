"""Progress of a long loop, never silent: a tqdm bar with ``show_progress: true``; otherwise (logs, CI) a heartbeat,
one log line at most every ``HEARTBEAT_S`` seconds with the count, the rate and the time left, and a closing line
for a loop that took longer than that. A loop shorter than a heartbeat prints nothing."""

from __future__ import annotations

import time
from logging import getLogger

#: Seconds between two heartbeat lines.
HEARTBEAT_S = 60.0


def duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``6.6 h``, ``3.1 days``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


class Progress:
    """``update(n)`` as work is done, ``close()`` at the end (or use it as a context manager). ``total`` None: not
    known in advance (a stream); the bar and the heartbeat then show the count and the rate, no time left."""

    def __init__(self, total: int | None, desc: str, show_progress: bool, unit: str = "it", min_total: int = 0,
                 heartbeat_s: float = HEARTBEAT_S, clock=time.monotonic):
        self.total, self.desc, self.unit, self.clock = None if total is None else int(total), desc, unit, clock
        self.done, self.heartbeat_s, self.beats = 0, heartbeat_s, 0
        self.start = self.last = clock()
        self.bar = None
        if show_progress and (self.total is None or self.total >= min_total):
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=desc, unit=unit, ncols=100, leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last >= self.heartbeat_s:
            self.last, self.beats = now, self.beats + 1
            getLogger().info(self.line(now))

    def line(self, now: float) -> str:
        """The heartbeat line: ``<desc>: <done>/<total> <unit> (<pct>), <rate>/s, about <left> left``."""
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        if self.total is None:
            return f"{self.desc}: {self.done} {self.unit}, {rate:.1f} {self.unit}/s"
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = f" ({100 * self.done / self.total:.0f} %)" if self.total else ""
        eta = f", about {duration(left)} left" if left != float("inf") else ""
        return f"{self.desc}: {self.done}/{self.total} {self.unit}{pct}, {rate:.1f} {self.unit}/s{eta}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.beats:
            getLogger().info(f"{self.desc}: {self.done} {self.unit} in {duration(self.clock() - self.start)}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(iterable, desc: str, show_progress: bool, total: int = None, unit: str = "it", min_total: int = 0):
    """Yield from ``iterable`` with a :class:`Progress` (``total`` defaults to ``len(iterable)``)."""
    with Progress(len(iterable) if total is None else total, desc, show_progress, unit, min_total) as p:
        for item in iterable:
            yield item
            p.update()


class HeartbeatLoader:
    """A RecBole data loader that logs heartbeat lines while it is iterated (RecBole's ``_train_epoch`` shows a bar
    only with ``show_progress``; ``heartbeat=False``: none) and, with ``on_estimate``, calls it once with the
    projected seconds of a whole pass after the first batches (5 % of them, at least 5, or 20 s); every other
    attribute is the loader's."""

    def __init__(self, loader, desc: str, heartbeat: bool = True, on_estimate=None, clock=time.monotonic):
        self._loader, self._desc, self._heartbeat, self._on_estimate, self._clock = (
            loader, desc, heartbeat, on_estimate, clock)

    def __iter__(self):
        items = progress(self._loader, self._desc, False, unit="batches") if self._heartbeat else iter(self._loader)
        n, start, pending = len(self._loader), self._clock(), self._on_estimate
        for done, item in enumerate(items, 1):
            yield item  # back here once the caller has trained on it
            if pending is not None and (done >= max(5, n // 20) or self._clock() - start >= 20):
                pending(n * (self._clock() - start) / done, done, n)
                pending = None
        if pending is not None and n:
            pending(self._clock() - start, n, n)

    def __len__(self):
        return len(self._loader)

    def __getattr__(self, name):
        return getattr(self._loader, name)
