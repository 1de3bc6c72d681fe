"""SPCL pre-training (Mo, Sun and Li, BMVC 2021, Sec. 3): one process, or DDP under torchrun.

    python train.py --dataset cifar10 --data ./data --arch resnet18_narrow --epochs 20
    torchrun --nproc_per_node 8 train.py --dataset imagenet --data /path/to/imagenet

Read main() first. Per epoch: (1) the prototypes, k-means of every training image's features
(Sec. 3.2; each rank keeps the features of its share, rank 0 clusters their whitened rows), with
the prototype heads started over; (2) the epoch's same- and cross-prototype pair batches (Sec.
3.1); (3) one epoch of Eq. 5 (training_step: LARS for the network, its own SGD for the heads);
(4) the kNN and similarity monitor; (5) metrics.jsonl and checkpoint.pth in --out, resumed
automatically. `--w-metric 0 --w-proto 0` is plain SimCLR: no clustering, uniformly random pairs.
What is not the algorithm has rooms of its own: checkpoint.py (resume and forks), monitor.py
(kNN, Fig. 2b, the loss table), runtime.py (processes), data.py (datasets and views).
"""
import argparse
import itertools
import os
import time
from dataclasses import dataclass, field

if os.environ.get("RANK", "0") != "0":       # torch's C++ warnings (DDP's...) from rank 0 alone
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import checkpoint
import cluster
import data
import monitor
import runtime
from lars import LARS
from losses import CONTRAST_MODES
from models import ARCHS, SPCLModel, TrainingStep
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


@dataclass
class Training:
    """What main() hands to the steps of an epoch."""
    model: SPCLModel
    step: nn.Module             # models.TrainingStep (forward and Eq. 5), in DDP under torchrun
    optimizer: LARS             # the encoder, the projector and the metric head
    head_optimizer: object      # the prototype heads' own SGD, or None without them
    scaler: torch.amp.GradScaler
    sampler: PrototypePairSampler
    views: data.Views           # the training images' views
    test_views: object          # the test split's (kNN monitor), or None
    targets: torch.Tensor       # [N] the classes (NMI, --prototypes gt)
    ks: list                    # K of each prototype head
    config: dict                # the flags, as checkpoints store them
    device: torch.device
    amp_dtype: object
    rank: int = 0
    world: int = 1
    changes: list = field(default_factory=list)    # flags changed on resume, with their epoch

    def lr(self, step):
        """LARS's learning rate at a step: linear warm-up, then cosine to 0 (SimCLR's)."""
        a, steps = self.config, len(self.sampler)
        return runtime.cosine_lr(step, a["epochs"] * steps, a["lr"] * a["batch_size"] / 256,
                                 round(a["warmup_epochs"] * steps))


# ---------------------------------------------------------------------------------------------
# main: the algorithm
# ---------------------------------------------------------------------------------------------

@runtime.one_line_errors("train.py")
def main(argv=None):
    args = get_args(argv)
    rank, world, device = runtime.setup_script("train.py", args.timeout)
    torch.manual_seed(args.seed + rank)
    torch.backends.cudnn.benchmark = device.type == "cuda"     # fixed shapes: pick the fastest
    config = checked_config(args, world)
    # The checkpoint is read before the data, so that a finished or refused run costs nothing.
    ckpt, forked = checkpoint.find(args.out, config, args.fork_from, world, device)
    start_epoch = ckpt["epoch"] if ckpt else 0
    if start_epoch >= args.epochs:
        return finished(args, start_epoch, world)
    train_set, test_set = data.load_splits(args.dataset, args.data, args.knn_every > 0,
                                           args.train_subset, args.download, args.workers)
    config["num_prototypes"] = prototype_numbers(args, train_set)
    t = build(args, config, train_set, test_set, device)
    previous = checkpoint.restore(ckpt, t, forked) if ckpt else None

    bank = None          # this rank's shard of the last kNN pass's features, if still current
    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.time()
        checkpoint.progress.update(epoch=epoch + 1, step=0)
        partial = ckpt.get("partial") if ckpt and epoch == start_epoch else None

        # 1. Prototypes (Sec. 3.2): every image's cluster, singletons for plain SimCLR. A run
        # resumed inside the epoch finds them, and the epoch's statistics so far, in its checkpoint.
        if partial:
            assignments, stats = ckpt["assignments"], partial["stats"]
        else:
            assignments, stats = prototypes(args, t, epoch, bank, previous)
        bank = None              # 0.66 GB a rank at ImageNet size, not needed while training

        # 2. The epoch's pair batches (Sec. 3.1): same- and cross-prototype pairs.
        t.sampler.set_assignments(assignments[:, 0])
        t.sampler.set_epoch(epoch)

        # 3. One epoch of Eq. 5, checkpointed every --save-every steps.
        def save_partial(state):
            checkpoint.save(args.out, t, epoch, assignments, stats, partial=state)
        stats.update(train_one_epoch(args, t, epoch, assignments, partial, save_partial))

        # 4. Monitor: the kNN every --knn-every epochs, whose train features (the next epoch's
        # weights, evaluation view) serve the next clustering; the Fig. 2b probe.
        knn = args.knn_every > 0 and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs)
        measured, shard = monitor.after_epoch(t.model, t.views, t.test_views, knn, device,
                                              t.amp_dtype)
        bank = None if args.cluster_aug else shard           # --cluster-aug: augmented views
        stats.update(measured, epoch_seconds=time.time() - epoch_start)

        # 5. Checkpoint: metrics.jsonl's line, then checkpoint.pth.
        checkpoint.save(args.out, t, epoch + 1, assignments, stats)
        previous = assignments if uses_prototypes(args, epoch) else None
        if world > 1:
            dist.barrier()
        if args.stop_after and epoch + 1 - start_epoch >= args.stop_after:
            break
    if world > 1:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The steps of an epoch, in main()'s order
# ---------------------------------------------------------------------------------------------

def uses_prototypes(args, epoch=None):
    """Whether Eq. 3 or 4 is on (SPCL, not SimCLR); in epoch, from --proto-start-epoch on."""
    return bool(args.w_metric or args.w_proto) and (epoch is None
                                                    or epoch >= args.proto_start_epoch)


def prototypes(args, t, epoch, bank, previous):
    """Collective, step 1 of an epoch (Sec. 3.2): every image's prototype, assignments int64 [N, H]
    identical on every rank (singletons, i.e. uniformly random pairs, for plain SimCLR epochs),
    with the prototype heads started over; and the epoch's statistics line so far. bank: this
    rank's cluster.Shard of features made with this epoch's weights, or None; previous: the last
    epoch's assignments (nmi_prev), or None."""
    stats, N, shard = {"epoch": epoch + 1}, len(t.targets), None       # epochs counted from 1
    if not uses_prototypes(args, epoch):
        return torch.arange(N)[:, None], stats
    if args.prototypes == "gt":
        assignments = t.targets[:, None]
    else:
        start, shard = time.time(), bank
        if shard is None:         # the features of the evaluation view, or of one augmentation
            t.model.eval()
            key = (args.seed, data.CLUSTER_VIEWS, epoch, t.rank) if args.cluster_aug else None
            shard = cluster.split_shard(t.model.encoder, t.views, N, t.rank, t.world, t.device,
                                        t.amp_dtype, "simclr" if key else "eval", key)
            t.model.train()
        stats["feature_seconds"] = time.time() - start
        assignments, kmeans_stats = cluster.distributed_kmeans(
            shard.features, t.ks, N, indices=shard.indices, seed=args.seed + epoch,
            niter=args.kmeans_iters, pca_dim=args.pca_dim, device=t.device, backend=args.kmeans)
        stats.update({f"kmeans_k{k}": s for k, s in zip(t.ks, kmeans_stats)},
                     cluster_seconds=time.time() - start)
        if t.rank == 0:
            stats.update(monitor.prototype_stats(assignments, t.targets, previous))
    # New k-means ids mean nothing to the old heads: they start over (Sec. 3.5), and their
    # optimiser with them. A ground-truth head starts once (--renew-gt-head: every epoch too).
    if args.w_proto and (args.prototypes == "kmeans" or args.renew_gt_head
                         or epoch == args.proto_start_epoch):
        weights = (cluster.centroid_heads(shard, assignments, t.ks, t.world, t.device)
                   if args.head_init == "centroids" else None)
        t.model.reset_proto_heads(data.seeded_generator(args.seed, data.PROTO_HEADS, epoch),
                                  weights)
        t.head_optimizer = head_optimizer(t.model, args)
    return assignments, stats


def head_optimizer(model, args):
    """Eq. 4's heads train on their own, as in the official code: plain SGD at a constant lr,
    made anew with the heads after every clustering. Inside LARS a head re-drawn at N(0, 0.01)
    could not learn within an epoch: LARS moves a weight by lr x eta = 0.2 % of its norm a step."""
    if not len(model.proto_heads):
        return None
    return torch.optim.SGD(model.proto_heads.parameters(), lr=args.head_lr * args.batch_size / 256,
                           weight_decay=args.weight_decay)


def pair_batches(sampler):
    """The sampler's (anchor, partner, same) triples -> index batches [2P]: anchors, partners."""
    for triples in sampler:
        t = torch.tensor(triples)                              # P x 3
        yield torch.cat([t[:, 0], t[:, 1]])                    # 2P


def train_one_epoch(args, t, epoch, assignments, partial=None, save_partial=None):
    """Step 3: one pass over the training set on Eq. 5 (from step partial["step"] on, resumed
    inside the epoch). The steady state never waits for the device: the losses stay there in a
    monitor.LossTable, read (all-reduced; a non-finite loss stops the run) every --log-every steps
    (fp16 loss scaling, before Ampere, reads its inf check every step: GradScaler's sync); every
    --save-every steps save_partial(state) writes a checkpoint. Returns the epoch's statistics."""
    on = uses_prototypes(args, epoch)
    terms = [name for name, weight in (("con", args.w_con), ("metric", on and args.w_metric),
                                       ("proto", on and args.w_proto)) if weight]
    steps, done = len(t.sampler), partial["step"] if partial else 0
    table = monitor.LossTable(["total"] + terms, steps, t.device, partial)
    seconds_before = partial["seconds"] if partial else 0.0
    on_device = assignments.to(t.device)                       # N x H: looked up on the device
    bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch + 1}/{args.epochs}",
               disable=t.rank != 0, dynamic_ncols=True, leave=False)
    start = time.time()
    batches = t.views.batches(itertools.islice(pair_batches(t.sampler), done, None), "simclr",
                              key=(args.seed, data.TRAIN_VIEWS, epoch, t.rank), copies=2,
                              start=done)
    for i, ((v1, v2), _, idx) in enumerate(batches, done):         # v1, v2: 2P x 3 x S x S
        checkpoint.progress["step"] = i + 1
        lr = t.lr(epoch * steps + i)
        loss, values = training_step(t, v1, v2, on_device[data.to_device(idx, t.device)], on, lr)
        table.add(i, loss, values)
        bar.update()
        save_now = save_partial is not None and args.save_every and (i + 1) % args.save_every == 0
        if (i + 1) % args.log_every == 0 or i + 1 == steps or save_now:
            try:
                row = table.read(i, epoch)               # one read of the device, every N steps
            except monitor.NonFiniteLoss as e:
                last = checkpoint.progress["checkpoint"]
                runtime.end_job("train.py", f"{e}; the last good checkpoint is {last} (try a "
                                "lower --lr)", t.rank == 0)
            speed = (i + 1 - done) * len(v1) * t.world / (time.time() - start)
            bar.set_postfix_str(" ".join(f"{n}={v:.3f}" for n, v in zip(["loss"] + terms, row))
                                + f" lr={lr:.3g} img/s={speed:.0f}")
        if save_now and i + 1 < steps:
            save_partial({"step": i + 1, "history": table.history[:i + 1].cpu(),
                          "seconds": seconds_before + time.time() - start})
    bar.close()
    seconds = seconds_before + time.time() - start
    return dict(table.summary(), lr=lr, images_per_second=steps * args.batch_size / seconds,
                train_seconds=seconds, images_seen=(epoch + 1) * steps * args.batch_size)


def training_step(t, v1, v2, assignments, use_prototypes, lr):
    """One step of Eq. 5 on a pair batch: v1, v2 [2P, 3, S, S], the two views of P anchors
    followed by their P partners; assignments [2P, H], their prototypes. Returns the loss and
    its terms, on the device."""
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    P = len(v1) // 2
    same = (assignments[:P, 0] == assignments[P:, 0]).long()        # P: the labels of Eq. 3
    v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))
    with torch.autocast(t.device.type, dtype=t.amp_dtype, enabled=t.amp_dtype is not None):
        # The forward and losses.spcl_loss, in models.TrainingStep: the module DDP wraps, so
        # that the heads' gradients are averaged over the ranks with the network's.
        loss, terms = t.step(v1, v2, same, assignments, use_prototypes)
    t.model.zero_grad(set_to_none=True)
    t.scaler.scale(loss).backward()
    t.scaler.step(t.optimizer)                                     # LARS
    if t.head_optimizer is not None and use_prototypes:
        t.scaler.step(t.head_optimizer)                            # the prototype heads' SGD
    t.scaler.update()
    return loss, terms


# ---------------------------------------------------------------------------------------------
# Set-up: flags, resume point, data, model
# ---------------------------------------------------------------------------------------------

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10", choices=data.DATASETS)
    p.add_argument("--data", default="./data", help="dataset root (README, 'Flags and outputs')")
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
    p.add_argument("--jitter", type=float, help="colour-jitter strength s (0.8s, 0.8s, 0.8s, "
                   "0.2s; default: CIFAR 0.5, SimCLR's recipe; ImageNet and official SPCL: 1.0)")
    # Eq. 5 and Table 2.
    p.add_argument("--w-con", type=float, default=1.0, help="weight of NT-Xent (Eq. 1-2)")
    p.add_argument("--w-metric", type=float, default=1.0, help="weight of Eq. 3 (Siamese metric)")
    p.add_argument("--w-proto", type=float, default=1.0, help="weight of the prototype CE (Eq. 4)")
    p.add_argument("--proto-loss", choices=("ce", "sce"), default="ce", help="Eq. 4: CE or SCE")
    p.add_argument("--contrast", choices=CONTRAST_MODES, help="which views share NT-Xent's "
                   "softmax (losses.spcl_loss); default per-side, joint (SimCLR's) for SimCLR")
    p.add_argument("--head-lr", type=float, default=1.0, help="lr of the prototype heads' own "
                   "SGD (constant, no momentum), scaled by batch/256")
    p.add_argument("--head-init", choices=("random", "centroids"), default="random", help="heads "
                   "after each clustering: N(0, 0.01), or each row its cluster's mean feature")
    p.add_argument("--prototypes", choices=("kmeans", "gt"), default="kmeans",
                   help="k-means clusters, or the ground-truth classes (Table 2's SPCL (GT))")
    p.add_argument("--renew-gt-head", action="store_true", help="--prototypes gt: re-draw the "
                   "head every epoch as k-means heads (a matched control); default once")
    p.add_argument("--heads-on", choices=("h", "z"), default="h", help="the features Eq. 3 and "
                   "4 read: h, the encoder's (paper, official code), or z, the projection's")
    p.add_argument("--num-prototypes", help="K, or a comma list: a clustering and head each")
    p.add_argument("--p-same", type=float, default=0.5, help="share of same-prototype pairs")
    p.add_argument("--no-same-image-pairs", action="store_true", help="Eq. 3 on cross-image "
                   "pairs only (the official code adds (a, a') and (b, b'))")
    p.add_argument("--cluster-aug", action="store_true", help="cluster features of one random "
                   "augmentation (the paper) instead of the eval view")
    p.add_argument("--pca-dim", type=int, help="PCA-whitening before k-means, 0: off (default "
                   "min(256, F / 2), F the feature size)")
    p.add_argument("--kmeans-iters", type=int, default=20)
    p.add_argument("--kmeans", choices=("faiss", "torch"), help="k-means implementation "
                   "(default: faiss, torch's on a GPU that faiss-gpu does not see)")
    p.add_argument("--proto-start-epoch", type=int, default=0, help="N epochs of plain SimCLR "
                   "first, while clusters are still noise")
    p.add_argument("--knn-every", type=int, default=0, help="kNN top-1 every N epochs, 0: never")
    p.add_argument("--train-subset", type=int, default=0, help="a fixed random subset of N images")
    p.add_argument("--stop-after", type=int, default=0, help="exit after this many epochs of this "
                   "run (a job slot shorter than the schedule)")
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


def prototype_counts(text):
    """--num-prototypes "50,512" -> [50, 512]; ValueError when it is not a comma list of
    integers."""
    return [int(k) for k in str(text).split(",")]


def checked_config(args, world):
    """The flags as checkpoints store them, after a one-line stop at the first bad one (saying
    how to fix it) or an --out that cannot be written."""
    try:
        ks = prototype_counts(args.num_prototypes)
    except ValueError:
        fail(f"--num-prototypes {args.num_prototypes!r}: give K or a comma list such as 50,512")
    problems = [
        (args.arch not in ARCHS, f"unknown --arch {args.arch!r}; choose from {', '.join(ARCHS)}"),
        (args.batch_size < 4 * world or args.batch_size % (2 * world),
         f"--batch-size {args.batch_size} must be a positive multiple of 2 x world size = "
         f"{2 * world} and at least {4 * world}, so that each rank holds 2 anchors and 2 "
         "partners (it counts images, made of pairs, split evenly over the ranks)"),
        *[(not getattr(args, name) > 0, f"--{name.replace('_', '-')} must be > 0, got "
           f"{getattr(args, name)}") for name in ("epochs", "lr", "temperature", "head_lr")],
        (args.head_init == "centroids" and (args.prototypes != "kmeans" or not args.w_proto
                                            or args.heads_on != "h"),
         "--head-init centroids needs k-means prototypes, a prototype head (--w-proto > 0) and "
         "--heads-on h (the centroids are encoder features)"),
        (args.renew_gt_head and args.prototypes != "gt",
         "--renew-gt-head is for --prototypes gt (k-means heads are always re-drawn)"),
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
        *[(not getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got "
           f"{getattr(args, name)}") for name in ("jitter", "weight_decay", "warmup_epochs",
                                                  "proto_start_epoch", "knn_every", "train_subset",
                                                  "stop_after", "workers", "save_every")],
        (args.log_every < 1, f"--log-every must be >= 1, got {args.log_every}"),
        (args.pca_dim is not None and args.pca_dim < 0,
         f"--pca-dim must be >= 0, got {args.pca_dim}"),
        (args.kmeans_iters < 1, f"--kmeans-iters must be >= 1, got {args.kmeans_iters}"),
        (args.image_size < 8, f"--image-size must be >= 8, got {args.image_size}"),
        (args.download and args.dataset not in data.SMALL,
         f"--download fetches CIFAR only; put --dataset {args.dataset} in --data yourself"),
    ]
    problem = next((message for bad, message in problems if bad), None)
    if problem:
        fail(problem)
    path = os.path.join(args.out, "checkpoint.pth")
    why = runtime.on_rank0(lambda: checkpoint.check_writable(path))      # rank 0 writes
    if why:
        fail(f"--out {args.out!r} cannot be written ({why}); give a folder you can write to")
    config = dict(vars(args), num_prototypes=prototype_counts(args.num_prototypes),
                  w_metric_on=bool(args.w_metric), w_proto_on=bool(args.w_proto))
    if args.prototypes == "gt":
        del config["num_prototypes"]          # one per class: known once the data is loaded
    return config


def finished(args, epochs_done, world):
    if runtime.rank_world()[0] == 0:
        print(f"{args.out} is finished: {os.path.join(args.out, 'checkpoint.pth')} holds epoch "
              f"{epochs_done} of {args.epochs}, nothing to do (evaluate it with linear_eval.py, "
              "or train on with a larger --epochs and --allow-schedule-change)")
    if world > 1:
        dist.destroy_process_group()


def fail(message):
    runtime.fail("train.py", message)


def prototype_numbers(args, train_set):
    """The K of each prototype head: --num-prototypes, or the number of classes with
    --prototypes gt."""
    N = len(train_set.targets)
    ks = ([len(train_set.classes)] if args.prototypes == "gt"
          else prototype_counts(args.num_prototypes))
    if uses_prototypes(args) and args.prototypes == "kmeans" and not all(2 <= k < N for k in ks):
        fail(f"--num-prototypes {args.num_prototypes}: each K must satisfy 2 <= K < N = {N} "
             "images")
    if args.batch_size > N:
        fail(f"--batch-size {args.batch_size} exceeds the {N} training images")
    return ks


def build(args, config, train_set, test_set, device):
    """The training state: the network, the module DDP wraps, LARS for the network and SGD for
    the prototype heads, the fp16 loss scaler, the pair sampler and the views."""
    rank, world = runtime.rank_world()
    cuda, ks = device.type == "cuda", config["num_prototypes"]
    amp_dtype = runtime.autocast_dtype(device)
    model = SPCLModel(args.arch, cifar_stem=args.image_size <= 64,
                      num_prototypes=ks if args.w_proto else (), heads_on=args.heads_on)
    if not args.w_metric:
        model.metric_head = None
    if world > 1 and cuda:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last)
    if args.pca_dim is None:        # whitening at full rank would make noise signal
        args.pca_dim = min(256, model.feature_dim // 2)
    group = dist.group.WORLD if dist.is_initialized() else None     # torchrun, of any size
    step = TrainingStep(model, w_con=args.w_con, w_metric=args.w_metric, w_proto=args.w_proto,
                        temperature=args.temperature, contrast=args.contrast, group=group,
                        proto_loss=args.proto_loss, same_image_pairs=not args.no_same_image_pairs)
    if group is not None:
        # Heads idle during the SimCLR warm-up, or the projector with --w-con 0, get no gradient:
        # only then must DDP search the graph for unused parameters.
        step = nn.parallel.DistributedDataParallel(
            step, device_ids=[device.index] if cuda else None,
            find_unused_parameters=(uses_prototypes(args) and args.proto_start_epoch > 0)
            or not args.w_con)
    heads = {id(p) for p in model.proto_heads.parameters()}
    N, mean_std = len(train_set.targets), data.MEAN_STD.get(args.dataset, data.MEAN_STD["imagenet"])
    t = Training(
        model, step, LARS([p for p in model.parameters() if id(p) not in heads],
                          lr=args.lr * args.batch_size / 256, weight_decay=args.weight_decay),
        head_optimizer(model, args),
        torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16),
        PrototypePairSampler(torch.arange(N), args.batch_size, world, rank, seed=args.seed,
                             p_same=args.p_same),
        data.Views(train_set, args.image_size, mean_std, args.jitter, args.workers, device),
        data.Views(test_set, args.image_size, mean_std, workers=args.workers, device=device)
        if test_set else None, torch.as_tensor(train_set.targets), ks, config, device, amp_dtype,
        rank, world)
    checkpoint.progress["steps"] = len(t.sampler)
    if rank == 0:
        millions = [sum(p.numel() for p in model.parameters() if p.ndim > d) / 1e6 for d in (0, 1)]
        print(f"{args.arch}: {millions[0]:.2f}M parameters, {millions[1]:.2f}M with weight decay "
              f"and trust ratio; {N} images, world size {world}, device {device}, AMP {amp_dtype}")
    return t


if __name__ == "__main__":
    runtime.run_script(main, "train.py", checkpoint.interrupted_message)
