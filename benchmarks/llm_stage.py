"""LLM-stage benchmark: throughput vs the ideal, cached re-run cost, tokens per user, peak memory.

    python benchmarks/llm_stage.py                       # throughput part only (about a minute)
    python benchmarks/llm_stage.py --beauty              # + the whole augmentation of amazon-beauty

Everything talks to the local OpenAI-compatible test server (tests/llm_server.py) on 127.0.0.1 with a fixed
latency per request, through the real ``openai`` client, side by side in one run. The server runs in its own
process (``python -m tests.llm_server``), as a real endpoint does, so its threads do not share this process's
interpreter lock with the client:

* throughput at concurrency 1, 8, 32, 128, 256 as a share of the ideal ``calls x latency / concurrency``
  (target >= 90 % at 32 and 128), the requests streamed from a generator (``LLMClient.stream``, as SNF and ARV
  do), and the most calls the server saw in flight at once;
* a cached re-run of the same requests as a share of the first run's time (target < 5 %);
* memory of a stream: the peak of Python's allocations (tracemalloc) while 2,000 and then 20,000 requests are
  streamed at concurrency 256 from a generator (latency 0): the stream itself is bounded by its window; what
  grows is the cache's index of answered calls (target: under 200 bytes per call);
* ``--beauty``: ``run_recbole_llmser.py --method=llmser --stage=augment`` on the bundled amazon-beauty in a child
  process pointed at the server: tokens per user from its summary, the child's peak RSS (target < 2 GiB), the
  stage timings, and a second run's LLM calls (target: 0).

Writes what it prints to ``results/benchmarks/llm_stage.md`` (``--out``), headed by the command that produced it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from recbole_llmser.augment.llm import LLMClient, LLMRequest, LLMSettings, ResponseCache  # noqa: E402
from recbole_llmser.augment.prompts import SNF_TEMPLATE_VERSION, snf_messages, snf_schema  # noqa: E402
from bench_report import write_markdown  # noqa: E402  (benchmarks/bench_report.py)


def requests_for(n: int, salt: str):
    """n distinct SNF-shaped requests, made as they are read (a generator, as the pipeline's)."""
    history = [f"history item {j} lipstick shade" for j in range(8)]
    for i in range(n):
        yield LLMRequest(id=f"u{i}", template_version=SNF_TEMPLATE_VERSION, schema=snf_schema(15, 20),
                         messages=snf_messages(history, [f"{salt} candidate {i}-{c} cream" for c in range(20)], 15))


class ServerProcess:
    """``python -m tests.llm_server`` in a child process: ``base_url``, ``stats()``, ``reset()``, ``calls()``."""

    def __init__(self, latency: float):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.llm_server", f"--latency={latency}"], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.base_url = self.proc.stdout.readline().strip()

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.base_url}/stats", timeout=10) as answer:
            return json.loads(answer.read())

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.base_url}/stats/reset", data=b"{}"), timeout=10).close()

    def calls(self) -> int:
        return self.stats()["chat_calls"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def consume(client: LLMClient, n: int, salt: str) -> None:
    for answer in client.stream(requests_for(n, salt), total=n):
        assert answer.result is not None and answer.result.ok, answer.result


def throughput(server, latency: float, n: int, concurrency: int, workdir: Path):
    cache = ResponseCache(workdir / f"cache-{concurrency}.jsonl")
    settings = LLMSettings(model="fake-llm", base_url=server.base_url, concurrency=concurrency, max_retries=0)
    client = LLMClient(settings, cache, progress=False)
    consume(client, 1, f"probe{concurrency}")  # the structured-output probe: a run's first call goes alone
    server.reset()
    t = time.perf_counter()
    consume(client, n, f"c{concurrency}")
    first = time.perf_counter() - t
    in_flight = server.stats()["max_in_flight"]
    t = time.perf_counter()
    before = server.calls()
    consume(LLMClient(settings, ResponseCache(cache.path), progress=False), n, f"c{concurrency}")
    cached = time.perf_counter() - t
    assert server.calls() == before, "the cached re-run made calls"
    ideal = n * latency / concurrency
    return first, ideal, cached, in_flight


def stream_memory(base_url: str, n: int, workdir: Path) -> float:
    """Peak MiB of Python allocations while ``n`` requests are streamed at concurrency 256 (latency 0 server)."""
    settings = LLMSettings(model="fake-llm", base_url=base_url, concurrency=256, max_retries=0)
    client = LLMClient(settings, ResponseCache(workdir / f"memory-{n}.jsonl"), progress=False)
    consume(client, 1, f"memory-probe{n}")
    tracemalloc.start()
    try:
        consume(client, n, f"memory{n}")
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def beauty(server, workdir: Path, extra: list):
    cmd = [sys.executable, str(REPO / "run_recbole_llmser.py"), "--model=SASRec", "--dataset=amazon-beauty",
           "--method=llmser", "--stage=augment", f"--llm_base_url={server.base_url}", "--llm_concurrency=32",
           f"--checkpoint_dir={workdir / 'saved'}", "--show_progress=False", *extra]
    runs = []
    for attempt in range(2):
        calls = server.calls()
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            sys.exit(proc.stderr[-3000:])
        runs.append((wall, server.calls() - calls))
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    summary = json.loads(next((workdir / "saved").rglob("summary.json")).read_text())
    return runs, peak_kib, summary, " ".join(cmd[1:])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency", type=float, default=0.5,
                        help="server seconds per request (an LLM answer takes 0.5-3 s)")
    parser.add_argument("--calls", type=int, default=640, help="requests per throughput run")
    parser.add_argument("--beauty", action="store_true", help="also augment amazon-beauty end to end")
    parser.add_argument("--beauty_args", default="--ccg_epochs=1 --ccg_max_len=20 --ccg_batch_size=1024",
                        help="extra properties for the amazon-beauty run (stated in the output)")
    parser.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "llm_stage.md"),
                        help="markdown file the printed tables are also written to")
    args = parser.parse_args(argv)
    lines = []

    def say(line=""):
        print(line, flush=True)
        lines.extend(line.split("\n"))

    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        server = ServerProcess(args.latency)
        stack.callback(server.close)
        say(f"server latency {args.latency:.3f} s (its own process); at least {args.calls} calls per run, 8 rounds "
            "at the higher concurrencies")
        say(f"{'concurrency':>11} {'calls':>6} {'wall s':>8} {'ideal s':>8} {'of ideal':>9} {'in flight':>10} "
            f"{'cached s':>9} {'cached/first':>13}")
        for c in (1, 8, 32, 128, 256):
            n = max(args.calls, 8 * c) if c > 1 else max(40, args.calls // 8)  # concurrency 1 takes calls x latency
            first, ideal, cached, in_flight = throughput(server, args.latency, n, c, workdir)
            say(f"{c:>11} {n:>6} {first:>8.2f} {ideal:>8.2f} {ideal / first:>8.0%} {in_flight:>10} {cached:>9.3f} "
                f"{cached / first:>12.1%}")
        instant = ServerProcess(0.0)
        stack.callback(instant.close)
        small, large = (stream_memory(instant.base_url, n, workdir) for n in (2_000, 20_000))
        say(f"stream memory at concurrency 256 (Python allocations' peak): 2,000 requests {small:.1f} MiB, 20,000 "
            f"requests {large:.1f} MiB: {(large - small) * 2**20 / 18_000:.0f} bytes per further call (the cache "
            "index)")
        if args.beauty:
            runs, peak_kib, summary, cmd = beauty(instant, workdir, args.beauty_args.split())
            llm = summary["llm"]
            users = summary["augmented_users"]
            say(f"\namazon-beauty augmentation: python {cmd}")
            say(f"  users {summary['users']}, augmented {users}, backend {summary['backend']}")
            say(f"  first run {runs[0][0]:.0f} s with {runs[0][1]} LLM calls; second run {runs[1][0]:.0f} s with "
                f"{runs[1][1]} calls")
            say(f"  tokens per user: prompt {llm['prompt_tokens'] / users:.0f}, completion "
                f"{llm['completion_tokens'] / users:.0f} (SNF + ARV)")
            say(f"  stage timings (first run): {summary['timings_s']}")
            say(f"  peak RSS of the augmentation process: {peak_kib / 2**20:.2f} GiB")
    command = " ".join(["python", "benchmarks/llm_stage.py", *map(shlex.quote, argv)])
    write_markdown(Path(args.out), "LLM stage", command, __doc__.split("\n")[0], lines)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
