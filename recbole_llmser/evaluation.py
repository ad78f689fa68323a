"""HR@k / NDCG@k overall and per user-length group, under full ranking and ``uni<N>`` sampled negatives.

The maths is in small pure functions (ranks -> metrics, lengths -> groups); ``split_rows`` runs a model over
RecBole's validation or test rows (one rank per row and protocol), ``split_result`` turns them into the grouped
results and ``evaluate_split`` does both. ``write_per_user`` keeps the rows of a run's splits in its folder
(``per_user.npz``, see :func:`write_per_user`), from which the metrics are recomputed exactly and runs are compared
user by user (:mod:`recbole_llmser.experiments.significance`). The module imports torch only where a model runs,
so reading per-user files needs numpy alone.

Conventions (stated in every report):

* rank = number of candidates scored strictly higher than the target, plus the other candidates scored
  *equal* to it (ties count against the model, so a constant scorer never looks good);
* HR@k = 1[rank < k], NDCG@k = 1/log2(rank + 2) if rank < k else 0 (one target per row);
* full ranking scores every item except padding and, as RecBole does for sequential models, does not remove
  the user's history items;
* ``uni<N>`` draws N negatives per row uniformly from the items the user never interacted with (in any split),
  with a generator seeded by ``seed`` so every model evaluated with the same seed sees the same negatives;
* the user-length of a user is the number of *training* items (sequence length minus validation and test
  items), never counting pseudo items.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from recbole_llmser.errors import LLMSeRError

if TYPE_CHECKING:
    import torch


def parse_protocol(protocol: str):
    """'full' -> None; 'uni100' -> 100."""
    if protocol == "full":
        return None
    if protocol.startswith("uni") and protocol[3:].isdigit():
        return int(protocol[3:])
    raise ValueError(f"unknown evaluation protocol {protocol!r}")


def ranks_from_scores(scores: torch.Tensor, target_scores: torch.Tensor, n_equal_self: int = 1) -> torch.Tensor:
    """Rank of each row's target among ``scores`` (B x C); ``n_equal_self`` is 1 when the target is one of
    the C columns (it ties with itself), else 0."""
    t = target_scores.unsqueeze(1)
    higher = (scores > t).sum(dim=1)
    equal = (scores == t).sum(dim=1) - n_equal_self
    return higher + equal


def row_metrics(ranks, k: int):
    """(HR@k, NDCG@k) of each row with the given 0-based ranks, as float arrays (their means are the metrics)."""
    ranks = np.asarray(ranks, dtype=np.int64)
    hit = ranks < k
    return hit.astype(np.float64), np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int]) -> dict:
    """Mean HR@k and NDCG@k over rows with the given 0-based ranks."""
    ranks = np.asarray(ranks, dtype=np.int64)
    out = {}
    for k in ks:
        hit, ndcg = row_metrics(ranks, k)
        out[f"hit@{k}"] = float(hit.mean()) if len(ranks) else float("nan")
        out[f"ndcg@{k}"] = float(ndcg.mean()) if len(ranks) else float("nan")
    return out


def assign_groups(lengths: np.ndarray, bounds: Sequence[int]) -> np.ndarray:
    """Group index per user: bounds [2, 3] -> length <=2: 0, 3: 1, >=4: 2."""
    return np.searchsorted(np.asarray(bounds), np.asarray(lengths), side="left")


def group_ranges(bounds: Sequence[int]) -> list:
    """Readable ranges for ``bounds``: [2, 3] -> ['<=2', '3', '>=4']; [3, 6] -> ['<=3', '4-6', '>=7']."""
    if not bounds:
        return ["all"]
    out = [f"<={bounds[0]}"]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out.append(str(hi) if hi == lo + 1 else f"{lo + 1}-{hi}")
    out.append(f">={bounds[-1] + 1}")
    return out


def group_names(names, bounds) -> list:
    """The groups' names: ``names``, or ``group0``, ``group1``, ... when none are set."""
    return list(names) if names else [f"group{i}" for i in range(len(bounds) + 1)]


def grouped_metrics(ranks, lengths, bounds, names, ks) -> dict:
    """Overall and per-group metrics with group sizes."""
    ranks = np.asarray(ranks)
    groups = assign_groups(lengths, bounds)
    names = group_names(names, bounds)
    result = {"overall": {"n": int(len(ranks)), **metrics_from_ranks(ranks, ks)}, "groups": []}
    for g, (name, rng) in enumerate(zip(names, group_ranges(bounds))):
        mask = groups == g
        result["groups"].append({"name": name, "range": rng, "n": int(mask.sum()), **metrics_from_ranks(ranks[mask], ks)})
    return result


def sample_negatives(users, seen, n_items: int, n_neg: int, rng: np.random.Generator) -> np.ndarray:
    """``n_neg`` distinct items per row from 1..n_items-1, none in ``seen[user]`` (uniform, without replacement)."""
    out = np.empty((len(users), n_neg), dtype=np.int64)
    for row, u in enumerate(users):
        excluded = seen[u]
        available = n_items - 1 - len(excluded)
        if available < n_neg:
            raise ValueError(f"user {u}: only {available} unseen items, cannot draw {n_neg} negatives")
        picked = np.empty(0, dtype=np.int64)
        while len(picked) < n_neg:
            draw = rng.integers(1, n_items, size=2 * (n_neg - len(picked)) + 8)
            draw = draw[~np.isin(draw, excluded)]
            picked = np.concatenate([picked, draw])
            _, first = np.unique(picked, return_index=True)
            picked = picked[np.sort(first)]
        out[row] = picked[:n_neg]
    return out


@dataclass
class SplitRows:
    """One split's evaluation, row by row (one row per user in leave-one-out): RecBole's internal user ids, their
    training lengths, the target items (internal ids) and, per protocol, the target's 0-based rank."""

    users: np.ndarray
    lengths: np.ndarray
    targets: np.ndarray
    ranks: dict


def split_rows(model, eval_data, dataset, config, show_progress=False) -> SplitRows:
    """Run ``model`` over the rows of a RecBole eval dataloader: the target's rank in each row under every protocol
    of ``eval_protocols``. ``dataset`` is our :class:`recbole_llmser.data.dataset.SequentialDataset` (per-user
    lengths and items). With several processes each scores every N-th batch and the rows are gathered in every
    process, equal to one process's (the negatives of ``uni<N>`` are drawn for every batch in every process, so
    the seeded draws stay those of one process)."""
    import torch
    from recbole_llmser.distributed import gather_batches
    from recbole_llmser.progress import progress

    split = eval_data._dataset
    protocols = list(config["eval_protocols"])
    device = config["device"]
    n_items = dataset.item_num
    seen = dataset.user_items
    rng = {p: np.random.default_rng([int(config["seed"]), parse_protocol(p) or 0]) for p in protocols}
    batch = int(config["eval_batch_size"])
    starts = range(0, len(split), batch)

    def negatives(users):
        return {p: sample_negatives(users, seen, n_items, parse_protocol(p), rng[p])
                for p in protocols if parse_protocol(p) is not None}

    def score(b):
        inter = split.inter_feat[starts[b]:starts[b] + batch].to(device)
        users = inter[dataset.uid_field].cpu().numpy()
        negs = negatives(users)
        target = inter[dataset.iid_field]
        scores = model.full_sort_predict(inter).view(len(inter), -1).float()
        scores[:, 0] = -torch.inf  # padding is never a candidate
        target_scores = scores.gather(1, target.view(-1, 1)).squeeze(1)
        ranks = {}
        for p in protocols:
            if p in negs:
                r = ranks_from_scores(scores.gather(1, torch.as_tensor(negs[p], device=scores.device)),
                                      target_scores, n_equal_self=0)
            else:
                r = ranks_from_scores(scores, target_scores, n_equal_self=1)
            ranks[p] = r.cpu().numpy()
        return users, target.cpu().numpy(), ranks

    def skip(b):  # a batch another process scores: draw its negatives all the same
        negatives(split.inter_feat[dataset.uid_field][starts[b]:starts[b] + batch].numpy())

    model.eval()
    with torch.no_grad():
        batches = progress(range(len(starts)), "evaluate", show_progress, unit="batches")
        done = gather_batches(config, batches, score, skip)

    empty = np.empty(0, dtype=np.int64)
    users_all = np.concatenate([d[0] for d in done]) if done else empty
    return SplitRows(users=users_all, lengths=np.asarray(dataset.user_train_len)[users_all],
                     targets=np.concatenate([d[1] for d in done]) if done else empty,
                     ranks={p: np.concatenate([d[2][p] for d in done]) if done else empty for p in protocols})


def split_result(rows: SplitRows, dataset, config) -> dict:
    """One grouped result per protocol (overall and per user-length group, with the groups whose users share one
    target) from a split's rows."""
    ks = list(config["topk"])
    bounds, names = list(config["group_bounds"] or []), config["group_names"]
    shared = shared_targets(rows.targets, assign_groups(rows.lengths, bounds), names or [], bounds)
    tokens = dataset.field2id_token[dataset.iid_field]
    shared = [{**s, "item": str(tokens[s["item"]])} for s in shared]
    return {
        p: {"protocol": p, **grouped_metrics(r, rows.lengths, bounds, names, ks),
            **({"shared_targets": shared} if shared else {})}
        for p, r in rows.ranks.items()
    }


def evaluate_split(model, eval_data, dataset, config, show_progress=False) -> dict:
    """Evaluate ``model`` on the rows of a RecBole eval dataloader; one grouped result per protocol
    (:func:`split_rows`, then :func:`split_result`)."""
    return split_result(split_rows(model, eval_data, dataset, config, show_progress), dataset, config)


# ====================================================================================== per-user ranks file ==
#: The file a training run keeps its per-user ranks in (in its run folder, named in ``results.json``).
PER_USER = "per_user.npz"
PER_USER_FORMAT = 1


def write_per_user(path, splits: dict, dataset, config) -> None:
    """Write (atomically) the per-user ranks of a run's evaluated splits (``{"valid": SplitRows, "test": ...}``).

    An ``np.savez_compressed`` archive with no pickled object in it (read it with ``allow_pickle=False``):

    * ``format`` (int32 scalar, 1), ``group_names`` (str), ``group_bounds`` (int32): the run's user-length groups;
    * per split ``s``: ``s.user`` (str: the user tokens of the dataset's files, one per row), ``s.train_len``
      (int32: training items), ``s.group`` (int8: index into ``group_names``), and per protocol ``p``
      ``s.rank.p`` (int32: the target's 0-based rank, ties counted against it).

    HR@k and NDCG@k of any row follow from its rank (:func:`row_metrics`), so the results' metrics, overall and per
    group, are the means of these rows exactly."""
    from recbole_llmser.utils import atomic_file

    bounds = list(config["group_bounds"] or [])
    arrays = {"format": np.int32(PER_USER_FORMAT),
              "group_names": np.array(group_names(config["group_names"], bounds), dtype=str),
              "group_bounds": np.array(bounds, dtype=np.int32)}
    tokens = dataset.field2id_token[dataset.uid_field]
    for split, rows in splits.items():
        arrays[f"{split}.user"] = np.asarray(tokens[rows.users]).astype(str)
        arrays[f"{split}.train_len"] = rows.lengths.astype(np.int32)
        arrays[f"{split}.group"] = assign_groups(rows.lengths, bounds).astype(np.int8)
        for p, r in rows.ranks.items():
            if len(r) and r.max() > np.iinfo(np.int32).max:
                raise ValueError(f"{p}: a rank does not fit int32")
            arrays[f"{split}.rank.{p}"] = r.astype(np.int32)
    with atomic_file(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def read_per_user(path) -> dict:
    """A per-user file (:func:`write_per_user`, or its compact copy :func:`keep_per_user`) as ``{"group_names":
    [...], "group_bounds": [...], "splits": {split: {"user", "train_len", "group": arrays, "ranks": {protocol:
    int32 ranks}}}}``; ValueError when the file is not one (or of another format version)."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        files = set(z.files)
        if not {"format", "group_names", "group_bounds"} <= files or int(z["format"]) != PER_USER_FORMAT:
            raise ValueError(f"{path}: not a per-user ranks file of format {PER_USER_FORMAT}")
        out = {"group_names": [str(n) for n in z["group_names"]], "group_bounds": z["group_bounds"].tolist(),
               "splits": {}}
        users = _read_users(path, str(z["users_file"])) if "users_file" in files else None
        for key in sorted(files):
            split, _, rest = key.partition(".")
            if not rest:
                continue
            entry = out["splits"].setdefault(split, {"ranks": {}})
            if rest.startswith("rank."):
                entry["ranks"][rest[len("rank."):]] = z[key]
            elif rest == "user_index" and users is not None:
                entry["user"] = users[z[key]]
            else:
                entry[rest] = z[key]
    return out


def users_file_of(path) -> Path | None:
    """The users file a compact per-user copy (:func:`keep_per_user`) names, in the copy's folder (it may be
    missing); None for a full per-user file. ValueError when the file does not read or names no users file."""
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:  # lazy: reads only the users_file entry
        if "users_file" not in z.files:
            return None
        name = str(z["users_file"])
    return _users_path(path, name)


def _users_path(path: Path, name: str) -> Path:
    if Path(name).name != name or not name.startswith("users-"):
        raise ValueError(f"{path}: users_file {name!r} is not a users file name")
    return path.parent / name


def _read_users(path: Path, name: str) -> np.ndarray:
    """The user tokens of a compact per-user file: ``name`` in the same folder (:func:`keep_per_user`)."""
    users_path = _users_path(path, name)
    if not users_path.is_file():
        raise ValueError(f"{path}: its users file {name} is missing from {path.parent}")
    with np.load(users_path, allow_pickle=False) as z:
        return np.char.decode(z["users"], "utf-8")


def keep_per_user(src, folder, name: str) -> Path:
    """Copy the per-user file ``src`` to ``<folder>/<name>.npz`` with its user tokens moved into a file that the
    copies of every run with the same users share, ``<folder>/users-<digest>.npz`` (written once): the tokens are
    most of a file's size (about 640 of 830 KB on amazon-beauty) and the same in every run of a dataset. Each split
    then lists its rows in user order with ``user_index`` into that file; :func:`read_per_user` reads both forms
    alike. Returns the copy's path; both files are written atomically."""
    import hashlib

    from recbole_llmser.utils import atomic_file

    folder = Path(folder)
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    splits = sorted({k.partition(".")[0] for k in arrays if k.endswith(".user")})
    users = np.unique(np.concatenate([arrays[f"{s}.user"].astype(str) for s in splits] or [np.array([], str)]))
    encoded = np.char.encode(users, "utf-8")
    digest = hashlib.sha256(b"\n".join(encoded.tolist())).hexdigest()[:16]
    users_path = folder / f"users-{digest}.npz"
    if not users_path.is_file():
        with atomic_file(users_path, "wb") as f:
            np.savez_compressed(f, users=encoded)
    for s in splits:  # rows in user order (pairing goes by token): the index then compresses to almost nothing
        index = np.searchsorted(users, arrays.pop(f"{s}.user").astype(str)).astype(np.int32)
        order = np.argsort(index, kind="stable")
        for key in [k for k in arrays if k.startswith(f"{s}.")]:
            arrays[key] = arrays[key][order]
        arrays[f"{s}.user_index"] = index[order]
    arrays["users_file"] = np.array(users_path.name)
    kept = folder / f"{name}.npz"
    with atomic_file(kept, "wb") as f:
        np.savez_compressed(f, **arrays)
    return kept


#: A group whose users share one target item this often is flagged under the results (see ``shared_targets``).
SHARED_TARGET_SHARE = 0.2


def shared_targets(targets, groups, names, bounds, threshold: float = SHARED_TARGET_SHARE) -> list:
    """Groups (overall included) in which one item is the target of at least ``threshold`` of the users:
    ``[{"group", "item", "share"}]``. Such a group's HR/NDCG move in steps with that one item's rank (a cut-off
    just above or below it flips a large share of the group), which reads like a defect but is the data."""
    names = group_names(names, bounds)
    targets, groups = np.asarray(targets), np.asarray(groups)
    out = []
    for name, mask in [("overall", np.ones(len(targets), bool))] + [(n, groups == g) for g, n in enumerate(names)]:
        if mask.sum() < 10:
            continue
        items, counts = np.unique(targets[mask], return_counts=True)
        top = int(np.argmax(counts))
        share = counts[top] / mask.sum()
        if share >= threshold:
            out.append({"group": name, "item": int(items[top]), "share": round(float(share), 4)})
    return out


#: A (history, target) pair that this share of a split's rows repeat exactly is flagged (see ``shared_rows``).
SHARED_ROW_SHARE = 0.05


def row_keys(histories, lengths, targets, chunk: int = 65536) -> np.ndarray:
    """One 64-bit key per row for its (history, target): equal rows get equal keys (different rows collide with
    probability ~2^-64 per pair). ``histories`` [R, L] item ids (positions past ``lengths`` are ignored)."""
    histories, lengths = np.asarray(histories), np.asarray(lengths)
    targets = np.asarray(targets).astype(np.uint64)
    width = histories.shape[1] if histories.ndim == 2 else 0
    powers = np.cumprod(np.full(width + 1, 0x9E3779B97F4A7C15, np.uint64), dtype=np.uint64)  # wraps mod 2^64
    keys = np.empty(len(targets), np.uint64)
    with np.errstate(over="ignore"):
        for lo in range(0, len(targets), chunk):
            hist = histories[lo:lo + chunk].astype(np.uint64)
            hist[np.arange(width)[None, :] >= lengths[lo:lo + chunk, None]] = 0
            keys[lo:lo + chunk] = (hist * powers[1:]).sum(1, dtype=np.uint64) + targets[lo:lo + chunk] * powers[0]
    return keys


def shared_rows(histories, lengths, targets, threshold: float = SHARED_ROW_SHARE) -> list:
    """The (history, target) pairs that at least ``threshold`` of a split's rows repeat exactly (users with the
    same items in the same order and the same next item), most rows first: ``[{"rows", "share", "history",
    "target"}]`` (item ids as given). Each such pair is one ranking decision that moves all its rows at once, so
    a split where they cover much of the rows measures few decisions (duplicated or bot-like users)."""
    lengths, targets = np.asarray(lengths), np.asarray(targets)
    if len(targets) == 0:
        return []
    keys = row_keys(histories, lengths, targets)
    _, first, counts = np.unique(keys, return_index=True, return_counts=True)
    out = []
    for i in np.argsort(-counts, kind="stable"):
        if counts[i] < max(threshold * len(targets), 2):
            break
        row = first[i]
        out.append({"rows": int(counts[i]), "share": round(float(counts[i] / len(targets)), 4),
                    "history": np.asarray(histories[row][:lengths[row]]).tolist(), "target": int(targets[row])})
    return out


def shared_rows_line(split: str, shared: list, n_rows: int) -> str:
    """One log line about a split's shared rows (''  when there are none), items shown as given in ``shared``."""
    if not shared:
        return ""
    covered = sum(s["rows"] for s in shared)
    pairs = "; ".join(f"{' '.join(map(str, s['history']))} -> {s['target']}: {s['rows']} rows"
                      for s in shared[:3])
    more = f"; and {len(shared) - 3} more" if len(shared) > 3 else ""
    chosen = ", and a model chosen on it is chosen largely on them" if split == "validation" else ""
    return (f"{split}: {covered} of {n_rows} rows ({covered / n_rows:.0%}) repeat {len(shared)} (history, target) "
            f"pair(s) exactly, each at least {SHARED_ROW_SHARE:.0%} of the rows ({pairs}{more}): the split's metrics "
            f"move in steps with those few rankings{chosen}")


def format_results(results: dict, title: str) -> str:
    """Plain-text tables (one per protocol): rows = overall + groups, columns = n and metrics."""
    from tabulate import tabulate

    blocks = []
    for p, res in results.items():
        keys = [k for k in res["overall"] if k != "n"]
        rows = [["overall", "all", res["overall"]["n"], *(res["overall"][k] for k in keys)]]
        rows += [[g["name"], g["range"], g["n"], *(g[k] for k in keys)] for g in res["groups"]]
        table = tabulate(rows, headers=["group", "train len", "users", *keys], floatfmt=".4f")
        notes = [f"note: {s['share']:.0%} of the {s['group']} users share one {title} target (item {s['item']}): "
                 "that item's rank moves the group's HR/NDCG in one step between cut-offs" for s in res.get(
                     "shared_targets", [])]
        blocks.append("\n".join([f"{title} [{p}]", table, *notes]))
    return "\n\n".join(blocks)


def check_sampled_protocols(config, dataset) -> None:
    """Each ``uni<N>`` protocol draws N unseen items per user: refuse, in one line, a catalogue too small for it
    (called before anything is trained)."""
    sampled = [int(p[3:]) for p in config["eval_protocols"] or [] if p.startswith("uni")]
    if not sampled:
        return
    unseen = dataset.item_num - 1 - max((len(items) for items in dataset.user_items), default=0)
    if max(sampled) > unseen:
        raise LLMSeRError(
            f"dataset '{config['dataset']}': eval_protocols uni{max(sampled)} draws {max(sampled)} unseen items per "
            f"user, but some user has only {unseen} of the {dataset.item_num - 1} items unseen — use "
            f"--eval_protocols=\"[uni{max(unseen, 1)}, full]\" or --eval_protocols=\"[full]\"")

