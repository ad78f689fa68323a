"""Statistics behind the README's reading of the results (issue #7), from a RecBole .inter file and, optionally,
LLMSeR artifacts; standard library only.

    python benchmarks/analysis/target_stats.py dataset/amazon-fashion-ids/amazon-fashion-ids.inter \
        [saved/amazon-fashion-ids/augment/<hash>/artifact.jsonl ...]

Per sequence length (interactions per user): users, users with a validation row under RecBole's leave-one-out
(4+ interactions), and the share of validation / test targets that repeat an earlier item of the user. Per
artifact: the share of users whose pseudo items hold their validation item (users with a validation row) and their
test item (all users).
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict


def sequences(inter_path):
    """user token -> item tokens in time order (ties kept in file order, as RecBole's stable sort does)."""
    rows = defaultdict(list)
    with open(inter_path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        head = next(reader)
        col = {h.split(":")[0]: j for j, h in enumerate(head)}
        for n, row in enumerate(reader):
            rows[row[col["user_id"]]].append((float(row[col["timestamp"]]), n, row[col["item_id"]]))
    return {u: [item for _, _, item in sorted(r)] for u, r in rows.items()}


def length_table(seqs):
    by_len = defaultdict(list)
    for s in seqs.values():
        by_len[min(len(s), 8)].append(s)
    print("length  users  valid rows  valid target repeats  test target repeats")
    for n in sorted(by_len):
        group = by_len[n]
        valid = [s for s in group if len(s) >= 4]
        rv = sum(s[-2] in s[:-2] for s in valid) / len(valid) if valid else float("nan")
        rt = sum(s[-1] in s[:-1] for s in group) / len(group)
        print(f"{str(n) + ('+' if n == 8 else ''):>6}  {len(group):5d}  {len(valid):10d}  {rv:20.1%}  {rt:19.1%}")


def artifact_stats(seqs, path):
    n = n_valid = hit_valid = hit_test = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            s, pseudo = seqs[record["user_id"]], set(record["pseudo_items"])
            n += 1
            hit_test += s[-1] in pseudo
            if len(s) >= 4:
                n_valid += 1
                hit_valid += s[-2] in pseudo
    print(f"{path}: pseudo items hold the validation item for {hit_valid / max(n_valid, 1):.1%} of {n_valid} users "
          f"with a validation row, the test item for {hit_test / max(n, 1):.1%} of {n} users")


def main(argv):
    if not argv:
        print(__doc__)
        return 2
    seqs = sequences(argv[0])
    length_table(seqs)
    for path in argv[1:]:
        artifact_stats(seqs, path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
