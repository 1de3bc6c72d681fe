"""The results table of experiments/table2.sh (or gpu_compare.sh): one row per run folder.

    python experiments/report.py results/cifar10_e3

A run folder holds metrics.jsonl (train.py), linear_eval.jsonl (linear_eval.py --cached) and
row.json (wall-clock); the untrained-encoder row has knn.jsonl instead of metrics.jsonl. Rows whose
names differ only in their _sN seed suffix are also summarised as mean and half-range.
"""
import json
import os
import re
import sys
from collections import defaultdict


def _lines(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_row(folder):
    """{metric: value} of one finished run folder, or None when it is not finished."""
    probe = _lines(os.path.join(folder, "linear_eval.jsonl"))
    if not probe:
        return None
    metrics = _lines(os.path.join(folder, "metrics.jsonl"))
    knn = _lines(os.path.join(folder, "knn.jsonl"))
    last = metrics[-1] if metrics else {}
    wall = _lines(os.path.join(folder, "row.json"))
    return {"knn_top1": last.get("knn_top1", knn[-1]["knn_top1"] if knn else None),
            "linear_top1": probe[-1]["top1"], "sim_tp": last.get("sim_tp"), "sim_fn": last.get("sim_fn"),
            "nmi_gt": last.get("nmi_gt"), "images_seen": last.get("images_seen", 0),
            "train_minutes": sum(m["epoch_seconds"] for m in metrics) / 60 if metrics else None,
            "wall_minutes": wall[-1]["wall_seconds"] / 60 if wall else None}


def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def main(root):
    rows = {name: load_row(os.path.join(root, name)) for name in sorted(os.listdir(root))}
    rows = {name: row for name, row in rows.items() if row is not None}
    columns = ["knn_top1", "linear_top1", "sim_tp", "sim_fn", "nmi_gt", "images_seen", "train_minutes", "wall_minutes"]
    print("| row | kNN top-1 | linear top-1 | TP sim | FN sim | NMI (GT) | images seen | train min | wall min |")
    print("|---|" + "---|" * len(columns))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(_fmt(row[c], 3 if c.startswith(("sim", "nmi")) else 2) for c in columns) + " |")
    groups = defaultdict(list)
    for name, row in rows.items():
        match = re.fullmatch(r"(.*)_s\d+", name)
        if match:
            groups[match.group(1)].append(row)
    seeded = {k: v for k, v in groups.items() if len(v) > 1}
    if seeded:
        print("\n| method | seeds | kNN top-1 | linear top-1 | FN sim |")
        print("|---|---|---|---|---|")
        for name, group in seeded.items():
            cells = []
            for c in ("knn_top1", "linear_top1", "sim_fn"):
                values = [r[c] for r in group]
                mean, half = sum(values) / len(values), (max(values) - min(values)) / 2
                cells.append(f"{mean:.{3 if c == 'sim_fn' else 2}f} ± {half:.{3 if c == 'sim_fn' else 2}f}")
            print(f"| {name} | {len(group)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        sys.exit("usage: python experiments/report.py RESULTS_FOLDER")
    main(sys.argv[1])
