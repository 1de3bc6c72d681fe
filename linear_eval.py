"""Evaluation of a pre-trained encoder (SPEC.md, "Linear evaluation"): the linear probe, the
weighted kNN monitor, and export to a plain torchvision state dict.

    python linear_eval.py --checkpoint runs/spcl/checkpoint.pth --data ./data --cached --out runs/spcl
    python linear_eval.py --checkpoint runs/spcl/checkpoint.pth --data ./data --knn --out runs/spcl
    python linear_eval.py --checkpoint runs/spcl/checkpoint.pth --export resnet18_spcl.pth
    torchrun --nproc_per_node 8 linear_eval.py --checkpoint runs/in1k/checkpoint.pth --data /path/to/imagenet

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
import re
import sys
import time
import zipfile

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2 as T
from tqdm import tqdm

import cluster
import data
from models import ARCHS, build_encoder


# ---------------------------------------------------------------------------------------------
# kNN monitor
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def knn_top1(train_features, train_targets, test_features, test_targets, k=200, temperature=0.1,
             num_classes=None, chunk=4096, device=None):
    """Weighted kNN top-1 accuracy in percent (Wu et al. 2018, arXiv 1805.01978).

    Each test image votes with its k nearest training images by cosine similarity s, each weighted
    exp(s / temperature); the class with the largest summed weight is the prediction.

    Args:
        train_features: [N, F], any float dtype, on any device (fp16 CPU from
            cluster.extract_features is fine: every block is computed in float32).
        train_targets: [N] int class ids.
        test_features: [M, F]; test_targets: [M].
        k: neighbours (clamped to N). temperature: of the vote weights.
        num_classes: C; default 1 + the largest target.
        chunk: rows of test and of train features per block, so memory stays bounded by
            [chunk, chunk] similarities and [chunk, k] running neighbours (1.28M x 2048 is fine).
        device: where the arithmetic runs; default CUDA when available.
    """
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"need features [N, F] and [M, F], got {tuple(train_features.shape)} and "
                         f"{tuple(test_features.shape)}")
    if len(train_targets) != len(train_features) or len(test_targets) != len(test_features):
        raise ValueError("need one target per feature row")
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError("need at least one train and one test feature")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    k = min(k, len(train_features))
    train_targets = torch.as_tensor(train_targets).to(device)
    test_targets = torch.as_tensor(test_targets).cpu()
    C = num_classes or max(int(train_targets.max()), int(test_targets.max())) + 1
    correct = 0
    for start in range(0, len(test_features), chunk):
        query = F.normalize(test_features[start:start + chunk].to(device, torch.float32), dim=1)  # c x F
        top_sim = torch.full((len(query), k), -math.inf, device=device)                          # c x k
        top_label = torch.zeros((len(query), k), dtype=torch.int64, device=device)
        for train_start in range(0, len(train_features), chunk):
            keys = F.normalize(train_features[train_start:train_start + chunk].to(device, torch.float32), dim=1)
            sim = torch.cat([top_sim, query @ keys.T], 1)                        # c x (k + b)
            labels = train_targets[train_start:train_start + chunk].expand(len(query), -1)
            top_sim, pos = sim.topk(k, dim=1)                                    # c x k
            top_label = torch.cat([top_label, labels], 1).gather(1, pos)
        votes = torch.zeros(len(query), C, device=device)
        votes.scatter_add_(1, top_label, (top_sim / temperature).exp())         # c x C
        correct += int((votes.argmax(1).cpu() == test_targets[start:start + chunk]).sum())
    return 100.0 * correct / len(test_features)


# ---------------------------------------------------------------------------------------------
# Checkpoints in, torchvision state dicts out
# ---------------------------------------------------------------------------------------------

def _describe(keys, limit=3):
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


EXPECTED = "expected train.py's checkpoint.pth or a state dict of tensors (torch.save(encoder.state_dict()))"


def read_checkpoint(path):
    """torch.load(path) on the CPU with weights_only=True, or a ValueError of one sentence that
    says what the file is and what was expected."""
    if os.path.isdir(path):
        inside = os.path.join(path, "checkpoint.pth")
        hint = f"; did you mean {inside}?" if os.path.isfile(inside) else f"; {EXPECTED}"
        raise ValueError(f"checkpoint {path!r} is a folder, not a file{hint}")
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
    foreign = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"         # torch.save writes a zip archive
    if foreign:
        what = (f"a pickle holding {foreign.group(1)} objects, which torch.load(weights_only=True) refuses to run "
                "(a whole pickled model or argparse Namespace?)")
    elif zipped and not zipfile.is_zipfile(path):
        what = "a torch.save file cut short or damaged (an interrupted copy or download?)"
    elif not zipped:
        what = "not a torch.save file"
    else:
        what = f"a torch.save file that cannot be loaded ({text.strip().splitlines()[0] if text.strip() else 'no reason given'})"
    raise ValueError(f"cannot read checkpoint {path}: it is {what}; {EXPECTED}")


def load_encoder(checkpoint_path, arch=None, dataset=None):
    """The frozen-to-be encoder of a checkpoint, as build_encoder's model (fc = Identity).

    checkpoint_path: train.py's checkpoint.pth ({"model": SPCLModel.state_dict(), "config": ...}),
        whose config names the arch, dataset and image size (CIFAR stem when image_size <= 64);
        or a plain torchvision state dict of the encoder, with or without fc.* (then `arch` is
        required and the CIFAR stem is recognised by its 3x3 conv1).
    arch, dataset: what the caller expects; a checkpoint of another arch or dataset is refused.

    Returns (encoder, info), info = {"format", "arch", "dataset", "image_size", "cifar_stem",
    "feature_dim", "epoch"} (dataset, image_size, epoch None for a plain state dict).
    Raises ValueError with a one-line reason for a missing, unreadable or mismatched file.
    """
    ckpt = read_checkpoint(checkpoint_path)
    if isinstance(ckpt, dict) and "model" in ckpt and "config" in ckpt:
        config = ckpt["config"]
        lacking = [key for key in ("arch", "dataset", "image_size") if key not in config]
        if lacking:
            raise ValueError(f"{checkpoint_path}: its config lacks {', '.join(lacking)}; not written by train.py?")
        info = {"format": "spcl", "arch": config["arch"], "dataset": config["dataset"],
                "image_size": config["image_size"], "cifar_stem": config["image_size"] <= 64,
                "epoch": ckpt.get("epoch")}
        for name, wanted in (("arch", arch), ("dataset", dataset)):
            if wanted is not None and wanted != info[name]:
                raise ValueError(f"{checkpoint_path} holds a {info['arch']} encoder pre-trained on "
                                 f"{info['dataset']}, but --{name} {wanted} was asked for")
        state = {key[len("encoder."):]: value for key, value in ckpt["model"].items()
                 if key.startswith("encoder.")}
    elif isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        if arch is None:
            raise ValueError(f"{checkpoint_path} is a plain state dict: say which network it is with --arch "
                             f"({', '.join(ARCHS)})")
        conv1 = ckpt.get("conv1.weight")
        info = {"format": "torchvision", "arch": arch, "dataset": None, "image_size": None,
                "cifar_stem": conv1 is not None and conv1.shape[-1] == 3, "epoch": None}
        state = {key: value for key, value in ckpt.items() if not key.startswith("fc.")}
    else:
        raise ValueError(f"{checkpoint_path} holds a {type(ckpt).__name__}, neither train.py's checkpoint.pth nor "
                         "a state dict of tensors")

    encoder, info["feature_dim"] = build_encoder(info["arch"], info["cifar_stem"])
    expected = encoder.state_dict()
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    wrong_shape = [key for key in expected.keys() & state.keys() if expected[key].shape != state[key].shape]
    if missing or unexpected or wrong_shape:
        problems = [f"{len(missing)} missing keys ({_describe(missing)})" if missing else "",
                    f"{len(unexpected)} unexpected keys ({_describe(unexpected)})" if unexpected else "",
                    f"{len(wrong_shape)} of another shape ({_describe(wrong_shape)})" if wrong_shape else ""]
        stem = "CIFAR" if info["cifar_stem"] else "ImageNet"
        raise ValueError(f"{checkpoint_path} does not fit a {info['arch']} encoder with the {stem} stem: "
                         + "; ".join(p for p in problems if p))
    encoder.load_state_dict(state, strict=True)
    return encoder, info


def export_encoder(encoder, path):
    """Write encoder's state dict without fc: `torchvision.models.<arch>()` (or, for the CIFAR stem
    or a narrow arch, models.build_encoder's network) loads it with strict=True once its fc is
    replaced by nn.Identity(). Atomic: a crash leaves no half-written file at `path`."""
    state = {key: value.detach().cpu().contiguous() for key, value in encoder.state_dict().items()
             if not key.startswith("fc.")}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Data: the evaluation view for features, RandomResizedCrop + flip for the probe
# ---------------------------------------------------------------------------------------------

def crop_flip(images, mean_std, generator):
    """The probe's augmentation, batched on the images' device: RandomResizedCrop (scale 0.08-1,
    resized back to H x W) and a horizontal flip (p 0.5) of uint8 images [B, H, W, 3] ->
    normalised float [B, 3, H, W]. The random draws come from the CPU `generator`."""
    B, H, W, _ = images.shape
    augment = data.BatchAugment(H, mean_std)            # for torchvision's crop rule, crop_boxes
    x = data.crop_resize(images.permute(0, 3, 1, 2).float().div_(255), augment.crop_boxes(B, H, W, generator),
                         (H, W))                                                 # B x 3 x H x W
    flip = (torch.rand(B, generator=generator) < 0.5).to(x.device).view(-1, 1, 1, 1)
    x = torch.where(flip, x.flip(3), x)
    return (x - augment.mean.to(x.device)) / augment.std.to(x.device)


def augmented_batches(train_set, batch_size, rank, world, image_size, mean_std, device, seed, workers):
    """The probe's training views: (epoch -> this rank's batches (images [B, 3, S, S], targets [B]),
    steps per epoch). RandomResizedCrop + flip, batched on `device` for an InMemoryImages, else
    torchvision's PIL transforms in DataLoader workers."""
    sampler = torch.utils.data.DistributedSampler(train_set, world, rank, shuffle=True, seed=seed)
    steps_per_epoch = math.ceil(len(sampler) / batch_size)
    if isinstance(train_set, data.InMemoryImages):
        def batches(epoch):
            sampler.set_epoch(epoch)
            g = data.seeded_generator(seed, data.PROBE_VIEWS, epoch, rank)
            for idx in torch.tensor(list(sampler)).split(batch_size):
                images = train_set.images[idx].to(device, non_blocking=True)
                yield crop_flip(images, mean_std, g), train_set.targets[idx]
        return batches, steps_per_epoch

    crop_flip_view = T.Compose([T.RandomResizedCrop(image_size, antialias=True), T.RandomHorizontalFlip(), T.ToImage(),
                                T.ToDtype(torch.float32, scale=True), T.Normalize(*mean_std)])
    loader = torch.utils.data.DataLoader(data.Transformed(train_set, crop_flip_view), batch_size=batch_size,
                                         sampler=sampler, num_workers=workers, pin_memory=torch.cuda.is_available(),
                                         persistent_workers=workers > 0)

    def batches(epoch):
        sampler.set_epoch(epoch)
        return ((x, y) for x, y, _ in loader)
    return batches, steps_per_epoch


# ---------------------------------------------------------------------------------------------
# The probe
# ---------------------------------------------------------------------------------------------

def train_classifier(classifier, epoch_batches, epochs, steps_per_epoch, lr, momentum=0.9, weight_decay=0.0,
                     encoder=None, device="cpu", amp_dtype=None, master=True):
    """SGD with Nesterov momentum and a per-step cosine schedule from lr to 0 on cross-entropy.

    epoch_batches(epoch) yields (x, y [B]): images [B, 3, S, S] when an encoder is given (run
    frozen, without gradient), else features [B, F]. classifier may be DDP-wrapped.
    Returns the mean loss of the last epoch.
    """
    device = torch.device(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=momentum, nesterov=True,
                                weight_decay=weight_decay)
    total_steps = epochs * steps_per_epoch
    step = 0
    bar = tqdm(range(epochs), desc="linear probe", disable=not master, dynamic_ncols=True, leave=False)
    for epoch in bar:
        loss_sum, count = torch.zeros((), device=device), 0
        for x, y in epoch_batches(epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if encoder is not None:
                with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    x = encoder(x.contiguous(memory_format=torch.channels_last))       # B x F
            loss = F.cross_entropy(classifier(x.float()), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            count += 1
            step += 1
        mean_loss = loss_sum.item() / max(1, count)
        bar.set_postfix_str(f"epoch {epoch + 1} loss {mean_loss:.4f}")
    bar.close()
    return mean_loss


@torch.no_grad()
def evaluate(classifier, features, targets, device="cpu", chunk=4096):
    """(top-1, top-5) accuracy in percent of classifier on features [M, F] with targets [M]."""
    hits = torch.zeros(2, dtype=torch.int64)
    for x, y in zip(features.split(chunk), torch.as_tensor(targets).split(chunk)):
        logits = classifier(x.to(device, torch.float32))                            # c x C
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu() == y[:, None]
        hits += torch.stack([top[:, 0].sum(), top.any(1).sum()])
    return tuple((100.0 * hits / len(targets)).tolist())


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="train.py's checkpoint.pth or a torchvision state dict")
    p.add_argument("--arch", help=f"{', '.join(ARCHS)}; required for a plain state dict")
    p.add_argument("--dataset", choices=data.DATASETS,
                   help="default: the checkpoint's; required for a plain state dict")
    p.add_argument("--data", default="./data", help="dataset root (see README, 'Data')")
    p.add_argument("--out", help="JSONL file, or a folder for linear_eval.jsonl, to append the result to")
    p.add_argument("--epochs", type=int, help="default 100 on CIFAR, 90 otherwise")
    p.add_argument("--batch-size", type=int, default=256, help="GLOBAL batch")
    p.add_argument("--lr", type=float, default=0.1, help="base lr, scaled by batch/256")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--cached", action="store_true", help="train on features of the evaluation view, extracted once")
    p.add_argument("--knn", action="store_true", help="only the weighted kNN top-1 (no linear probe)")
    p.add_argument("--knn-k", type=int, default=200)
    p.add_argument("--knn-temperature", type=float, default=0.1)
    p.add_argument("--export", metavar="PATH", help="write the encoder as a torchvision state dict and stop")
    p.add_argument("--subset", type=int, default=0, help="a fixed random subset of N training images")
    p.add_argument("--test-subset", type=int, default=0, help="a fixed random subset of N test images")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def fail(message, master=True):
    """Stop with a one-line error (printed once, by rank 0) instead of a traceback."""
    sys.exit(f"linear_eval.py: error: {message}" if master else 1)


def result_path(out):
    """The JSONL file that --out names: out itself, or linear_eval.jsonl in the folder out."""
    return os.path.join(out, "linear_eval.jsonl") if os.path.isdir(out) or out.endswith(os.sep) else out


def check_writable(path):
    """None when the JSON line can be appended to path (its folder created if missing), else why not.
    Creates no file: an empty linear_eval.jsonl would read as a finished row to experiments/table2.sh."""
    try:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(path):
            open(path, "a").close()
        else:
            probe = os.path.join(folder, f".write_test_{os.getpid()}")
            open(probe, "w").close()
            os.remove(probe)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None


def write_result(result, out):
    print(json.dumps(result))
    if out:
        path = result_path(out)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(result) + "\n")


def main(argv=None):
    args = get_args(argv)
    # train.py imports knn_top1 from this file; importing train at the top would make a cycle.
    from train import setup_distributed
    rank, world, device = setup_distributed()
    master = rank == 0
    torch.manual_seed(args.seed)
    start = time.time()

    try:
        encoder, info = load_encoder(args.checkpoint, args.arch, args.dataset)
    except ValueError as e:
        fail(str(e), master)
    why = check_writable(result_path(args.out)) if args.out and not args.export and master else None
    if why:
        fail(f"--out {args.out!r} cannot be written ({why}); give a file or folder you can write to", master)
    if args.export:
        if master:
            export_encoder(encoder, args.export)
            print(f"wrote the {info['arch']} encoder ({'CIFAR' if info['cifar_stem'] else 'ImageNet'} stem) "
                  f"to {args.export}")
        return None

    dataset = args.dataset or info["dataset"]
    if dataset is None:
        fail(f"{args.checkpoint} is a plain state dict: say which data it is for with --dataset", master)
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} must be divisible by the world size {world}", master)
    epochs = args.epochs or (100 if dataset in data.SMALL else 90)
    if epochs < 1:
        fail(f"--epochs must be >= 1, got {epochs}", master)
    try:
        train_set = data.load_dataset(dataset, args.data, train=True, workers=args.workers)
        test_set = data.load_dataset(dataset, args.data, train=False, workers=args.workers)
        train_set, test_set = data.subset(train_set, args.subset, 1234), data.subset(test_set, args.test_subset, 4321)
    except (ValueError, RuntimeError, OSError) as e:     # data.DataNotFound says what --data should hold
        fail(str(e), master)
    in_memory = isinstance(train_set, data.InMemoryImages)
    image_size = train_set.images.shape[1] if in_memory else info["image_size"] or (32 if info["cifar_stem"] else 224)
    mean_std = data.MEAN_STD.get(dataset, data.MEAN_STD["imagenet"])
    num_classes = len(train_set.classes)

    cuda = device.type == "cuda"
    amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16) if cuda else None
    reference = {key: value.clone() for key, value in encoder.state_dict().items()}
    encoder = encoder.to(device, memory_format=torch.channels_last).eval().requires_grad_(False)

    def features_of(split):
        """[N, F] fp16 CPU features and [N] targets of a split, on rank 0; None elsewhere."""
        batches = data.eval_batches(split, rank, world, image_size, mean_std, args.workers)
        return cluster.extract_features(encoder, batches, len(split), device, amp_dtype=amp_dtype)

    test_features, test_targets = features_of(test_set)
    result = {"checkpoint": args.checkpoint, "arch": info["arch"], "dataset": dataset,
              "checkpoint_epoch": info["epoch"], "train_images": len(train_set), "test_images": len(test_set)}

    if args.knn:
        train_features, train_targets = features_of(train_set)
        if master:
            top1 = knn_top1(train_features, train_targets, test_features, test_targets, k=args.knn_k,
                            temperature=args.knn_temperature, num_classes=num_classes)
            result.update(mode="knn", k=args.knn_k, temperature=args.knn_temperature, knn_top1=top1,
                          seconds=time.time() - start)
    else:
        lr = args.lr * args.batch_size / 256
        classifier = nn.Linear(info["feature_dim"], num_classes)
        nn.init.normal_(classifier.weight, std=0.01)
        nn.init.zeros_(classifier.bias)
        classifier = classifier.to(device)
        if args.cached:
            train_features, train_targets = features_of(train_set)
            # A linear layer on cached features takes seconds: rank 0 trains it alone.
            if world > 1:
                dist.destroy_process_group()
            if not master:
                return None
            shuffle = torch.Generator().manual_seed(args.seed)

            def batches(epoch):
                for idx in torch.randperm(len(train_targets), generator=shuffle).split(args.batch_size):
                    yield train_features[idx], train_targets[idx]
            train_classifier(classifier, batches, epochs, math.ceil(len(train_targets) / args.batch_size), lr,
                             args.momentum, args.weight_decay, device=device, master=master)
            linear = classifier
        else:
            linear = classifier
            if world > 1:
                classifier = nn.parallel.DistributedDataParallel(classifier,
                                                                 device_ids=[device.index] if cuda else None)
            batches, steps_per_epoch = augmented_batches(train_set, args.batch_size // world, rank, world,
                                                         image_size, mean_std, device, args.seed, args.workers)
            train_classifier(classifier, batches, epochs, steps_per_epoch, lr, args.momentum, args.weight_decay,
                             encoder=encoder, device=device, amp_dtype=amp_dtype, master=master)

        # moco-v3's sanity check: the probe must not have touched the encoder, BN statistics included.
        moved = [key for key, value in encoder.state_dict().items() if not torch.equal(value.cpu(), reference[key])]
        if moved:
            fail(f"the encoder changed during linear evaluation ({_describe(moved)}): a bug", master)
        if master:
            top1, top5 = evaluate(linear, test_features, test_targets, device)
            result.update(mode="cached" if args.cached else "augmented", epochs=epochs, batch_size=args.batch_size,
                          lr=lr, momentum=args.momentum, weight_decay=args.weight_decay, top1=top1, top5=top5,
                          seconds=time.time() - start, world_size=world, encoder_unchanged=True)

    if master:
        write_result(result, args.out)
    if world > 1 and dist.is_initialized():
        dist.destroy_process_group()
    return result if master else None


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        for bar in list(tqdm._instances):       # clear the progress bar's half line
            bar.close()
        if os.environ.get("RANK", "0") == "0":
            print("linear_eval.py: interrupted; nothing was written (the result is appended to --out at the end), "
                  "so run the command again", file=sys.stderr)
        sys.exit(130)
    except data.DataError as e:                 # raised in a DataLoader worker: a traceback around it
        sys.exit(f"linear_eval.py: error: {e.sentence()}")
