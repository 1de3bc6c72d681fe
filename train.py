"""SPCL pre-training (SPEC.md): one process on a laptop, or DDP under torchrun.

    python train.py --dataset cifar10 --data ./data --arch resnet18_narrow --epochs 20
    torchrun --nproc_per_node 8 train.py --dataset imagenet --data /path/to/imagenet

Each epoch: cluster the training set (rank 0 runs faiss k-means on every image's features and
broadcasts the prototypes) -> build same/cross-prototype pair batches -> re-initialise the
prototype heads -> train on Eq. 5 with LARS. `--w-metric 0 --w-proto 0` is plain SimCLR (no
clustering, random batches). `--out DIR` holds checkpoint.pth (resumed automatically) and
metrics.jsonl (one JSON line per epoch, numbered from 1). Ctrl-C stops with a line saying how to resume.
"""
import argparse
import collections
import json
import math
import os
import sys
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
from models import ARCHS, SPCLModel, TrainingStep
from sampler import PairDataset, PrototypePairSampler

# Defaults that differ by dataset; CIFAR's are the official code's (SPEC.md, "Hyper-parameters").
DATASET_DEFAULTS = {
    # Colour jitter 0.5 is SimCLR's CIFAR recipe; the official SPCL config uses 1.0 (as ImageNet).
    "cifar10": dict(arch="resnet18", epochs=1000, batch_size=512, num_prototypes="512", temperature=0.5, image_size=32,
                    jitter=0.5),
    "cifar100": dict(arch="resnet18", epochs=1000, batch_size=512, num_prototypes="512", temperature=0.5, image_size=32,
                     jitter=0.5),
    # ImageNet: SimCLR's ResNet-50 recipe (temperature 0.1 at large batch), one prototype per class.
    "imagenet": dict(arch="resnet50", epochs=200, batch_size=1024, num_prototypes="1000", temperature=0.1, image_size=224,
                     jitter=1.0),
    "folder": dict(arch="resnet50", epochs=200, batch_size=256, num_prototypes="100", temperature=0.5, image_size=224,
                   jitter=1.0),
}
# Format 2: the prototype heads have an optimiser of their own (format 1 had them inside LARS).
CHECKPOINT_FORMAT = 2
# A checkpoint is refused when one of these differs from the current run.
STRUCTURAL = ("arch", "dataset", "image_size", "num_prototypes", "prototypes", "w_metric_on", "w_proto_on")
# These re-plan the learning-rate schedule: refused on resume unless --allow-schedule-change.
SCHEDULE = ("epochs", "batch_size", "lr", "warmup_epochs", "train_subset")
# Where training stands, for the one line that Ctrl-C ends with (the end of this file).
progress = {"epoch": None, "epochs": None, "step": None, "steps": None, "checkpoint": None, "saved_epoch": 0}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10", choices=data.DATASETS)
    p.add_argument("--data", default="./data", help="dataset root (see README, 'Data')")
    p.add_argument("--download", action="store_true", help="fetch CIFAR into --data (created) if missing")
    p.add_argument("--out", default="runs/spcl", help="folder for checkpoint.pth and metrics.jsonl")
    p.add_argument("--arch", help=f"encoder: {', '.join(ARCHS)} (default: per dataset)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="GLOBAL batch in images (pairs = half of it)")
    p.add_argument("--lr", type=float, default=1.0, help="base LARS lr, scaled by batch/256")
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--warmup-epochs", type=float, default=10)
    p.add_argument("--temperature", type=float, help="NT-Xent temperature")
    p.add_argument("--image-size", type=int)
    p.add_argument("--jitter", type=float, help="colour-jitter strength s (0.8s, 0.8s, 0.8s, 0.2s; default: "
                                                "CIFAR 0.5 as SimCLR's CIFAR recipe, ImageNet 1.0; official SPCL: 1.0)")
    # Eq. 5 and Table 2.
    p.add_argument("--w-con", type=float, default=1.0, help="weight of NT-Xent (Eq. 1-2)")
    p.add_argument("--w-metric", type=float, default=1.0, help="weight of the Siamese metric loss (Eq. 3)")
    p.add_argument("--w-proto", type=float, default=1.0, help="weight of the prototype CE (Eq. 4)")
    p.add_argument("--proto-loss", choices=("ce", "sce"), default="ce", help="plain or symmetric CE (Eq. 4)")
    p.add_argument("--contrast", choices=CONTRAST_MODES,
                   help="which views share NT-Xent's softmax (losses.spcl_loss); default: per-side for "
                        "SPCL, joint (all views, standard SimCLR) with --w-metric 0 --w-proto 0")
    p.add_argument("--head-lr", type=float, default=1.0,
                   help="lr of the prototype heads' own SGD (constant, no momentum), scaled by batch/256")
    p.add_argument("--head-init", choices=("random", "centroids"), default="random",
                   help="prototype heads after each clustering: N(0, 0.01), or each row the cluster's mean feature")
    p.add_argument("--prototypes", choices=("kmeans", "gt"), default="kmeans",
                   help="k-means clusters, or the ground-truth classes (Table 2's SPCL (GT))")
    p.add_argument("--num-prototypes", help="K, or a comma list for several clusterings (one head each)")
    p.add_argument("--p-same", type=float, default=0.5, help="share of same-prototype pairs in a batch")
    p.add_argument("--no-same-image-pairs", action="store_true",
                   help="Eq. 3 on the cross-image pairs only (the official code adds (a, a') and (b, b'))")
    p.add_argument("--cluster-aug", action="store_true",
                   help="cluster features of one random augmentation (the paper) instead of the eval view")
    p.add_argument("--pca-dim", type=int,
                   help="PCA-whitening before k-means; 0 = off (default: min(256, F / 2), F the feature size)")
    p.add_argument("--kmeans-iters", type=int, default=20)
    p.add_argument("--proto-start-epoch", type=int, default=0,
                   help="N epochs of plain SimCLR first, while clusters are still noise; prototypes from epoch N+1")
    p.add_argument("--knn-every", type=int, default=0, help="kNN top-1 on the test set every N epochs; 0 = never")
    p.add_argument("--train-subset", type=int, default=0, help="train on a fixed random subset of N images")
    p.add_argument("--stop-after", type=int, default=0,
                   help="exit after this many epochs of this run (a job slot shorter than the schedule)")
    p.add_argument("--allow-schedule-change", action="store_true",
                   help="resume although --epochs, --lr, --batch-size, --warmup-epochs or --train-subset differ "
                        "from the checkpoint's (the lr schedule is re-planned)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.contrast is None:
        args.contrast = "per-side" if args.w_metric or args.w_proto else "joint"
    return args


def prototype_counts(text):
    """--num-prototypes "50,512" -> [50, 512]; ValueError when it is not a comma list of integers."""
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
         f"--batch-size {args.batch_size} must be a positive multiple of 2 x world size = {2 * world} "
         "(it counts images, made of pairs, split evenly over the ranks)"),
        (args.epochs < 1, f"--epochs must be >= 1, got {args.epochs}"),
        (not args.lr > 0, f"--lr must be > 0, got {args.lr}"),
        (not args.temperature > 0, f"--temperature must be > 0, got {args.temperature}"),
        (not args.head_lr > 0, f"--head-lr must be > 0, got {args.head_lr}"),
        (not args.jitter >= 0, f"--jitter must be >= 0, got {args.jitter}"),
        (args.head_init == "centroids" and (args.prototypes != "kmeans" or not args.w_proto),
         "--head-init centroids needs k-means prototypes and a prototype head (--w-proto > 0)"),
        (not args.weight_decay >= 0, f"--weight-decay must be >= 0, got {args.weight_decay}"),
        (not args.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {args.warmup_epochs}"),
        (not min(args.w_con, args.w_metric, args.w_proto) >= 0,
         f"loss weights must be >= 0, got --w-con {args.w_con} --w-metric {args.w_metric} --w-proto {args.w_proto}"),
        (not args.w_con + args.w_metric + args.w_proto > 0, "all three loss weights are 0: nothing to train"),
        (not args.w_con and args.proto_start_epoch > 0,
         f"--w-con 0 leaves nothing to train before --proto-start-epoch {args.proto_start_epoch} "
         "(those epochs are NT-Xent alone): drop one of the two"),
        (not 0 <= args.p_same <= 1, f"--p-same must be in [0, 1], got {args.p_same}"),
        (any(k < 2 for k in ks), f"--num-prototypes {args.num_prototypes}: each K must be >= 2"),
        *[(getattr(args, name) < 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
          for name in ("proto_start_epoch", "knn_every", "train_subset", "stop_after", "workers")],
        (args.pca_dim is not None and args.pca_dim < 0, f"--pca-dim must be >= 0, got {args.pca_dim}"),
        (args.kmeans_iters < 1, f"--kmeans-iters must be >= 1, got {args.kmeans_iters}"),
        (args.image_size < 8, f"--image-size must be >= 8, got {args.image_size}"),
        (args.download and args.dataset not in data.SMALL,
         f"--download fetches CIFAR only; put --dataset {args.dataset} in --data yourself"),
    ]
    return next((message for bad, message in problems if bad), None)


def fail(message, master=True):
    runtime.fail("train.py", message, master)


@torch.no_grad()
def similarity_probe(args, model, train_set, augment, device, size=2048):
    """SPEC.md's TP / FN / TN similarities, measured the same way for every method: the mean
    cosine similarity in projection space between the two views of an image (true positives),
    of two images of one class (false negatives) and of two classes (true negatives), over a
    fixed set of training images with fixed views (the same every epoch), in eval mode. A kind of
    pair that the set lacks (two classes in a one-class dataset) gives None."""
    g = torch.Generator().manual_seed(4321)
    idx = torch.randperm(len(train_set), generator=g)[:size].sort().values
    targets = torch.as_tensor(train_set.targets)[idx]
    model.eval()
    z = []
    if isinstance(train_set, data.InMemoryImages):
        images = train_set.images[idx].to(device)
        for _ in range(2):
            z.append(torch.cat([model(v.to(memory_format=torch.channels_last))[1].float()
                                for v in augment(images, g).split(512)]))
    else:
        with torch.random.fork_rng():         # the PIL transforms draw from torch's global RNG
            torch.manual_seed(4321)
            views = data.Transformed(train_set, data.simclr_transform(args.image_size, args.jitter))
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(views, idx.tolist()), batch_size=256,
                                                 num_workers=args.workers)
            pairs = [(model(x.to(device))[1].float(), model(x2.to(device))[1].float())
                     for (x, _, _), (x2, _, _) in zip(loader, loader)]
        z = [torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])]
    model.train()
    z1, z2 = F.normalize(z[0], dim=1), F.normalize(z[1], dim=1)      # M x 128 each
    sim = z1 @ z2.T                                                   # M x M: view 1 of i, view 2 of j
    same_class = (targets[:, None] == targets[None, :]).to(device)
    other = ~torch.eye(len(idx), dtype=torch.bool, device=device)
    mean = lambda x: x.mean().item() if x.numel() else None      # None (JSON null): no such pair, e.g. one class
    return {"sim_tp": mean(sim.diagonal()), "sim_fn": mean(sim[same_class & other]), "sim_tn": mean(sim[~same_class])}


def eval_features(args, encoder, dataset, rank, world, device, amp_dtype):
    """Encoder features [N, F] (fp16, rank 0; None elsewhere) of a whole split in the evaluation view."""
    batches = data.eval_batches(dataset, rank, world, args.image_size, data.MEAN_STD.get(args.dataset, data.MEAN_STD["imagenet"]),
                                args.workers)
    return cluster.extract_features(encoder, batches, len(dataset), device, amp_dtype=amp_dtype)[0]


def augmented_features(args, encoder, train_set, augment, rank, world, epoch, device, amp_dtype):
    """As eval_features, from one random SimCLR augmentation of every image (--cluster-aug, the paper)."""
    sampler = torch.utils.data.DistributedSampler(train_set, world, rank, shuffle=False)
    if isinstance(train_set, data.InMemoryImages):
        g = data.seeded_generator(args.seed, data.CLUSTER_VIEWS, epoch, rank)
        batches = data.InMemoryLoader(train_set, list(sampler), 512, augment, g)
    else:
        batches = torch.utils.data.DataLoader(data.Transformed(train_set, data.simclr_transform(args.image_size,
                                                                                                args.jitter)),
                                              batch_size=512, sampler=sampler,
                                              num_workers=args.workers, pin_memory=torch.cuda.is_available())
    return cluster.extract_features(encoder, batches, len(train_set), device, amp_dtype=amp_dtype)[0]


def train_batches(args, train_set, sampler, prototypes, augment, pair_set, epoch, rank, device):
    """Yields (v1, v2 [2P, 3, S, S], same [P], prototypes [2P, H]) on device."""
    if isinstance(train_set, data.InMemoryImages):
        g = data.seeded_generator(args.seed, data.TRAIN_VIEWS, epoch, rank)
        for triples in sampler:
            t = torch.tensor(triples)                              # P x 3
            idx = torch.cat([t[:, 0], t[:, 1]])                    # 2P: anchors, then partners
            images = train_set.images[idx].to(device, non_blocking=True)
            v1, v2 = augment(images, g), augment(images, g)
            yield v1, v2, t[:, 2].to(device), prototypes[idx].to(device)
        return
    pair_set.set_assignments(prototypes)
    loader = torch.utils.data.DataLoader(pair_set, batch_sampler=sampler, num_workers=args.workers, pin_memory=torch.cuda.is_available())
    for a1, a2, b1, b2, same, _, _, pa, pb in loader:
        to = lambda *xs: torch.cat(xs).to(device, non_blocking=True)
        yield to(a1, b1), to(a2, b2), same.to(device), to(pa, pb).view(2 * len(same), -1)


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
def centroid_heads(features, assignments, ks, feature_dim, world, device, temperature=0.1):
    """--head-init centroids: row c of head j is cluster c's mean encoder feature, normalised and
    divided by temperature x the mean feature norm, so that a typical feature scores the clusters
    by cosine / 0.1 (DeepCluster-v2 copies its centroids into its prototype layer the same way,
    with this temperature). features [N, F] on rank 0, None elsewhere; the heads are broadcast.
    Returns one [K_j, F] float32 CPU tensor per K_j, identical on every rank."""
    weights = [torch.zeros(k, feature_dim) for k in ks]
    if features is not None:
        norm = torch.cat([chunk.float().norm(dim=1) for chunk in features.split(65536)]).mean()
        weights = [cluster.cluster_means(features, assignments[:, j], k) / (temperature * norm)
                   for j, k in enumerate(ks)]
    if world > 1:
        flat = torch.cat([w.flatten() for w in weights]).to(device)
        dist.broadcast(flat, src=0)
        weights = [w.view(k, feature_dim).cpu() for w, k in zip(flat.split([k * feature_dim for k in ks]), ks)]
    return weights


def schedule_changes(saved, config):
    """The flags of SCHEDULE that differ between a checkpoint's config and this run's, as text."""
    return [f"--{k.replace('_', '-')} {saved.get(k)} -> {config[k]}" for k in SCHEDULE if saved.get(k) != config[k]]


def load_checkpoint(path, config, master):
    """train.py's checkpoint at path, or a one-line stop (the file is never overwritten) when it is
    unreadable, not a train.py checkpoint, of another configuration (STRUCTURAL, those in config),
    or of another schedule (SCHEDULE) without --allow-schedule-change."""
    try:
        ckpt = runtime.read_checkpoint(path)
    except ValueError as e:
        fail(f"{e}; move it away to start afresh", master)
    if not isinstance(ckpt, dict) or not {"config", "model", "optimizer", "epoch"} <= set(ckpt):
        fail(f"{path} is not a train.py checkpoint (an exported encoder?); use another --out", master)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        fail(f"{path} was written by an older train.py (format {ckpt.get('format', 1)}, prototype heads inside "
             f"LARS), whose optimiser state does not fit this one (format {CHECKPOINT_FORMAT}); use another --out",
             master)
    saved = {k: ckpt["config"].get(k) for k in STRUCTURAL}
    differs = [f"{k}: checkpoint {saved[k]!r}, now {config[k]!r}" for k in STRUCTURAL
               if k in config and saved[k] != config[k]]
    if differs:
        fail(f"{path} was trained with another configuration ({'; '.join(differs)}); "
             "use another --out or the same flags", master)
    changes = schedule_changes(ckpt["config"], config)
    if changes and not config["allow_schedule_change"]:
        fail(f"{path} was trained on another learning-rate schedule ({', '.join(changes)}); resume with the "
             "checkpoint's flags, or add --allow-schedule-change to re-plan the schedule from here", master)
    return ckpt


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
                fail(f"{path} line {number} is not a JSON line of train.py; repair or delete that line", master)
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


def main(argv=None):
    args = get_args(argv)
    rank, world, device = runtime.setup_distributed()
    master = rank == 0
    torch.manual_seed(args.seed + rank)

    # ---- checks that deserve a sentence, not a traceback -------------------------------------
    problem = check_args(args, world)
    if problem:
        fail(problem, master)
    why = runtime.check_writable(args.out)
    if why:
        fail(f"--out {args.out!r} cannot be written ({why}); give a folder you can write to", master)
    ckpt_path, metrics_path = os.path.join(args.out, "checkpoint.pth"), os.path.join(args.out, "metrics.jsonl")
    progress.update(epoch=None, epochs=args.epochs, step=None, steps=None, saved_epoch=0, checkpoint=ckpt_path)

    # ---- resume: the checkpoint is read before the data, so a finished or refused run costs nothing
    ks = prototype_counts(args.num_prototypes)
    config = dict(vars(args), num_prototypes=ks, w_metric_on=bool(args.w_metric), w_proto_on=bool(args.w_proto))
    if args.prototypes == "gt":
        del config["num_prototypes"]          # one per class: known once the data is loaded
    ckpt = load_checkpoint(ckpt_path, config, master) if os.path.exists(ckpt_path) else None
    start_epoch = ckpt["epoch"] if ckpt else 0
    progress["saved_epoch"] = start_epoch
    if world > 1:
        # Every rank must have read the same checkpoint: --out on a filesystem all nodes share.
        epochs = torch.tensor([start_epoch, -start_epoch], device=device)
        dist.all_reduce(epochs, op=dist.ReduceOp.MAX)
        if epochs[0] != -epochs[1]:
            fail(f"ranks found different checkpoints in --out {args.out} (epochs {-int(epochs[1])} to "
                 f"{int(epochs[0])}): put --out on a filesystem shared by all nodes", master)
    if start_epoch >= args.epochs:
        if master:
            print(f"{args.out} is finished: {ckpt_path} holds epoch {start_epoch} of {args.epochs}, nothing to do "
                  "(evaluate it with linear_eval.py, or train on with a larger --epochs and --allow-schedule-change)")
        if world > 1:
            dist.destroy_process_group()
        return
    if master:
        trim_metrics(metrics_path, start_epoch, master)

    if args.download and world > 1 and not master:
        dist.barrier()                        # rank 0 downloads first
    try:
        train_set = data.load_dataset(args.dataset, args.data, train=True, download=args.download and master,
                                      workers=args.workers)
        test_set = data.load_dataset(args.dataset, args.data, train=False, workers=args.workers) if args.knn_every else None
    except data.DataNotFound as e:
        hint = f", or add --download to fetch {args.dataset} there" if args.dataset in data.SMALL and not args.download else ""
        fail(f"{e}{hint}", master)
    except (ValueError, RuntimeError, OSError) as e:
        fail(str(e), master)
    if args.download and world > 1 and master:
        dist.barrier()
    try:
        train_set = data.subset(train_set, args.train_subset, seed=1234)
    except ValueError as e:
        fail(f"--train-subset: {e}", master)
    in_memory = isinstance(train_set, data.InMemoryImages)
    targets = torch.as_tensor(train_set.targets)
    N = len(targets)
    num_classes = len(train_set.classes)
    uses_prototypes = bool(args.w_metric or args.w_proto)
    if args.prototypes == "gt":
        ks = config["num_prototypes"] = [num_classes]
        if ckpt and ckpt["config"].get("num_prototypes") != ks:
            fail(f"{ckpt_path} was trained with another configuration (num_prototypes: checkpoint "
                 f"{ckpt['config'].get('num_prototypes')!r}, now {ks!r}); use another --out or the same flags", master)
    if uses_prototypes and args.prototypes == "kmeans" and not all(2 <= k < N for k in ks):
        fail(f"--num-prototypes {args.num_prototypes}: each K must satisfy 2 <= K < N = {N} images", master)
    if args.batch_size > N:
        fail(f"--batch-size {args.batch_size} exceeds the {N} training images", master)

    # ---- model, optimiser ---------------------------------------------------------------------
    cuda = device.type == "cuda"
    model = SPCLModel(args.arch, cifar_stem=args.image_size <= 64, num_prototypes=ks if args.w_proto else ())
    if not args.w_metric:
        model.metric_head = None
    if world > 1 and cuda:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last)
    if args.pca_dim is None:
        args.pca_dim = min(256, model.feature_dim // 2)    # whitening at full rank would make noise signal
    step_module = TrainingStep(model, w_con=args.w_con, w_metric=args.w_metric, w_proto=args.w_proto,
                               temperature=args.temperature, contrast=args.contrast, proto_loss=args.proto_loss,
                               same_image_pairs=not args.no_same_image_pairs)
    if world > 1:
        # Heads idle during the SimCLR warm-up, or the projector with --w-con 0, get no gradient:
        # only then must DDP search the graph for unused parameters.
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if cuda else None,
            find_unused_parameters=(uses_prototypes and args.proto_start_epoch > 0) or not args.w_con)
    base_lr = args.lr * args.batch_size / 256
    heads = {id(p) for p in model.proto_heads.parameters()}
    optimizer = LARS([p for p in model.parameters() if id(p) not in heads], lr=base_lr, weight_decay=args.weight_decay)
    proto_optimizer = head_optimizer(model, args)
    # bf16 where the GPU has it natively (Ampere and later), else fp16 with loss scaling.
    amp_dtype = runtime.autocast_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    if master:
        n_params = sum(p.numel() for p in model.parameters())
        n_scaled = sum(p.numel() for p in model.parameters() if p.ndim > 1)
        print(f"{args.arch}: {n_params / 1e6:.2f}M parameters, {n_scaled / 1e6:.2f}M with weight decay and "
              f"trust ratio; {N} images, world size {world}, device {device}, AMP {amp_dtype}")

    # ---- resume -------------------------------------------------------------------------------
    previous = None             # the last epoch's k-means prototypes, for nmi_prev
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if proto_optimizer is not None:
            proto_optimizer.load_state_dict(ckpt["proto_optimizer"])
        if ckpt["scaler"]:        # empty when saved without fp16 loss scaling (CPU, bf16 GPUs)
            scaler.load_state_dict(ckpt["scaler"])
        if uses_prototypes and start_epoch > ckpt["config"].get("proto_start_epoch", 0):
            previous = ckpt["assignments"]        # else the SimCLR epochs' singletons, no clustering
        if master:
            # Training draws its randomness from generators seeded by (seed, stream, epoch, rank);
            # the global state is restored for code that adds draws of its own.
            torch.set_rng_state(ckpt["rng"]["cpu"])
            changed = [f"{k} {ckpt['config'].get(k)} -> {v}" for k, v in config.items()
                       if k not in STRUCTURAL + SCHEDULE and ckpt["config"].get(k) != v
                       and k not in ("out", "workers", "stop_after", "allow_schedule_change")]
            print(f"resumed from {ckpt_path} after epoch {start_epoch} of {args.epochs}"
                  + (f"; changed since: {', '.join(changed)}" if changed else ""))

    augment = data.BatchAugment(args.image_size, data.MEAN_STD[args.dataset], args.jitter) if in_memory else None
    pair_set = None if in_memory else PairDataset(train_set, data.simclr_transform(args.image_size, args.jitter))
    sampler = PrototypePairSampler(torch.arange(N), args.batch_size, world, rank, seed=args.seed, p_same=args.p_same)
    steps_per_epoch = len(sampler)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    progress["steps"] = steps_per_epoch
    rescheduled = schedule_changes(ckpt["config"], config) if ckpt else []
    if rescheduled and master:
        print(f"warning: the learning-rate schedule is re-planned ({', '.join(rescheduled)}): the lr goes from "
              f"{ckpt['optimizer']['param_groups'][0]['lr']:.4g} at the checkpoint's last step to "
              f"{runtime.cosine_lr(start_epoch * steps_per_epoch, total_steps, base_lr, warmup_steps):.4g} now")

    # Train features [N, F] on rank 0 (None elsewhere); `reuse` (the same on every rank) says that
    # the previous epoch's kNN pass made them from the current weights, so clustering can use them.
    features, reuse = None, False
    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.time()
        stats = {"epoch": epoch + 1}                  # the epoch this line reports, counted from 1
        progress.update(epoch=epoch + 1, step=0)
        use_prototypes = uses_prototypes and epoch >= args.proto_start_epoch
        # ---- 1. prototypes --------------------------------------------------------------------
        if use_prototypes and args.prototypes == "gt":
            assignments = targets[:, None]                              # N x 1
        elif use_prototypes:
            t0 = time.time()
            if not reuse:
                model.eval()
                features = (augmented_features(args, model.encoder, train_set, augment, rank, world, epoch, device,
                                               amp_dtype)
                            if args.cluster_aug else
                            eval_features(args, model.encoder, train_set, rank, world, device, amp_dtype))
                model.train()
            stats["feature_seconds"] = time.time() - t0
            assignments, kstats = cluster.distributed_kmeans(   # N x H, one column per K
                features, ks, N, seed=args.seed + epoch, niter=args.kmeans_iters, pca_dim=args.pca_dim, device=device)
            stats.update({f"kmeans_k{k}": st for k, st in zip(ks, kstats)})
            stats["cluster_seconds"] = time.time() - t0
            if master:
                stats["nmi_gt"] = cluster.nmi(assignments[:, 0].numpy(), targets.numpy())
                if previous is not None and previous.shape == assignments.shape:
                    stats["nmi_prev"] = cluster.nmi(assignments[:, 0].numpy(), previous[:, 0].numpy())
        else:
            assignments = torch.arange(N)[:, None]     # all singletons: uniformly random batches
        if use_prototypes and (args.prototypes == "kmeans" or epoch == args.proto_start_epoch):
            # New cluster ids mean nothing to the old heads: start them and their optimiser over.
            # Ground-truth classes keep their ids: that head starts once and then keeps learning.
            weights = None
            if args.head_init == "centroids":
                weights = centroid_heads(features, assignments, ks, model.feature_dim, world, device)
            model.reset_proto_heads(data.seeded_generator(args.seed, data.PROTO_HEADS, epoch), weights)
            proto_optimizer = head_optimizer(model, args)
        sampler.set_assignments(assignments[:, 0])
        sampler.set_epoch(epoch)

        # ---- 2. one epoch of Eq. 5 ------------------------------------------------------------
        model.train()
        sums = torch.zeros(4, device=device)
        recent = collections.deque(maxlen=20)         # the last steps: how far a fresh head got
        term_names = (["con"] if args.w_con else []) + (["metric"] if use_prototypes and args.w_metric else []) \
            + (["proto"] if use_prototypes and args.w_proto else [])
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not master,
                   dynamic_ncols=True, leave=False)
        train_start = time.time()
        for i, (v1, v2, same, protos) in enumerate(train_batches(
                args, train_set, sampler, assignments, augment, pair_set, epoch, rank, device)):
            step = epoch * steps_per_epoch + i
            progress["step"] = i + 1
            lr = runtime.cosine_lr(step, total_steps, base_lr, warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            v1 = v1.contiguous(memory_format=torch.channels_last)
            v2 = v2.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss, terms = step_module(v1, v2, same, protos, use_prototypes)
            # One small collective for all ranks to agree on the logged values and on a NaN stop.
            values = torch.stack([loss.detach()] + [terms[n] for n in term_names]).float()
            if world > 1:
                dist.all_reduce(values)
                values /= world
            values = values.tolist()
            if not all(math.isfinite(v) for v in values):
                named = ", ".join(f"{n}={v:.4g}" for n, v in zip(["total"] + term_names, values))
                fail(f"non-finite loss at epoch {epoch + 1} step {i + 1}/{steps_per_epoch}: {named}; "
                     f"the last good checkpoint is {ckpt_path} (try a lower --lr)", master)
            model.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            if proto_optimizer is not None and use_prototypes and args.w_proto:
                scaler.step(proto_optimizer)
            scaler.update()
            sums[:len(values)] += torch.tensor(values, device=device)
            recent.append(values)
            bar.set_postfix_str(" ".join(f"{n}={v:.3f}" for n, v in zip(["loss"] + term_names, values))
                                + f" lr={lr:.3g} img/s={(i + 1) * v1.shape[0] * world / (time.time() - train_start):.0f}")
            bar.update()
        bar.close()
        train_seconds = time.time() - train_start
        means = (sums / steps_per_epoch).tolist()[:1 + len(term_names)]
        stats.update({f"loss_{n}": v for n, v in zip(["total"] + term_names, means)})
        stats.update({f"loss_{n}_last{len(recent)}": sum(r[j] for r in recent) / len(recent)
                      for j, n in enumerate(["total"] + term_names)})
        stats.update(lr=lr,
                     images_per_second=steps_per_epoch * args.batch_size / train_seconds,
                     train_seconds=train_seconds, images_seen=(epoch + 1) * steps_per_epoch * args.batch_size)

        # ---- 3. kNN monitor, log, checkpoint ---------------------------------------------------
        features, reuse = None, False
        if args.knn_every and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
            model.eval()
            features = eval_features(args, model.encoder, train_set, rank, world, device, amp_dtype)
            test_features = eval_features(args, model.encoder, test_set, rank, world, device, amp_dtype)
            model.train()
            if master:
                stats["knn_top1"] = cluster.knn_top1(features, targets, test_features, test_set.targets,
                                             num_classes=num_classes)
            reuse = not args.cluster_aug
        if master:
            stats.update(similarity_probe(args, model, train_set, augment, device))
        stats["epoch_seconds"] = time.time() - epoch_start
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(stats) + "\n")
            runtime.atomic_save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "proto_optimizer": proto_optimizer.state_dict() if proto_optimizer else None,
                             "scaler": scaler.state_dict(), "epoch": epoch + 1, "assignments": assignments,
                             "rng": {"cpu": torch.get_rng_state()}, "config": config}, ckpt_path)
            progress["saved_epoch"] = epoch + 1
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()
                              if not isinstance(v, dict)}))
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
    if p["saved_epoch"]:
        return (f"train.py: interrupted {where}; the last checkpoint is {p['checkpoint']} (after epoch "
                f"{p['saved_epoch']}); run the same command to resume")
    return f"train.py: interrupted {where}; no checkpoint yet, so the same command starts afresh"


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        for bar in list(tqdm._instances):       # clear the progress bar's half line
            bar.close()
        if os.environ.get("RANK", "0") == "0":
            print(interrupted_message(), file=sys.stderr)
        sys.exit(130)
    except data.DataError as e:                 # raised in a DataLoader worker: a traceback around it
        sys.exit(f"train.py: error: {e.sentence()}")
