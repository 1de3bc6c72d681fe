"""How well a run's last prototypes match the classes: for each train.py checkpoint, the NMI of
its last k-means partition with the classes and the share of same-prototype pairs whose two
images share a class (the precision of the positives that Eq. 3 pulls together; 0.1 for a
random pair of CIFAR-10 images, 1 for ground-truth prototypes).

    python experiments/prototypes.py --data ../shared/data/cifar10 runs/*/checkpoint.pth

Checkpoints of SimCLR rows (no prototypes) are listed as such.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import monitor  # noqa: E402
import data     # noqa: E402


def train_targets(name, root):
    """The class of every training image in train.py's order. A CIFAR ImageFolder tree is read
    for its labels only (train.py decodes every image, which takes half a minute here)."""
    pickled = any(os.path.isdir(os.path.join(root, cls.base_folder))      # as data.load_dataset
                  for cls in (torchvision.datasets.CIFAR10, torchvision.datasets.CIFAR100))
    folder = os.path.join(root, "train")
    if name in data.SMALL and not pickled and os.path.isdir(folder):
        return np.asarray(torchvision.datasets.ImageFolder(folder).targets)
    return torch.as_tensor(data.load_dataset(name, root, train=True).targets).numpy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="train.py checkpoint.pth files")
    parser.add_argument("--data", required=True, help="the --data the runs trained on")
    args = parser.parse_args(argv)
    targets = {}
    print("| checkpoint | epoch | K | NMI (GT) | same-class share of same-prototype pairs |")
    print("|---|---|---|---|---|")
    for path in args.checkpoints:
        state = torch.load(path, map_location="cpu", weights_only=False)
        config, assignments = state["config"], state["assignments"][:, 0].numpy()
        name = config["dataset"]
        if name not in targets:
            targets[name] = train_targets(name, args.data)
        if len(assignments) != len(targets[name]):
            sys.exit(f"{path}: {len(assignments)} assignments for {len(targets[name])} images; "
                     "give the --data the run trained on (a --train-subset run is not supported)")
        K = len(set(assignments.tolist()))
        if K == len(assignments):
            print(f"| {path} | {state['epoch']} | - | no prototypes (SimCLR) | - |")
            continue
        print(f"| {path} | {state['epoch']} | {K} | {monitor.nmi(assignments, targets[name]):.3f} "
              f"| {monitor.same_class_pairs(assignments, targets[name]):.3f} |")


if __name__ == "__main__":
    main()
