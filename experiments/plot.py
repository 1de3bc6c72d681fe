"""Per-epoch curves of train.py runs, the analogue of the paper's Fig. 2b: kNN top-1, and the
similarity of true positives (two views of an image) and of false negatives (two images of one
class) in projection space, SimCLR against SPCL, per epoch (numbered from 1, as metrics.jsonl).
Needs matplotlib, which requirements.txt leaves out: pip install matplotlib.

    python experiments/plot.py results/cifar10_e3/simclr_s0 results/cifar10_e3/spcl_s0 \\
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
    fig, (ax_knn, ax_sim) = plt.subplots(1, 2, figsize=(10, 3.8))
    for run in args.runs:
        with open(os.path.join(run, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        name = os.path.basename(os.path.normpath(run))
        epochs = [r["epoch"] for r in rows]
        knn = [(e, r["knn_top1"]) for e, r in zip(epochs, rows) if "knn_top1" in r]
        line, = ax_knn.plot(*zip(*knn), marker="o", label=name) if knn else ax_knn.plot([], [])
        ax_sim.plot(epochs, [r["sim_tp"] for r in rows], marker="o", color=line.get_color(),
                    label=f"{name} TP")
        ax_sim.plot(epochs, [r["sim_fn"] for r in rows], marker="s", linestyle="--",
                    color=line.get_color(), label=f"{name} FN")
    ax_knn.set(xlabel="epoch", ylabel="kNN top-1 (%)", title="kNN monitor (CIFAR-10 test)")
    ax_sim.set(xlabel="epoch", ylabel="mean cosine similarity",
               title="true positives vs false negatives")
    for ax in (ax_knn, ax_sim):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
