"""SPCL pre-training (Mo, Sun and Li, BMVC 2021, Sec. 3): one process on a laptop, or DDP under
torchrun.

    python train.py --dataset cifar10 --data ./data --arch resnet18_narrow --epochs 20
    torchrun --nproc_per_node 8 train.py --dataset imagenet --data /path/to/imagenet

main() reads as the algorithm: set up and resume, then per epoch (1) the prototypes: k-means on
every training image's features (Sec. 3.2; each rank keeps the features of its share, rank 0
clusters their whitened rows, every rank gets the assignments), with the prototype heads
started over; (2) one epoch of Eq. 5 on same/cross-prototype pair batches, LARS for the network
and its own SGD for the heads; (3) the kNN and similarity monitor; (4) metrics.jsonl and
checkpoint.pth in --out (resumed automatically). `--w-metric 0 --w-proto 0` is plain SimCLR: no
clustering, uniformly random pairs. Ctrl-C stops with a line saying how to resume.
"""
import argparse
import itertools
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cluster
import data
import runtime
from lars import LARS
from losses import CONTRAST_MODES
from models import ARCHS, SPCLModel, TrainingStep, describe_keys
from sampler import PrototypePairSampler

# Defaults that differ by dataset; CIFAR's are the official code's (the paper's own were not given).
DATASET_DEFAULTS = {
    # Colour jitter 0.5 is SimCLR's CIFAR recipe; the official SPCL config uses 1.0 (as ImageNet).
    "cifar10": dict(arch="resnet18", epochs=1000, batch_size=512, num_prototypes="512",
                    temperature=0.5, image_size=32, jitter=0.5),
    "cifar100": dict(arch="resnet18", epochs=1000, batch_size=512, num_prototypes="512",
                     temperature=0.5, image_size=32, jitter=0.5),
    # ImageNet: SimCLR's ResNet-50 recipe (temperature 0.1 at large batch), one prototype per class.
    "imagenet": dict(arch="resnet50", epochs=200, batch_size=1024, num_prototypes="1000",
                     temperature=0.1, image_size=224, jitter=1.0),
    "folder": dict(arch="resnet50", epochs=200, batch_size=256, num_prototypes="100",
                   temperature=0.5, image_size=224, jitter=1.0),
}
# Format 2: the prototype heads have an optimiser of their own (format 1 had them inside LARS).
CHECKPOINT_FORMAT = 2
# What a resume may change. These re-plan the learning-rate schedule: refused unless
# --allow-schedule-change.
SCHEDULE = ("epochs", "batch_size", "lr", "warmup_epochs", "train_subset")
# These change how a run is carried out, not what it trains: free, and not recorded.
OPERATIONAL = ("out", "data", "download", "workers", "stop_after", "save_every", "log_every",
               "timeout", "knn_every", "allow_schedule_change", "fork_from")
# Every other flag is refused with what differs, except in a fork (--fork-from: a branch from a
# checkpoint whose prototypes had not started), which may change all but the network.
NETWORK = ("arch", "dataset", "image_size")
# Values of flags that older checkpoints lack.
OLDER = {"heads_on": "h", "renew_gt_head": False}
# Where training stands, for the one line that Ctrl-C ends with (the end of this file).
progress = {"epoch": None, "epochs": None, "step": None, "steps": None, "checkpoint": None,
            "saved_epoch": 0, "saved_step": 0}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10", choices=data.DATASETS)
    p.add_argument("--data", default="./data", help="dataset root (see README, 'Data')")
    p.add_argument("--download", action="store_true",
                   help="fetch CIFAR into --data (created) if missing")
    p.add_argument("--out", default="runs/spcl", help="folder for checkpoint.pth and metrics.jsonl")
    p.add_argument("--arch", help=f"encoder: {', '.join(ARCHS)} (default: per dataset)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="GLOBAL batch in images (pairs = half of it)")
    p.add_argument("--lr", type=float, default=1.0, help="base LARS lr, scaled by batch/256")
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--warmup-epochs", type=float, default=10)
    p.add_argument("--temperature", type=float, help="NT-Xent temperature")
    p.add_argument("--image-size", type=int)
    p.add_argument("--jitter", type=float,
                   help="colour-jitter strength s (0.8s, 0.8s, 0.8s, 0.2s; default: CIFAR 0.5 as "
                        "SimCLR's CIFAR recipe, ImageNet 1.0; official SPCL: 1.0)")
    # Eq. 5 and Table 2.
    p.add_argument("--w-con", type=float, default=1.0, help="weight of NT-Xent (Eq. 1-2)")
    p.add_argument("--w-metric", type=float, default=1.0,
                   help="weight of the Siamese metric loss (Eq. 3)")
    p.add_argument("--w-proto", type=float, default=1.0, help="weight of the prototype CE (Eq. 4)")
    p.add_argument("--proto-loss", choices=("ce", "sce"), default="ce",
                   help="plain or symmetric CE (Eq. 4)")
    p.add_argument("--contrast", choices=CONTRAST_MODES,
                   help="which views share NT-Xent's softmax (losses.spcl_loss); default: "
                        "per-side for SPCL, joint (all views, standard SimCLR) with --w-metric 0 "
                        "--w-proto 0")
    p.add_argument("--head-lr", type=float, default=1.0,
                   help="lr of the prototype heads' own SGD (constant, no momentum), scaled by "
                        "batch/256")
    p.add_argument("--head-init", choices=("random", "centroids"), default="random",
                   help="prototype heads after each clustering: N(0, 0.01), or each row the "
                        "cluster's mean feature")
    p.add_argument("--prototypes", choices=("kmeans", "gt"), default="kmeans",
                   help="k-means clusters, or the ground-truth classes (Table 2's SPCL (GT))")
    p.add_argument("--renew-gt-head", action="store_true",
                   help="with --prototypes gt, re-draw the head every epoch as k-means heads are "
                        "(a control matched to the k-means rows); default: made once")
    p.add_argument("--heads-on", choices=("h", "z"), default="h",
                   help="the features Eq. 3 and 4 read: h, the encoder's (the paper and the "
                        "official code), or z, the projection's")
    p.add_argument("--num-prototypes",
                   help="K, or a comma list for several clusterings (one head each)")
    p.add_argument("--p-same", type=float, default=0.5,
                   help="share of same-prototype pairs in a batch")
    p.add_argument("--no-same-image-pairs", action="store_true",
                   help="Eq. 3 on the cross-image pairs only (the official code adds (a, a') and "
                        "(b, b'))")
    p.add_argument("--cluster-aug", action="store_true",
                   help="cluster features of one random augmentation (the paper) instead of the "
                        "eval view")
    p.add_argument("--pca-dim", type=int,
                   help="PCA-whitening before k-means; 0 = off (default: min(256, F / 2), F the "
                        "feature size)")
    p.add_argument("--kmeans-iters", type=int, default=20)
    p.add_argument("--proto-start-epoch", type=int, default=0,
                   help="N epochs of plain SimCLR first, while clusters are still noise; "
                        "prototypes from epoch N+1")
    p.add_argument("--knn-every", type=int, default=0,
                   help="kNN top-1 on the test set every N epochs; 0 = never")
    p.add_argument("--train-subset", type=int, default=0,
                   help="train on a fixed random subset of N images")
    p.add_argument("--stop-after", type=int, default=0,
                   help="exit after this many epochs of this run (a job slot shorter than the "
                        "schedule)")
    p.add_argument("--save-every", type=int, default=0,
                   help="also write the checkpoint every N steps inside an epoch (0 = at the end "
                        "of each epoch only); a resumed run skips the steps it holds")
    p.add_argument("--log-every", type=int, default=20,
                   help="read the losses from the device every N steps (progress bar, NaN check); "
                        "the steps between never wait for the device")
    p.add_argument("--fork-from", metavar="CHECKPOINT",
                   help="start --out from this train.py checkpoint, taken after an epoch in which "
                        "the prototypes had not started (e.g. a SimCLR run's), with other loss and "
                        "prototype flags: branches that share their first epochs")
    p.add_argument("--allow-schedule-change", action="store_true",
                   help="resume although --epochs, --lr, --batch-size, --warmup-epochs or "
                        "--train-subset differ from the checkpoint's (the lr schedule is "
                        "re-planned)")
    runtime.add_process_flags(p, "; it must cover rank 0's k-means, which the others wait for")
    args = p.parse_args(argv)
    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.contrast is None:
        args.contrast = "per-side" if args.w_metric or args.w_proto else "joint"
    if args.workers is None:
        args.workers = runtime.default_workers()
    return args


def uses_prototypes(args):
    """Whether Eq. 3 or 4 is on: SPCL (from --proto-start-epoch), not plain SimCLR."""
    return bool(args.w_metric or args.w_proto)


def prototype_counts(text):
    """--num-prototypes "50,512" -> [50, 512]; ValueError when it is not a comma list of
    integers."""
    return [int(k) for k in str(text).split(",")]


def check_args(args, world):
    """The first problem with the flags as a sentence saying how to fix it, or None."""
    try:
        ks = prototype_counts(args.num_prototypes)
    except ValueError:
        return f"--num-prototypes {args.num_prototypes!r}: give K or a comma list such as 50,512"
    problems = [
        (args.arch not in ARCHS, f"unknown --arch {args.arch!r}; choose from {', '.join(ARCHS)}"),
        (args.batch_size < 2 or args.batch_size % (2 * world),
         f"--batch-size {args.batch_size} must be a positive multiple of 2 x world size = "
         f"{2 * world} (it counts images, made of pairs, split evenly over the ranks)"),
        (args.epochs < 1, f"--epochs must be >= 1, got {args.epochs}"),
        (not args.lr > 0, f"--lr must be > 0, got {args.lr}"),
        (not args.temperature > 0, f"--temperature must be > 0, got {args.temperature}"),
        (not args.head_lr > 0, f"--head-lr must be > 0, got {args.head_lr}"),
        (not args.jitter >= 0, f"--jitter must be >= 0, got {args.jitter}"),
        (args.head_init == "centroids" and (args.prototypes != "kmeans" or not args.w_proto
                                            or args.heads_on != "h"),
         "--head-init centroids needs k-means prototypes, a prototype head (--w-proto > 0) and "
         "--heads-on h (the centroids are encoder features)"),
        (args.renew_gt_head and args.prototypes != "gt",
         "--renew-gt-head is for --prototypes gt (k-means heads are always re-drawn)"),
        (not args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}"),
        (not args.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {args.warmup_epochs}"),
        (not min(args.w_con, args.w_metric, args.w_proto) >= 0,
         f"loss weights must be >= 0, got --w-con {args.w_con} --w-metric {args.w_metric} "
         f"--w-proto {args.w_proto}"),
        (not args.w_con + args.w_metric + args.w_proto > 0,
         "all three loss weights are 0: nothing to train"),
        (not args.w_con and args.proto_start_epoch > 0,
         f"--w-con 0 leaves nothing to train before --proto-start-epoch {args.proto_start_epoch} "
         "(those epochs are NT-Xent alone): drop one of the two"),
        (not 0 <= args.p_same <= 1, f"--p-same must be in [0, 1], got {args.p_same}"),
        (any(k < 2 for k in ks), f"--num-prototypes {args.num_prototypes}: each K must be >= 2"),
        *[(getattr(args, name) < 0,
           f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
          for name in ("proto_start_epoch", "knn_every", "train_subset", "stop_after", "workers",
                       "save_every")],
        (args.log_every < 1, f"--log-every must be >= 1, got {args.log_every}"),
        (args.pca_dim is not None and args.pca_dim < 0,
         f"--pca-dim must be >= 0, got {args.pca_dim}"),
        (args.kmeans_iters < 1, f"--kmeans-iters must be >= 1, got {args.kmeans_iters}"),
        (args.image_size < 8, f"--image-size must be >= 8, got {args.image_size}"),
        (args.download and args.dataset not in data.SMALL,
         f"--download fetches CIFAR only; put --dataset {args.dataset} in --data yourself"),
    ]
    return next((message for bad, message in problems if bad), None)


def fail(message, master=True):
    runtime.fail("train.py", message, master)


# ---------------------------------------------------------------------------------------------
# The steps of an epoch (main() below calls them in order)
# ---------------------------------------------------------------------------------------------

def feature_bank(args, model, views, N, epoch, rank, world, device, amp_dtype):
    """Collective: this rank's share of the training set's encoder features (a cluster.Shard,
    float16) in the evaluation view, or with --cluster-aug in one SimCLR augmentation (the paper,
    Sec. 3.2)."""
    model.eval()
    view, key = "eval", None
    if args.cluster_aug:
        view, key = "simclr", (args.seed, data.CLUSTER_VIEWS, epoch, rank)
    shard = cluster.split_shard(model.encoder, views, N, rank, world, device, amp_dtype, view, key)
    model.train()
    return shard


def prototype_assignments(args, epoch, ks, targets, shard, device):
    """Collective: each image's prototype under each of the H clusterings (Sec. 3.2): assignments
    int64 [N, H], identical on every rank, and the clustering's statistics. k-means of the ranks'
    shards of the features (cluster.distributed_kmeans); with --prototypes gt, the classes."""
    if args.prototypes == "gt":
        return targets[:, None], {}
    assignments, kmeans_stats = cluster.distributed_kmeans(
        shard.features, ks, len(targets), indices=shard.indices, seed=args.seed + epoch,
        niter=args.kmeans_iters, pca_dim=args.pca_dim, device=device)
    return assignments, {f"kmeans_k{k}": st for k, st in zip(ks, kmeans_stats)}


def head_optimizer(model, args):
    """Eq. 4's heads train on their own, as in the official code: plain SGD (no momentum) at a
    constant lr, outside LARS and its schedule, made anew with the heads after every clustering.
    Inside LARS a head re-drawn at N(0, 0.01) could not learn within an epoch: LARS moves a weight
    by about lr x eta = 0.2 % of its norm per step, and the cosine schedule takes lr to 0."""
    if not len(model.proto_heads):
        return None
    return torch.optim.SGD(model.proto_heads.parameters(), lr=args.head_lr * args.batch_size / 256,
                           weight_decay=args.weight_decay)


@torch.no_grad()
def centroid_heads(shard, assignments, ks, world, device, temperature=0.1):
    """Collective, --head-init centroids: row c of head j is cluster c's mean encoder feature,
    normalised and divided by temperature x the mean feature norm, so that a typical feature
    scores the clusters by cosine / 0.1 (DeepCluster-v2 copies its centroids into its prototype
    layer the same way, with this temperature). shard: this rank's cluster.Shard of the features;
    the per-cluster sums [K_j, F] and the norms are all-reduced, so no rank needs [N, F].
    assignments [N, H]. Returns one [K_j, F] float32 CPU tensor per K_j, identical on every rank."""
    group = dist.group.WORLD if world > 1 else None
    norms = torch.tensor([sum(float(chunk.float().norm(dim=1).sum())
                              for chunk in shard.features.split(65536)), len(shard.features)],
                         dtype=torch.float64, device=device)               # [sum of norms, n]
    if group is not None:
        dist.all_reduce(norms)
    norm = float(norms[0] / norms[1])
    return [cluster.cluster_means(shard.features, assignments[shard.indices, j], k, group=group,
                                  device=device) / (temperature * norm)
            for j, k in enumerate(ks)]


def restart_heads(args, epoch, model, ks, shard, assignments, world, device):
    """New k-means ids mean nothing to the old heads: start them, and their optimiser, over (Sec.
    3.5). Returns the heads' new optimiser."""
    weights = None
    if args.head_init == "centroids":
        weights = centroid_heads(shard, assignments, ks, world, device)
    model.reset_proto_heads(data.seeded_generator(args.seed, data.PROTO_HEADS, epoch), weights)
    return head_optimizer(model, args)


def epoch_prototypes(args, epoch, run, ks, targets, bank, previous, use_prototypes, rank, world,
                     device):
    """Step 1 of an epoch (Sec. 3.2): every image's prototype, assignments int64 [N, H] identical
    on every rank (singletons, i.e. uniformly random pairs, for plain SimCLR epochs), with the
    prototype heads started over; and the epoch's statistics line so far (clustering, NMI)."""
    stats, model = {"epoch": epoch + 1}, run["model"]     # the epoch counted from 1
    if not use_prototypes:
        return torch.arange(len(targets))[:, None], stats
    shard = None
    if args.prototypes == "kmeans":
        start = time.time()
        # bank: this rank's shard of the last kNN pass's features, made with the weights this
        # epoch starts from.
        shard = bank if bank is not None else feature_bank(
            args, model, run["views"], len(targets), epoch, rank, world, device, run["amp_dtype"])
        stats["feature_seconds"] = time.time() - start
    start = time.time()
    assignments, cluster_stats = prototype_assignments(args, epoch, ks, targets, shard, device)
    stats.update(cluster_stats)
    if args.prototypes == "kmeans":
        stats["cluster_seconds"] = time.time() - start + stats["feature_seconds"]
        if rank == 0:
            first = assignments[:, 0].numpy()                    # the first K's partition
            stats["nmi_gt"] = cluster.nmi(first, targets.numpy())
            stats["same_class_pairs"] = cluster.same_class_pairs(first, targets.numpy())
            if previous is not None and previous.shape == assignments.shape:
                stats["nmi_prev"] = cluster.nmi(first, previous[:, 0].numpy())
    # k-means heads restart after every clustering; a ground-truth head starts once.
    if args.w_proto and (args.prototypes == "kmeans" or args.renew_gt_head
                         or epoch == args.proto_start_epoch):
        run["proto_optimizer"] = restart_heads(args, epoch, model, ks, shard, assignments, world,
                                               device)
    return assignments, stats


def pair_batches(sampler):
    """The sampler's (anchor, partner, same) triples -> index batches [2P]: P anchors, then
    partners."""
    for triples in sampler:
        t = torch.tensor(triples)                              # P x 3
        yield torch.cat([t[:, 0], t[:, 1]])                    # 2P


def train_one_epoch(args, epoch, run, assignments, use_prototypes, rank, world, device,
                    partial=None, save_partial=None):
    """One pass over the training set on Eq. 5 (LARS for the network, its own SGD for the prototype
    heads), from step partial["step"] on when a run resumes inside the epoch.

    The steady state never waits for the device: each step's losses stay there, in a [steps,
    terms] table, and every --log-every steps one read all-reduces and checks the new rows (a
    non-finite loss stops the run, reporting its first step) and updates the bar. Every
    --save-every steps, the rows are checked and save_partial(state) writes a checkpoint inside the
    epoch. (fp16 loss scaling, on GPUs before Ampere, still reads its inf check every step: that
    sync is GradScaler's.) Returns the epoch's statistics: mean losses, over the last 20 steps too,
    lr, speed."""
    model, optimizer, proto_optimizer, scaler = (run["model"], run["optimizer"],
                                                 run["proto_optimizer"], run["scaler"])
    sampler, steps = run["sampler"], len(run["sampler"])
    term_names = (["con"] if args.w_con else []) \
        + (["metric"] if use_prototypes and args.w_metric else []) \
        + (["proto"] if use_prototypes and args.w_proto else [])
    names = ["total"] + term_names
    done = partial["step"] if partial else 0
    history = torch.zeros(steps, len(names), device=device)   # each step's losses, mean of ranks
    if partial:
        history[:done] = partial["history"].to(device)
    checked, seconds_before = done, partial["seconds"] if partial else 0.0
    on_device = assignments.to(device)                         # N x H: looked up on the device
    model.train()
    bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch + 1}/{args.epochs}",
               disable=rank != 0, dynamic_ncols=True, leave=False)
    start = time.time()
    batches = run["views"].batches(itertools.islice(pair_batches(sampler), done, None), "simclr",
                                   key=(args.seed, data.TRAIN_VIEWS, epoch, rank), copies=2,
                                   start=done)
    for i, ((v1, v2), _, idx) in enumerate(batches, done):         # v1, v2: 2P x 3 x S x S
        progress["step"] = i + 1
        lr = runtime.cosine_lr(epoch * steps + i, run["total_steps"], run["base_lr"],
                               run["warmup_steps"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch_assignments = on_device[data.to_device(idx, device)]          # 2P x H
        P = len(idx) // 2
        same = (batch_assignments[:P, 0] == batch_assignments[P:, 0]).long()       # P
        v1 = v1.contiguous(memory_format=torch.channels_last)
        v2 = v2.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=run["amp_dtype"],
                            enabled=run["amp_dtype"] is not None):
            loss, terms = run["step_module"](v1, v2, same, batch_assignments, use_prototypes)
        history[i] = torch.stack([loss.detach()] + [terms[n] for n in term_names]).float()
        model.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        if proto_optimizer is not None and use_prototypes and args.w_proto:
            scaler.step(proto_optimizer)
        scaler.update()
        bar.update()
        save_now = save_partial is not None and args.save_every and (i + 1) % args.save_every == 0
        if (i + 1) % args.log_every == 0 or i + 1 == steps or save_now:
            rows = history[checked:i + 1]              # one read of the device, every N steps
            if world > 1:
                dist.all_reduce(rows)
                rows /= world
            rows = rows.tolist()
            stop_if_not_finite(rows, names, epoch, checked, steps, rank)
            checked = i + 1
            bar.set_postfix_str(" ".join(f"{n}={v:.3f}" for n, v in zip(["loss"] + term_names,
                                                                        rows[-1]))
                                + f" lr={lr:.3g} img/s="
                                  f"{(i + 1 - done) * len(v1) * world / (time.time() - start):.0f}")
        if save_now and i + 1 < steps:
            save_partial({"step": i + 1, "history": history[:i + 1].cpu(),
                          "seconds": seconds_before + time.time() - start})
    bar.close()
    seconds = seconds_before + time.time() - start
    last = history[-20:]                              # the last steps: how far a fresh head got
    stats = {f"loss_{n}": v for n, v in zip(names, history.mean(0).tolist())}
    stats.update({f"loss_{n}_last{len(last)}": v for n, v in zip(names, last.mean(0).tolist())})
    stats.update(lr=lr, images_per_second=steps * args.batch_size / seconds, train_seconds=seconds,
                 images_seen=(epoch + 1) * steps * args.batch_size)
    return stats


def stop_if_not_finite(rows, names, epoch, first, steps, rank):
    """Stop at the first of rows (steps first + 1, ...) whose losses are not all finite, saying
    which step and which term; the last checkpoint, written before those steps, is kept. Under
    torchrun with --max-restarts the job ends: a restart would only meet the same NaN."""
    for j, values in enumerate(rows):
        if not all(math.isfinite(v) for v in values):
            named = ", ".join(f"{n}={v:.4g}" for n, v in zip(names, values))
            runtime.end_job("train.py", f"non-finite loss at epoch {epoch + 1} step "
                            f"{first + j + 1}/{steps}: {named}; the last good checkpoint is "
                            f"{progress['checkpoint']} (try a lower --lr)", rank == 0)


@torch.no_grad()
def similarity_probe(model, views, targets, device, size=2048):
    """The TP / FN / TN similarities of the paper's Fig. 2b, measured the same way for every
    method: the mean cosine similarity between the two views of an image (true positives), of two
    images of one class (false negatives) and of two classes (true negatives), over a fixed set of
    training images with fixed views (the same every epoch), in eval mode; in projection space z
    (sim_tp, ...), as the paper, and on the encoder features h that Eq. 3-4 and the linear probe
    read (sim_tp_h, ...). A kind of pair that the set lacks (two classes in a one-class dataset)
    gives None."""
    g = torch.Generator().manual_seed(4321)
    idx = torch.randperm(len(targets), generator=g)[:size].sort().values
    targets = targets[idx].to(device)
    model.eval()
    (x1, x2), _, _ = next(iter(views.batches([idx], "simclr", key=g, copies=2)))
    outputs = [[model(v.contiguous(memory_format=torch.channels_last)) for v in x.split(512)]
               for x in (x1, x2)]
    model.train()
    same_class = targets[:, None] == targets[None, :]
    other = ~torch.eye(len(idx), dtype=torch.bool, device=device)
    mean = lambda x: x.mean().item() if x.numel() else None      # None (JSON null): no such pair
    stats = {}
    for which, suffix in ((1, ""), (0, "_h")):                    # z, then h
        a, b = (F.normalize(torch.cat([out[which] for out in view]).float(), dim=1)
                for view in outputs)                               # M x D each
        sim = a @ b.T                                              # M x M: view 1 of i, 2 of j
        stats.update({f"sim_tp{suffix}": mean(sim.diagonal()),
                      f"sim_fn{suffix}": mean(sim[same_class & other]),
                      f"sim_tn{suffix}": mean(sim[~same_class])})
    return stats


def monitor(args, epoch, model, views, test_views, targets, test_targets, num_classes, rank,
            world, device, amp_dtype):
    """kNN top-1 on the test set every --knn-every epochs and after the last (Wu et al. 2018), and
    the similarity probe. Returns (stats, this rank's cluster.Shard of the kNN pass's train
    features, or None when the kNN did not run): made with the weights the next epoch starts from,
    they serve its clustering. The kNN alone gathers [N, F] onto rank 0, for as long as it runs."""
    stats, shard = {}, None
    ran = bool(args.knn_every) and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs)
    if ran:
        model.eval()
        shard = cluster.split_shard(model.encoder, views, len(targets), rank, world, device,
                                    amp_dtype)
        features = cluster.gather_features(shard, len(targets), device)[0]
        test_features = cluster.split_features(model.encoder, test_views, len(test_targets), rank,
                                               world, device, amp_dtype)[0]
        model.train()
        if rank == 0:
            stats["knn_top1"] = cluster.knn_top1(features, targets, test_features, test_targets,
                                                 num_classes=num_classes)
    if rank == 0:
        stats.update(similarity_probe(model, views, targets, device))
    return stats, shard


def schedule_changes(saved, config):
    """The flags of SCHEDULE that differ between a checkpoint's config and this run's, as text."""
    return [f"--{k.replace('_', '-')} {saved.get(k)} -> {config[k]}" for k in SCHEDULE
            if saved.get(k) != config[k]]


def read_train_checkpoint(path, master):
    """train.py's checkpoint at path, or a one-line stop (the file is never overwritten) when it is
    unreadable, not a train.py checkpoint, or of an older format."""
    try:
        ckpt = runtime.read_checkpoint(path)
    except ValueError as e:
        previous = runtime.previous_path(path)
        fail(f"{e}; move it away to start afresh"
             + (f", or replace it with {previous}, the checkpoint before it, to resume from there"
                if os.path.exists(previous) else ""), master)
    if not isinstance(ckpt, dict) or not {"config", "model", "optimizer", "epoch"} <= set(ckpt):
        fail(f"{path} is not a train.py checkpoint (an exported encoder?); use another --out",
             master)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        fail(f"{path} was written by an older train.py (format {ckpt.get('format', 1)}, "
             "prototype heads inside LARS), whose optimiser state does not fit this one "
             f"(format {CHECKPOINT_FORMAT}); use another --out", master)
    ckpt["config"] = {**OLDER, **ckpt["config"]}
    return ckpt


def load_checkpoint(path, config, master):
    """train.py's checkpoint at path (read_train_checkpoint), or a one-line stop when it is of
    another configuration (any flag but OPERATIONAL and SCHEDULE) or of another schedule
    (SCHEDULE) without --allow-schedule-change."""
    ckpt = read_train_checkpoint(path, master)
    check_config(path, ckpt["config"], config,
                 [k for k in config if k not in OPERATIONAL + SCHEDULE], master)
    return ckpt


def check_config(path, saved, config, keys, master):
    """Stop with one line when one of keys (those in config) differs between a checkpoint's config
    and this run's, or when the schedule does without --allow-schedule-change."""
    differs = [f"{k}: checkpoint {saved.get(k)!r}, now {config[k]!r}" for k in keys
               if k in config and saved.get(k) != config[k]]
    if differs:
        fail(f"{path} was trained with another configuration ({'; '.join(differs)}); "
             "use another --out or the same flags", master)
    changes = schedule_changes(saved, config)
    if changes and not config["allow_schedule_change"]:
        fail(f"{path} was trained on another learning-rate schedule ({', '.join(changes)}); "
             "resume with the checkpoint's flags, or add --allow-schedule-change to re-plan the "
             "schedule from here", master)


def fork_point(args, config, master):
    """--fork-from: the checkpoint a branch starts from, which may differ from this run in its
    loss and prototype flags (K, the prototype terms switched on, --w-con, --contrast, ...), and
    only in those. That is safe because the prototypes had not started when it was written: what
    it holds (encoder and projection weights, their LARS state, the schedule's position, the
    random states) does not depend on the prototype configuration, its heads had no gradient yet,
    and its pairs were uniformly random. The branch makes its own heads (the metric head as at
    the start of a run, the prototype heads at its first clustering), so it equals a run that had
    its flags from the start, as long as the epochs before were trained alike (a SimCLR trunk
    with --contrast per-side for SPCL's warm-up epochs; tested). A one-line stop otherwise."""
    path = args.fork_from
    ckpt = read_train_checkpoint(path, master)
    saved, epoch = ckpt["config"], ckpt["epoch"]
    check_config(path, saved, config, NETWORK, master)
    if ckpt.get("partial"):
        fail(f"--fork-from {path} was written inside epoch {epoch + 1}: fork from a checkpoint "
             "written at the end of an epoch", master)
    if (saved["w_metric_on"] or saved["w_proto_on"]) and epoch > saved["proto_start_epoch"]:
        fail(f"--fork-from {path} trained with prototypes from epoch "
             f"{saved['proto_start_epoch'] + 1}: a branch starts from a checkpoint whose "
             "prototypes have not started (a SimCLR run's, or one from before "
             "--proto-start-epoch)", master)
    if uses_prototypes(args) and args.proto_start_epoch < epoch:
        fail(f"--fork-from {path} holds {epoch} epochs without prototypes: give "
             f"--proto-start-epoch {epoch} (or later)", master)
    return ckpt


def copy_metrics(source, path, epochs):
    """A fork's metrics.jsonl: the lines of the first `epochs` epochs of source, when it exists."""
    if not os.path.exists(source):
        return
    def epoch(line):
        try:
            return json.loads(line)["epoch"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return math.inf                            # a torn or foreign line: left out
    with open(source) as f:
        lines = [line for line in f if epoch(line) <= epochs]
    with open(path, "w") as f:
        f.writelines(lines)


def trim_metrics(path, epochs_done, master):
    """Keep the lines of metrics.jsonl for the epochs the checkpoint holds (1..epochs_done): a crash
    between the log and the checkpoint leaves the line of an epoch that will be redone, a crash
    during the append a half-written last line. Rewritten atomically when something is dropped."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept, dropped = [], []
    for number, line in enumerate(lines, 1):
        try:
            epoch = json.loads(line)["epoch"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if number < len(lines):
                fail(f"{path} line {number} is not a JSON line of train.py; repair or delete "
                     "that line", master)
            dropped.append(f"its half-written last line {line.strip()[:40]!r}")
            continue
        if epoch <= epochs_done:
            kept.append(line)
        else:
            dropped.append(f"the line of epoch {epoch} (after the checkpoint, so redone)")
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        print(f"{path}: dropped {'; '.join(dropped)}")


# ---------------------------------------------------------------------------------------------
# Set-up: flags, resume point, data, model
# ---------------------------------------------------------------------------------------------

def resume_point(args, config, world, device, master):
    """The checkpoint in --out to resume from (None: start afresh), the same on every rank."""
    path = progress["checkpoint"]
    ckpt = load_checkpoint(path, config, master) if os.path.exists(path) else None
    done = ckpt["epoch"] if ckpt else 0
    if world > 1:
        # Every rank must have read the same checkpoint: --out on a filesystem all nodes share.
        epochs = torch.tensor([done, -done], device=device)
        dist.all_reduce(epochs, op=dist.ReduceOp.MAX)
        if epochs[0] != -epochs[1]:
            fail(f"ranks found different checkpoints in --out {args.out} (epochs "
                 f"{-int(epochs[1])} to {int(epochs[0])}): put --out on a filesystem shared by "
                 "all nodes", master)
    return ckpt


def load_data(args, world, master):
    """(train set, test set or None): test only for the kNN monitor."""
    if args.download and world > 1 and not master:
        dist.barrier()                        # rank 0 downloads first
    try:
        train_set = data.load_dataset(args.dataset, args.data, train=True,
                                      download=args.download and master, workers=args.workers)
        test_set = (data.load_dataset(args.dataset, args.data, train=False, workers=args.workers)
                    if args.knn_every else None)
    except data.DataNotFound as e:
        hint = (f", or add --download to fetch {args.dataset} there"
                if args.dataset in data.SMALL and not args.download else "")
        fail(f"{e}{hint}", master)
    except (ValueError, RuntimeError, OSError) as e:
        fail(str(e), master)
    if args.download and world > 1 and master:
        dist.barrier()
    try:
        train_set = data.subset(train_set, args.train_subset, seed=1234)
    except ValueError as e:
        fail(f"--train-subset: {e}", master)
    return train_set, test_set


def prototype_numbers(args, config, ckpt, forked, num_classes, N, master):
    """The K of each prototype head: --num-prototypes, or the number of classes with
    --prototypes gt."""
    ks = config["num_prototypes"] = ([num_classes] if args.prototypes == "gt"
                                     else prototype_counts(args.num_prototypes))
    if (args.prototypes == "gt" and ckpt and not forked
            and ckpt["config"].get("num_prototypes") != ks):
        fail(f"{progress['checkpoint']} was trained with another configuration (num_prototypes: "
             f"checkpoint {ckpt['config'].get('num_prototypes')!r}, now {ks!r}); use another "
             "--out or the same flags", master)
    if ((args.w_metric or args.w_proto) and args.prototypes == "kmeans"
            and not all(2 <= k < N for k in ks)):
        fail(f"--num-prototypes {args.num_prototypes}: each K must satisfy 2 <= K < N = {N} "
             "images", master)
    if args.batch_size > N:
        fail(f"--batch-size {args.batch_size} exceeds the {N} training images", master)
    return ks


def build(args, ks, N, rank, world, device):
    """The network, the module DDP wraps, LARS for the network and SGD for the prototype heads,
    the fp16 loss scaler, and the schedule: the training state that main() passes around."""
    cuda = device.type == "cuda"
    model = SPCLModel(args.arch, cifar_stem=args.image_size <= 64,
                      num_prototypes=ks if args.w_proto else (), heads_on=args.heads_on)
    if not args.w_metric:
        model.metric_head = None
    if world > 1 and cuda:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last)
    if args.pca_dim is None:
        args.pca_dim = min(256, model.feature_dim // 2)    # whitening at full rank would make
                                                            # noise signal
    step_module = TrainingStep(model, w_con=args.w_con, w_metric=args.w_metric,
                               w_proto=args.w_proto, temperature=args.temperature,
                               contrast=args.contrast, proto_loss=args.proto_loss,
                               same_image_pairs=not args.no_same_image_pairs,
                               group=dist.group.WORLD if world > 1 else None)
    if world > 1:
        # Heads idle during the SimCLR warm-up, or the projector with --w-con 0, get no gradient:
        # only then must DDP search the graph for unused parameters.
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if cuda else None,
            find_unused_parameters=((uses_prototypes(args) and args.proto_start_epoch > 0)
                                    or not args.w_con))
    base_lr = args.lr * args.batch_size / 256
    heads = {id(p) for p in model.proto_heads.parameters()}
    amp_dtype = runtime.autocast_dtype(device)
    sampler = PrototypePairSampler(torch.arange(N), args.batch_size, world, rank, seed=args.seed,
                                   p_same=args.p_same)
    return {"model": model, "step_module": step_module, "base_lr": base_lr, "amp_dtype": amp_dtype,
            "optimizer": LARS([p for p in model.parameters() if id(p) not in heads], lr=base_lr,
                              weight_decay=args.weight_decay),
            "proto_optimizer": head_optimizer(model, args),
            "scaler": torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
            "sampler": sampler, "total_steps": args.epochs * len(sampler),
            "warmup_steps": round(args.warmup_epochs * len(sampler))}


HEADS = ("metric_head.", "proto_heads.")


def lars_names(model):
    """The names of the parameters LARS trains, in its order: all but the prototype heads."""
    return [n for n, _ in model.named_parameters() if not n.startswith("proto_heads.")]


def load_forked(run, ckpt, master):
    """A fork's start (fork_point): the checkpoint's network without its heads, the LARS state of
    the parameters both runs have (matched by name), no head optimiser (made at the first
    clustering)."""
    model = run["model"]
    missing, _ = model.load_state_dict({k: v for k, v in ckpt["model"].items()
                                        if not k.startswith(HEADS)}, strict=False)
    if [k for k in missing if not k.startswith(HEADS)]:
        fail(f"--fork-from: the checkpoint lacks {describe_keys(missing)}", master)
    saved, names = ckpt.get("lars_params"), lars_names(model)
    if saved is None:                  # older checkpoints: only when both trained the same list
        if len(ckpt["optimizer"]["param_groups"][0]["params"]) != len(names):
            fail("--fork-from: the checkpoint predates the names of its LARS parameters and "
                 "trained other heads; fork from a checkpoint of this train.py", master)
        saved = names
    index = {name: i for i, name in enumerate(saved)}
    group = dict(ckpt["optimizer"]["param_groups"][0], params=list(range(len(names))))
    state = {i: ckpt["optimizer"]["state"][index[n]] for i, n in enumerate(names)
             if n in index and index[n] in ckpt["optimizer"]["state"]}
    run["optimizer"].load_state_dict({"state": state, "param_groups": [group]})


def restore(args, run, ckpt, config, forked, rank, master):
    """Load a checkpoint into the training state (a fork's through load_forked). Returns the
    k-means assignments of its last epoch (for nmi_prev), or None when it had none."""
    if forked:
        load_forked(run, ckpt, master)
    else:
        run["model"].load_state_dict(ckpt["model"])
        run["optimizer"].load_state_dict(ckpt["optimizer"])
        if run["proto_optimizer"] is not None:
            run["proto_optimizer"].load_state_dict(ckpt["proto_optimizer"])
    if ckpt["scaler"]:        # empty when saved without fp16 loss scaling (CPU, bf16 GPUs)
        run["scaler"].load_state_dict(ckpt["scaler"])
    # Training draws its randomness from generators seeded by (seed, stream, epoch, rank, ...);
    # each rank's global state is restored too, for code that adds draws of its own (a checkpoint
    # of an older train.py holds rank 0's only).
    states = ckpt["rng"]["cpu"]
    if isinstance(states, list) and rank < len(states):
        torch.set_rng_state(states[rank])
    elif master and torch.is_tensor(states):
        torch.set_rng_state(states)
    start_epoch, partial = ckpt["epoch"], ckpt.get("partial")
    # The flags this run changes, recorded with the epoch they take effect from: the checkpoint's
    # config is the latest run's, and its changes give every earlier epoch's.
    changed = {k: [ckpt["config"].get(k), v] for k, v in config.items()
               if k not in OPERATIONAL and ckpt["config"].get(k) != v}
    run["changes"] = ckpt.get("changes", []) + (
        [{"epoch": start_epoch + 1, "flags": changed}] if changed else [])
    if master:
        where = (f"at step {partial['step']} of epoch {start_epoch + 1}" if partial
                 else f"after epoch {start_epoch}")
        print(f"{'forked from ' + args.fork_from if forked else 'resumed from ' + progress['checkpoint']}"
              f" {where} of {args.epochs}"
              + (f"; changed: {', '.join(f'{k} {a} -> {b}' for k, (a, b) in changed.items())}"
                 if changed else ""))
        rescheduled = schedule_changes(ckpt["config"], config)
        if rescheduled:
            now = runtime.cosine_lr(start_epoch * len(run["sampler"]), run["total_steps"],
                                    run["base_lr"], run["warmup_steps"])
            print(f"warning: the learning-rate schedule is re-planned ({', '.join(rescheduled)}): "
                  f"the lr goes from {ckpt['optimizer']['param_groups'][0]['lr']:.4g} at the "
                  f"checkpoint's last step to {now:.4g} now")
    if not forked and uses_prototypes(args) and start_epoch > ckpt["config"]["proto_start_epoch"]:
        return ckpt["assignments"]        # else the SimCLR epochs' singletons: no clustering
    return None


def save(args, run, epoch, assignments, stats, config, world, master, partial=None):
    """Write checkpoint.pth atomically, keeping the one before as checkpoint.prev.pth (rank 0; every
    rank calls it, for its random state). At the end of an epoch (partial None) first append the
    epoch's line to metrics.jsonl; inside an epoch, partial holds train_one_epoch's state."""
    rng = [torch.get_rng_state()]
    if world > 1:
        rng = [None] * world
        dist.all_gather_object(rng, torch.get_rng_state())
    if not master:
        return
    if partial is None:
        with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(stats) + "\n")
    else:
        partial = dict(partial, stats=stats)
    runtime.atomic_save({"format": CHECKPOINT_FORMAT, "model": run["model"].state_dict(),
                         "optimizer": run["optimizer"].state_dict(),
                         "proto_optimizer": (run["proto_optimizer"].state_dict()
                                             if run["proto_optimizer"] else None),
                         "scaler": run["scaler"].state_dict(),
                         "epoch": epoch + 1 if partial is None else epoch, "partial": partial,
                         "assignments": assignments, "rng": {"cpu": rng}, "config": config,
                         "changes": run.get("changes", []),
                         "lars_params": lars_names(run["model"])},
                        progress["checkpoint"], keep_previous=True)
    progress.update(saved_epoch=epoch + 1 if partial is None else epoch,
                    saved_step=partial["step"] if partial else 0)
    if partial is None:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()
                          if not isinstance(v, dict)}))


def main(argv=None):
    args = get_args(argv)
    rank, world, device = runtime.setup_script("train.py", args.timeout)
    master = rank == 0
    torch.manual_seed(args.seed + rank)
    torch.backends.cudnn.benchmark = device.type == "cuda"     # fixed shapes: pick the fastest
    problem = check_args(args, world)
    if problem:
        fail(problem, master)
    why = runtime.check_writable(args.out)
    if why:
        fail(f"--out {args.out!r} cannot be written ({why}); give a folder you can write to",
             master)
    progress.update(epoch=None, epochs=args.epochs, step=None, steps=None, saved_epoch=0,
                    saved_step=0, checkpoint=os.path.join(args.out, "checkpoint.pth"))

    # ---- resume: the checkpoint is read before the data, so a finished or refused run
    # costs nothing
    config = dict(vars(args), num_prototypes=prototype_counts(args.num_prototypes),
                  w_metric_on=bool(args.w_metric), w_proto_on=bool(args.w_proto))
    if args.prototypes == "gt":
        del config["num_prototypes"]          # one per class: known once the data is loaded
    ckpt = resume_point(args, config, world, device, master)
    forked = ckpt is None and bool(args.fork_from)
    if forked:
        ckpt = fork_point(args, config, master)
        if master:
            copy_metrics(os.path.join(os.path.dirname(args.fork_from), "metrics.jsonl"),
                         os.path.join(args.out, "metrics.jsonl"), ckpt["epoch"])
    start_epoch = progress["saved_epoch"] = ckpt["epoch"] if ckpt else 0
    progress["saved_step"] = ckpt["partial"]["step"] if ckpt and ckpt.get("partial") else 0
    if start_epoch >= args.epochs:
        if master:
            print(f"{args.out} is finished: {progress['checkpoint']} holds epoch {start_epoch} of "
                  f"{args.epochs}, nothing to do (evaluate it with linear_eval.py, or train on "
                  "with a larger --epochs and --allow-schedule-change)")
        if world > 1:
            dist.destroy_process_group()
        return
    if master:
        trim_metrics(os.path.join(args.out, "metrics.jsonl"), start_epoch, master)

    # ---- data, model, optimisers ------------------------------------------------------------
    train_set, test_set = load_data(args, world, master)
    targets, num_classes = torch.as_tensor(train_set.targets), len(train_set.classes)
    ks = prototype_numbers(args, config, ckpt, forked, num_classes, len(targets), master)
    run = build(args, ks, len(targets), rank, world, device)
    mean_std = data.MEAN_STD.get(args.dataset, data.MEAN_STD["imagenet"])
    run["views"] = data.Views(train_set, args.image_size, mean_std, args.jitter, args.workers,
                              device)
    test_views = data.Views(test_set, args.image_size, mean_std, workers=args.workers,
                            device=device) if test_set else None
    model, amp_dtype = run["model"], run["amp_dtype"]
    if master:
        n_params = sum(p.numel() for p in model.parameters())
        n_scaled = sum(p.numel() for p in model.parameters() if p.ndim > 1)
        print(f"{args.arch}: {n_params / 1e6:.2f}M parameters, {n_scaled / 1e6:.2f}M with weight "
              f"decay and trust ratio; {len(targets)} images, world size {world}, device {device}, "
              f"AMP {amp_dtype}")
    previous = restore(args, run, ckpt, config, forked, rank, master) if ckpt else None
    progress["steps"] = len(run["sampler"])

    # ---- the algorithm: per epoch, prototypes, one epoch of Eq. 5, monitor, checkpoint ------
    # This rank's shard of the last kNN pass's train features, made with the weights the next
    # epoch starts from, so that its clustering needs no feature pass of its own; or None.
    bank = None
    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.time()
        progress.update(epoch=epoch + 1, step=0)
        use_prototypes = uses_prototypes(args) and epoch >= args.proto_start_epoch
        partial = ckpt.get("partial") if ckpt and epoch == start_epoch else None

        # 1. Prototypes (Sec. 3.2): every image's cluster, or singletons for plain SimCLR. A run
        # resumed inside the epoch finds them, and the epoch's statistics so far, in its checkpoint.
        if partial:
            assignments, stats = ckpt["assignments"], partial["stats"]
        else:
            assignments, stats = epoch_prototypes(args, epoch, run, ks, targets, bank, previous,
                                                  use_prototypes, rank, world, device)
        bank = None              # 0.66 GB a rank at ImageNet size, not needed while training
        run["sampler"].set_assignments(assignments[:, 0])
        run["sampler"].set_epoch(epoch)

        # 2. One epoch of Eq. 5, checkpointed every --save-every steps.
        def save_partial(state):
            save(args, run, epoch, assignments, stats, config, world, master, partial=state)
        stats.update(train_one_epoch(args, epoch, run, assignments, use_prototypes, rank, world,
                                     device, partial, save_partial))

        # 3. Monitor, log, checkpoint.
        monitor_stats, knn_shard = monitor(
            args, epoch, model, run["views"], test_views, targets,
            torch.as_tensor(test_set.targets) if test_set else None, num_classes, rank, world,
            device, amp_dtype)
        bank = None if args.cluster_aug else knn_shard     # --cluster-aug: augmented views
        stats.update(monitor_stats)
        stats["epoch_seconds"] = time.time() - epoch_start
        save(args, run, epoch, assignments, stats, config, world, master)
        previous = assignments if use_prototypes else None
        if world > 1:
            dist.barrier()
        if args.stop_after and epoch + 1 - start_epoch >= args.stop_after:
            break
    if world > 1:
        dist.destroy_process_group()


def interrupted_message():
    """The line Ctrl-C ends with: where training stood and how to go on."""
    p = progress
    where = ("before training" if not p["epoch"] else f"in epoch {p['epoch']}/{p['epochs']} "
             + (f"at step {p['step']}/{p['steps']}" if p["step"] else "before its first step"))
    if p["saved_epoch"] or p["saved_step"]:
        held = (f"epoch {p['saved_epoch'] + 1} step {p['saved_step']}" if p["saved_step"]
                else f"after epoch {p['saved_epoch']}")
        return (f"train.py: interrupted {where}; the last checkpoint is {p['checkpoint']} "
                f"({held}); run the same command to resume")
    return f"train.py: interrupted {where}; no checkpoint yet, so the same command starts afresh"


if __name__ == "__main__":
    runtime.run_script(main, "train.py", interrupted_message)
