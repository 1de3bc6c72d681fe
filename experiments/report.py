"""The results table of experiments/table2.sh (or gpu_compare.sh): one row per run folder.

    python experiments/report.py results/cifar10_e20

A run folder holds metrics.jsonl (train.py), linear_eval.jsonl (linear_eval.py --out: "linear
top-1" is its last --cached result, each mode read by name) and row.json (wall-clock, optional);
the untrained-encoder row has knn.jsonl instead of metrics.jsonl. "kNN top-1" is the last epoch's
kNN monitor, else the last linear_eval.py --knn result; "same-class pairs" is the last epoch's
share of same-prototype pairs whose two images share a class (monitor.same_class_pairs).
Folders that are not finished rows are listed on stderr with the reason. RESULTS_FOLDER may also
be one run folder. Rows whose names differ only in their _sN seed suffix are also summarised as
mean and half-range.
"""
import json
import os
import re
import sys
from collections import defaultdict


RUN_FILES = ("linear_eval.jsonl", "metrics.jsonl", "knn.jsonl")


def _lines(path):
    """The JSON lines of path ([] when it is missing); ValueError naming a line that is not JSON."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ValueError(f"{path} line {number} is not JSON") from None
    return rows


def _last(results, mode):
    """The last linear_eval.py result of one mode ("cached", "augmented", "knn"), or None."""
    return next((r for r in reversed(results) if r.get("mode") == mode), None)


def load_row(folder):
    """({metric: value}, None) for a finished run folder, or (None, why it is not a row)."""
    try:
        probe, metrics, knn, wall = (_lines(os.path.join(folder, name))
                                     for name in RUN_FILES + ("row.json",))
    except ValueError as e:
        return None, str(e)
    cached = _last(probe, "cached")
    if cached is None:
        modes = sorted({str(r.get("mode")) for r in probe})
        return None, (f"no linear_eval.py --cached result in its linear_eval.jsonl "
                      f"(only {', '.join(modes)})" if probe else
                      "no linear_eval.jsonl (run linear_eval.py --cached --out on this folder)")
    last = metrics[-1] if metrics else {}
    knn_result = _last(probe + knn, "knn")
    return {"knn_top1": last.get("knn_top1", knn_result["knn_top1"] if knn_result else None),
            "linear_top1": cached["top1"], "sim_tp": last.get("sim_tp"),
            "sim_fn": last.get("sim_fn"), "sim_tp_h": last.get("sim_tp_h"),
            "sim_fn_h": last.get("sim_fn_h"),
            "nmi_gt": last.get("nmi_gt"), "same_class_pairs": last.get("same_class_pairs"),
            "loss_proto_last20": last.get("loss_proto_last20"),
            "images_seen": last.get("images_seen", 0),
            "train_minutes": sum(m["epoch_seconds"] for m in metrics) / 60 if metrics else None,
            "wall_minutes": (wall[-1]["wall_seconds"] / 60 if wall and wall[-1].get("wall_seconds")
                             else None)}, None


def _fmt(value, digits=2):
    return ("-" if value is None else f"{value:.{digits}f}" if isinstance(value, float)
            else str(value))


def main(root):
    if any(os.path.exists(os.path.join(root, name)) for name in RUN_FILES):       # one run folder
        folders = {os.path.basename(os.path.abspath(root)): root}
    else:
        folders = {name: os.path.join(root, name) for name in sorted(os.listdir(root))
                   if os.path.isdir(os.path.join(root, name))}
    rows = {}
    for name, folder in folders.items():
        rows[name], why = load_row(folder)
        if why:
            print(f"report.py: skipped {name}: {why}", file=sys.stderr)
    rows = {name: row for name, row in rows.items() if row is not None}
    if not rows:
        sys.exit(f"report.py: no finished run in {root}: a row is a folder with train.py's "
                 "metrics.jsonl and a linear_eval.py --cached result (--out that folder)")
    columns = ["knn_top1", "linear_top1", "sim_tp", "sim_fn", "sim_tp_h", "sim_fn_h", "nmi_gt",
               "same_class_pairs",
               "loss_proto_last20", "images_seen", "train_minutes", "wall_minutes"]
    print("| row | kNN top-1 | linear top-1 | TP sim | FN sim | TP sim h | FN sim h | NMI (GT) | "
          "same-class pairs | loss_proto (last 20) | images seen | train min | wall min |")
    print("|---|" + "---|" * len(columns))
    digits = [3 if c.startswith(("sim", "nmi", "same")) else 2 for c in columns]
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(_fmt(row[c], d) for c, d in zip(columns, digits)) + " |")
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
                values = [r[c] for r in group if r[c] is not None]
                if not values:
                    cells.append("-")
                    continue
                mean, half = sum(values) / len(values), (max(values) - min(values)) / 2
                cells.append(f"{mean:.{3 if c == 'sim_fn' else 2}f} ± "
                             f"{half:.{3 if c == 'sim_fn' else 2}f}")
            print(f"| {name} | {len(group)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        sys.exit("usage: python experiments/report.py RESULTS_FOLDER")
    main(sys.argv[1])
