"""Per-epoch curves of train.py runs, the analogue of the paper's Fig. 2b: kNN top-1, and the
similarity of true positives (two views of an image) and of false negatives (two images of one
class) in projection space z and, when the rows have it, on the encoder features h that Eq. 3-4
and the linear probe read, per epoch (numbered from 1, as metrics.jsonl).
Needs matplotlib, which requirements.txt leaves out: pip install matplotlib.

    python experiments/plot.py results/cifar10_fork/simclr_s0 results/cifar10_fork/spcl_wcon2_s0 \\
        --out fig2b.png
"""
import argparse
import json
import os
import sys

try:
    import matplotlib
except ImportError:
    sys.exit("plot.py needs matplotlib, which requirements.txt leaves out: pip install matplotlib")

matplotlib.use("Agg")                       # files only, no display needed
import matplotlib.pyplot as plt             # noqa: E402
from matplotlib.ticker import MaxNLocator   # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders holding metrics.jsonl")
    parser.add_argument("--out", default="fig2b.png")
    args = parser.parse_args()
    on_h = any("sim_tp_h" in json.loads(line) for run in args.runs
               for line in open(os.path.join(run, "metrics.jsonl")))
    fig, axes = plt.subplots(1, 3 if on_h else 2, figsize=(15 if on_h else 10, 3.8))
    ax_knn, panels = axes[0], list(zip(axes[1:], ("", "_h"), ("z", "h")))
    for run in args.runs:
        with open(os.path.join(run, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        name = os.path.basename(os.path.normpath(run))
        epochs = [r["epoch"] for r in rows]
        knn = [(e, r["knn_top1"]) for e, r in zip(epochs, rows) if "knn_top1" in r]
        line, = ax_knn.plot(*zip(*knn), marker="o", label=name) if knn else ax_knn.plot([], [])
        for ax, suffix, _ in panels:          # rows of older code have no h probe: left out
            for kind, marker, style in (("tp", "o", "-"), ("fn", "s", "--")):
                points = [(e, r[f"sim_{kind}{suffix}"]) for e, r in zip(epochs, rows)
                          if r.get(f"sim_{kind}{suffix}") is not None]
                if points:
                    ax.plot(*zip(*points), marker=marker, linestyle=style,
                            color=line.get_color(), label=f"{name} {kind.upper()}")
    ax_knn.set(xlabel="epoch", ylabel="kNN top-1 (%)", title="kNN monitor (CIFAR-10 test)")
    for ax, _, space in panels:
        ax.set(xlabel="epoch", ylabel="mean cosine similarity",
               title=f"true positives vs false negatives, on {space}")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
