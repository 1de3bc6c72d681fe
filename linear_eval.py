"""Evaluation of a pre-trained encoder: the linear probe (the protocol of SimCLR and moco-v3),
the weighted kNN, and export to a plain encoder state dict.

    python linear_eval.py --checkpoint runs/spcl/checkpoint.pth --data ./data --cached \\
        --out runs/spcl
    python linear_eval.py --checkpoint runs/spcl/checkpoint.pth --data ./data --knn --out runs/spcl
    python linear_eval.py --checkpoint runs/spcl/checkpoint.pth --export resnet18_spcl.pth
    torchrun --nproc_per_node 8 linear_eval.py --checkpoint runs/in1k/checkpoint.pth \\
        --data /path/to/imagenet

Linear probe: the encoder is frozen and stays in eval mode (its BatchNorm statistics do not move);
a linear classifier, N(0, 0.01) weights and zero bias, trains with SGD (Nesterov, momentum 0.9,
lr 0.1 x batch/256, no weight decay, cosine schedule) for 100 epochs on CIFAR, 90 on ImageNet,
on RandomResizedCrop + flip views; the test (ImageNet: val) split is evaluated in the centre-crop
view, top-1 and top-5. At the end the encoder weights are checked against the checkpoint.
`--cached` embeds every image once in the evaluation view and trains the classifier on those
features: no augmentation, but minutes instead of hours on a CPU.

--checkpoint takes train.py's checkpoint.pth (which knows its arch, dataset and image size) or a
plain torchvision state dict of the encoder (then --arch and --dataset say what it is). The result
is printed and appended as one JSON line to --out.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import data
import runtime
import checkpoint
import monitor
from checkpoint import describe_keys, export_encoder, load_encoder
from models import ARCHS


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="train.py's checkpoint.pth or a torchvision state dict")
    p.add_argument("--arch", help=f"{', '.join(ARCHS)}; required for a plain state dict")
    p.add_argument("--dataset", choices=data.DATASETS,
                   help="default: the checkpoint's; required for a plain state dict")
    p.add_argument("--data", default="./data", help="dataset root (README, 'Flags and outputs')")
    p.add_argument("--out",
                   help=".jsonl file, or a folder for linear_eval.jsonl, to append the result to")
    p.add_argument("--epochs", type=int, help="default 100 on CIFAR, 90 otherwise")
    p.add_argument("--batch-size", type=int, default=256, help="GLOBAL batch")
    p.add_argument("--lr", type=float, default=0.1, help="base lr, scaled by batch/256")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--cached", action="store_true",
                   help="train on features of the evaluation view, extracted once")
    p.add_argument("--knn", action="store_true",
                   help="only the weighted kNN top-1 (no linear probe)")
    p.add_argument("--knn-k", type=int, default=200)
    p.add_argument("--knn-temperature", type=float, default=0.1)
    p.add_argument("--export", metavar="PATH", help="write the encoder as a torchvision state "
                   "dict and stop; an existing file only with --force")
    p.add_argument("--force", action="store_true", help="let --export replace an existing file")
    p.add_argument("--subset", type=int, default=0,
                   help="a fixed random subset of N training images")
    p.add_argument("--test-subset", type=int, default=0,
                   help="a fixed random subset of N test images")
    runtime.add_process_flags(p)
    args = p.parse_args(argv)
    if args.workers is None:
        args.workers = runtime.default_workers()
    return args


def fail(message, master=None):
    runtime.fail("linear_eval.py", message, master)


def result_path(out):
    """The JSONL file that --out names: out itself when it ends in .jsonl, else linear_eval.jsonl
    in the folder out (made when missing); a Refusal for any other file, which a JSON line would
    damage (a checkpoint, say)."""
    if out.endswith(".jsonl") and not os.path.isdir(out):
        return out
    if os.path.exists(out) and not os.path.isdir(out):
        raise runtime.Refusal(f"--out {out!r} is a file, not a .jsonl file or a folder: give a "
                              "folder (for linear_eval.jsonl) or a .jsonl file")
    return os.path.join(out, "linear_eval.jsonl")


def export(encoder, info, path, force):
    """--export: the encoder to path (checkpoint.export_encoder, atomic), refusing a folder, and
    an existing file without --force."""
    if os.path.isdir(path):
        raise runtime.Refusal(f"--export {path!r} is a folder; give a file path, such as "
                              f"{os.path.join(path, info['arch'] + '_encoder.pth')}")
    if os.path.exists(path) and not force:
        what = "a train.py checkpoint" if _is_checkpoint(path) else "a file"
        raise runtime.Refusal(f"--export {path!r} already holds {what}; give another path, or add "
                              "--force to replace it")
    why = checkpoint.check_writable(path)
    if why:
        raise runtime.Refusal(f"--export {path!r} cannot be written ({why})")
    try:
        export_encoder(encoder, path)
    except OSError as e:                       # a full disk, say; atomic: nothing half-written
        raise runtime.Refusal(f"--export {path!r} could not be written ({e.strerror or e})")
    print(f"wrote the {info['arch']} encoder "
          f"({'CIFAR' if info['cifar_stem'] else 'ImageNet'} stem) to {path}")


def _is_checkpoint(path):
    try:
        return "optimizer" in checkpoint.read_file(path)
    except (runtime.Refusal, TypeError):
        return False


def write_result(result, out):
    print(json.dumps(result))
    if out:
        path = result_path(out)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(result) + "\n")


def knn(args, encoder, splits, rank, world, device, amp_dtype):
    """Weighted kNN top-1 (Wu et al. 2018) of the test split against the training split."""
    (train_views, train_n), (test_views, test_n), num_classes = splits
    features = lambda views, n: monitor.split_features(encoder, views, n, rank, world, device,
                                                       amp_dtype)
    train_features, train_targets = features(train_views, train_n)
    test_features, test_targets = features(test_views, test_n)
    if rank:
        return None
    top1 = monitor.knn_top1(train_features, train_targets, test_features, test_targets,
                            k=args.knn_k, temperature=args.knn_temperature, num_classes=num_classes)
    return {"mode": "knn", "k": args.knn_k, "temperature": args.knn_temperature, "knn_top1": top1}


def linear_probe(args, encoder, info, splits, epochs, rank, world, device, amp_dtype):
    """The linear probe, on cached features of the evaluation view (--cached, rank 0 alone: a
    linear layer on features takes seconds) or on augmented views through the frozen encoder."""
    (train_views, train_n), (test_views, test_n), num_classes = splits
    features = lambda views, n: monitor.split_features(encoder, views, n, rank, world, device,
                                                       amp_dtype)
    test_features, test_targets = features(test_views, test_n)
    settings = dict(epochs=epochs, batch_size=args.batch_size, lr=args.lr * args.batch_size / 256,
                    momentum=args.momentum, weight_decay=args.weight_decay)
    if args.cached:
        train_features, train_targets = features(train_views, train_n)
        if rank:
            return None
        top1, top5 = monitor.cached_probe(train_features, train_targets, test_features,
                                          test_targets, num_classes, seed=args.seed,
                                          device=device, **settings)
    else:
        classifier = monitor.linear_classifier(info["feature_dim"], num_classes, device)
        model = classifier if world == 1 else nn.parallel.DistributedDataParallel(
            classifier, device_ids=[device.index] if device.type == "cuda" else None)
        sampler = torch.utils.data.DistributedSampler(range(train_n), world, rank, shuffle=True,
                                                      seed=args.seed)
        per_rank = args.batch_size // world

        def batches(epoch):
            sampler.set_epoch(epoch)
            index_batches = torch.tensor(list(sampler)).split(per_rank)
            for x, y, _ in train_views.batches(index_batches, "crop_flip",
                                               key=(args.seed, data.PROBE_VIEWS, epoch, rank)):
                yield x, y
        monitor.train_classifier(model, batches, epochs, math.ceil(len(sampler) / per_rank),
                                 settings["lr"], args.momentum, args.weight_decay,
                                 encoder=encoder, device=device, amp_dtype=amp_dtype,
                                 master=rank == 0)
        if rank:
            return None
        top1, top5 = monitor.evaluate(classifier, test_features, test_targets, device)
    return {"mode": "cached" if args.cached else "augmented", **settings, "top1": top1,
            "top5": top5, "world_size": world}


@runtime.one_line_errors("linear_eval.py")
def main(argv=None):
    args = get_args(argv)
    rank, world, device = runtime.setup_script("linear_eval.py", args.timeout)
    master = rank == 0
    torch.manual_seed(args.seed)
    start = time.time()
    try:
        encoder, info = load_encoder(args.checkpoint, args.arch, args.dataset)
    except ValueError as e:
        fail(str(e), master)
    if args.export:
        if master:
            export(encoder, info, args.export, args.force)
        return None
    out = result_path(args.out) if args.out else None
    why = runtime.on_rank0(lambda: out and checkpoint.check_writable(out))
    if why:
        fail(f"--out {args.out!r} cannot be written ({why}); give a file or folder you can "
             "write to", master)
    dataset = args.dataset or info["dataset"]
    if dataset is None:
        fail(f"{args.checkpoint} is a plain state dict: say which data it is for with --dataset",
             master)
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} must be divisible by the world size {world}", master)
    epochs = args.epochs or (100 if dataset in data.SMALL else 90)
    if epochs < 1:
        fail(f"--epochs must be >= 1, got {epochs}", master)
    try:
        train_set = data.load_dataset(dataset, args.data, train=True, workers=args.workers)
        test_set = data.load_dataset(dataset, args.data, train=False, workers=args.workers)
        train_set, test_set = (data.subset(train_set, args.subset, 1234),
                               data.subset(test_set, args.test_subset, 4321))
    except (ValueError, RuntimeError, OSError) as e:     # data.DataNotFound says what --data
                                                         # should hold
        fail(str(e), master)
    in_memory = isinstance(train_set, data.InMemoryImages)
    image_size = (train_set.images.shape[1] if in_memory
                  else info["image_size"] or (32 if info["cifar_stem"] else 224))
    mean_std = data.MEAN_STD.get(dataset, data.MEAN_STD["imagenet"])
    views = [data.Views(split, image_size, mean_std, workers=args.workers, device=device)
             for split in (train_set, test_set)]
    splits = ((views[0], len(train_set)), (views[1], len(test_set)), len(train_set.classes))

    amp_dtype = runtime.autocast_dtype(device)
    reference = {key: value.clone() for key, value in encoder.state_dict().items()}
    encoder = encoder.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)
    if args.knn:
        result = knn(args, encoder, splits, rank, world, device, amp_dtype)
    else:
        result = linear_probe(args, encoder, info, splits, epochs, rank, world, device, amp_dtype)
        # moco-v3's sanity check: the probe must not have touched the encoder, BN statistics
        # included.
        moved = [key for key, value in encoder.state_dict().items()
                 if not torch.equal(value.cpu(), reference[key])]
        if moved:
            fail(f"the encoder changed during linear evaluation ({describe_keys(moved)}): a bug",
                 master)
        if result:
            result["encoder_unchanged"] = True
    if master:
        result = {"checkpoint": args.checkpoint, "arch": info["arch"], "dataset": dataset,
                  "checkpoint_epoch": info["epoch"], "train_images": len(train_set),
                  "test_images": len(test_set), **result, "seconds": time.time() - start}
        write_result(result, args.out)
    if world > 1:
        dist.destroy_process_group()
    return result if master else None


def interrupted_message():
    return ("linear_eval.py: interrupted; nothing was written (the result is appended to --out "
            "at the end), so run the command again")


if __name__ == "__main__":
    runtime.run_script(main, "linear_eval.py", interrupted_message)
