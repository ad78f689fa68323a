"""Cost of one training epoch of dual-channel training (DCT) next to plain training, on real data.

Variants (each in its own process, so peak memory is its own; same seed, same model initialisation):

* ``plain``       RecBole's own ``Trainer`` on RecBole's rows (the reference: ratio 1.0);
* ``plain_ours``  this package's ``SequentialTrainer`` on the same rows (differs from ``plain`` for BERT4Rec only:
  its loss scores the real mask slots only), not in the default list;
* ``exact``       DCT, ``dct_mode: exact`` (all-positions path for SASRec / GRU4Rec);
* ``exact_rows``  DCT exact through per-row losses (``dct_all_positions: off``), not in the default list;
* ``sample``      DCT, ``dct_mode: sample`` (``aug_targets: all``);
* ``sample_real`` DCT, ``dct_mode: sample`` with ``aug_targets: real``;
* ``plain_all``   plain training (weights 1, one channel) through the all-positions path;
* ``plain_all_seq`` the same with ``all_positions_batch: sequences`` (train_batch_size sequences per batch: fewer,
  larger steps), not in the default list.

The artifact is synthetic but shaped like a real one: M pseudo items for every user, drawn (seeded) from
the items the user never interacted with, ``w`` uniform in [0, 1] and ``w_tilde = w``. Reported per variant:
training rows, seconds per epoch (the mean over ``--epochs``) and the ratio to ``plain``, validation NDCG@10
(RecBole's full ranking; DCT variants see the pseudo items at validation, ``aug_at_eval: true``) after the
same number of epochs, and the peak resident memory of its process (CUDA: peak allocated memory too).

    python benchmarks/dct_epoch_cost.py --max_len=50 --epochs=1 --users=5000

Writes the set-up lines and the table it prints to ``results/benchmarks/dct_epoch_cost.md`` (``--out``), headed by
the command that produced it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

from bench_report import write_markdown  # benchmarks/bench_report.py

VARIANTS = {
    "plain": {},
    "plain_ours": {"method": "none"},
    "exact": {"method": "llmser", "dct_mode": "exact"},
    "exact_rows": {"method": "llmser", "dct_mode": "exact", "dct_all_positions": "off"},
    "sample": {"method": "llmser", "dct_mode": "sample"},
    "sample_real": {"method": "llmser", "dct_mode": "sample", "aug_targets": "real"},
    "plain_all": {"method": "none", "train_all_positions": True},
    "plain_all_seq": {"method": "none", "train_all_positions": True, "all_positions_batch": "sequences"},
}
TARGETS = {"exact": 1.6, "sample": 1.1, "sample_real": 1.1, "plain_all": 0.3}
REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="amazon-beauty")
    p.add_argument("--model", default="SASRec")
    p.add_argument("--max_len", type=int, default=50, help="MAX_ITEM_LIST_LENGTH")
    p.add_argument("--batch_size", type=int, default=128, help="train_batch_size")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--users", type=int, default=0, help="train on a seeded random subset of this many users (0 = all)")
    p.add_argument("--pseudo", type=int, default=12, help="pseudo items per user (M)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--anomaly_detection", action="store_true",
                   help="keep torch's autograd anomaly detection on, as importing RecBole 1.2.1's models leaves it "
                        "(recbole/model/sequential_recommender/sine.py:25); default off")
    p.add_argument("--variants", default="plain,exact,sample,sample_real,plain_all",
                   help=f"comma-separated, from {','.join(VARIANTS)}")
    p.add_argument("--out", default=str(REPO / "results" / "benchmarks" / "dct_epoch_cost.md"),
                   help="markdown file the set-up lines and the table are also written to")
    args = p.parse_args(argv)
    args.out = Path(args.out).resolve()  # before main() moves into its temporary folder
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or "plain" not in args.variants:
        p.error(f"--variants must include 'plain' and only name {', '.join(VARIANTS)} (got {unknown or args.variants})")
    return args


def base_config(args, data_path):
    return {
        "MAX_ITEM_LIST_LENGTH": args.max_len, "train_batch_size": args.batch_size, "epochs": args.epochs,
        "seed": args.seed, "show_progress": False, "state": "WARNING", "use_gpu": args.device == "cuda",
        "eval_batch_size": 2048, "checkpoint_dir": str(Path(data_path).parent / "saved"),
        **({"data_path": str(data_path)} if data_path else {}),
    }


def subsample(args, work: Path):
    """Write a copy of the dataset with ``args.users`` random users (all their interactions) into ``work``."""
    from recbole_llmser.config import bundled_dataset_dir

    source = bundled_dataset_dir() / args.dataset
    target = work / "data" / args.dataset
    target.mkdir(parents=True)
    lines = (source / f"{args.dataset}.inter").read_text(encoding="utf-8").splitlines()
    users = sorted({line.split("\t", 1)[0] for line in lines[1:]})
    keep = set(random.Random(args.seed).sample(users, min(args.users, len(users))))
    kept = [lines[0]] + [line for line in lines[1:] if line.split("\t", 1)[0] in keep]
    (target / f"{args.dataset}.inter").write_text("\n".join(kept) + "\n", encoding="utf-8")
    for extra in source.glob(f"{args.dataset}.*"):
        if extra.suffix != ".inter":
            (target / extra.name).write_bytes(extra.read_bytes())
    return target.parent, len(keep), len(users)


def write_artifact(args, data_path, path: Path):
    """M unseen items per user (seeded), w ~ U[0, 1], w_tilde = w."""
    from recbole_llmser.config import Config
    from recbole_llmser.data import create_dataset

    config = Config(args.model, args.dataset, config_dict=base_config(args, data_path), cmd_args=[])
    dataset = create_dataset(config)
    rng = random.Random(args.seed)
    n_items = dataset.item_num
    with open(path, "w", encoding="utf-8") as f:
        for uid in range(1, dataset.user_num):
            seen = set(dataset.user_items[uid].tolist())
            picked = []
            while len(picked) < args.pseudo:
                item = rng.randrange(1, n_items)
                if item not in seen and item not in picked:
                    picked.append(item)
            w = rng.random()
            record = {"user_id": dataset.id2token(dataset.uid_field, uid),
                      "pseudo_items": dataset.id2token(dataset.iid_field, picked).tolist(), "w": w, "w_tilde": w}
            f.write(json.dumps(record) + "\n")


def run_variant(args, name, data_path, artifact, queue):
    """One variant in this process: build data and model, time ``epochs`` training epochs, validate."""
    import recbole.model.sequential_recommender  # noqa: F401  (its sine.py turns anomaly detection on)
    import torch
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    from recbole_llmser.config import Config
    from recbole_llmser.data import create_dataset, data_preparation
    from recbole_llmser.registry import get_model, get_trainer

    torch.set_num_threads(args.threads)
    torch.autograd.set_detect_anomaly(args.anomaly_detection)
    cfg = {**base_config(args, data_path), **VARIANTS[name]}
    if cfg.get("method") == "llmser":
        cfg["aug_file"] = str(artifact)
    config = Config(args.model, args.dataset, config_dict=cfg, cmd_args=[])
    init_seed(config["seed"], config["reproducibility"])
    t0 = time.perf_counter()
    dataset = create_dataset(config)
    train, valid, _ = data_preparation(config, dataset)
    build_s = time.perf_counter() - t0
    init_seed(config["seed"], config["reproducibility"])
    model = get_model(args.model)(config, train._dataset).to(config["device"])
    trainer_class = Trainer if name == "plain" else get_trainer(config["MODEL_TYPE"], args.model, config)
    trainer = trainer_class(config, model)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, cpu_seconds = [], []
    for epoch in range(args.epochs):
        t0, c0 = time.perf_counter(), time.process_time()
        trainer._train_epoch(train, epoch)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        cpu_seconds.append(time.process_time() - c0)
    _, valid_result = trainer._valid_epoch(valid)
    split = train._dataset
    queue.put({
        "variant": name, "trainer": trainer_class.__name__,
        "layout": getattr(split, "dct_layout", "recbole rows"),
        "rows": int(getattr(split, "dct_n_rows", len(split))),
        "epoch_s": sum(seconds) / len(seconds), "cpu_s": sum(cpu_seconds) / len(cpu_seconds), "build_s": build_s,
        "ndcg10": float(valid_result["ndcg@10"]),
        "rss_before_mb": rss_before, "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None,
    })


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    lines = []

    def say(line=""):
        print(line, flush=True)
        lines.extend(line.split("\n"))

    print("command: python " + " ".join([sys.argv[0], *argv]))
    with tempfile.TemporaryDirectory(prefix="dct_bench_") as tmp:
        work = Path(tmp)
        os.chdir(work)  # RecBole's Trainer writes log_tensorboard/ into the working directory
        data_path = None
        if args.users:
            data_path, kept, total = subsample(args, work)
            say(f"SUBSAMPLED: {kept} of {total} users of {args.dataset} (seed {args.seed}), all their interactions")
        else:
            say(f"dataset: {args.dataset}, all users")
        artifact = work / "aug.jsonl"
        write_artifact(args, data_path or "", artifact)
        say(f"model {args.model}, MAX_ITEM_LIST_LENGTH {args.max_len}, train_batch_size {args.batch_size}, "
            f"epochs {args.epochs}, M {args.pseudo}, w ~ U[0,1], torch threads {args.threads}, device {args.device}, "
            f"autograd anomaly detection {'on' if args.anomaly_detection else 'off'}")
        ctx = mp.get_context("spawn")
        results = []
        for name in args.variants:
            queue = ctx.Queue()
            proc = ctx.Process(target=run_variant, args=(args, name, data_path or "", artifact, queue))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                raise SystemExit(f"variant {name} failed (exit code {proc.exitcode})")
            results.append(queue.get(timeout=60))
            r = results[-1]
            print(f"  done {name}: {r['epoch_s']:.1f} s/epoch", flush=True)
    for line in report(results):
        say(line)
    command = " ".join(["python", "benchmarks/dct_epoch_cost.py", *map(shlex.quote, argv)])
    write_markdown(args.out, "Dual-channel training: epoch cost", command, __doc__.split("\n\n")[0], lines)
    print(f"written to {args.out}")


def report(results) -> list:
    """The result table and its legend, as lines."""
    plain = next(r for r in results if r["variant"] == "plain")
    header = (f"{'variant':<14} {'trainer':<19} {'layout':<13} {'train rows':>10} {'s/epoch':>8} {'x plain':>8} "
              f"{'target':>7} {'cpu s':>7} {'x plain':>8} {'valid NDCG@10':>13} {'build s':>7} {'RSS MB':>7} "
              f"{'peak RSS MB':>11}")
    lines = ["", header, "-" * len(header)]
    for r in results:
        ratio = r["epoch_s"] / plain["epoch_s"]
        target = TARGETS.get(r["variant"])
        mark = "" if target is None else f"<={target:.1f}{'' if ratio <= target else '!'}"
        lines.append(f"{r['variant']:<14} {r['trainer']:<19} {r['layout']:<13} {r['rows']:>10} "
                     f"{r['epoch_s']:>8.1f} {ratio:>8.2f} {mark:>7} {r['cpu_s']:>7.1f} "
                     f"{r['cpu_s'] / plain['cpu_s']:>8.2f} {r['ndcg10']:>13.4f} "
                     f"{r['build_s']:>7.1f} {r['rss_before_mb']:>7.0f} {r['rss_peak_mb']:>11.0f}"
                     + (f"  cuda peak {r['cuda_peak_mb']:.0f} MB" if r["cuda_peak_mb"] else ""))
    lines += ["", "train rows: rows of the objective (DCT sample trains on about sum_u w*|aug_u| + (1-w)*|orig_u| "
              "of them per epoch); s/epoch: wall clock, cpu s: process CPU time (less sensitive to other load on the "
              "machine); build s: loading the dataset and building the splits and rows; RSS MB: resident memory after "
              "that, peak RSS MB: the process's peak; '!' = wall ratio above its target. valid NDCG@10: RecBole's full "
              "ranking after the same epochs; DCT variants validate with the pseudo items prepended (aug_at_eval)."]
    return lines


if __name__ == "__main__":
    main()
