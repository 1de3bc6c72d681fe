"""Checkpoints: train.py's checkpoint.pth and metrics.jsonl, and the encoder that linear_eval.py
reads and exports. Nothing here is the algorithm; it makes a run survive preemption exactly.

    ckpt, forked = find(out, config, fork_from, world, device)  # resume point (None: afresh)
    restore(ckpt, training, forked)                            # into train.Training's state
    save(out, training, epoch, assignments, stats)             # atomic; the one before kept
    encoder, info = load_encoder(path)                         # linear_eval.py

What a resume may change: the flags of SCHEDULE only with --allow-schedule-change (the learning
rate schedule is re-planned), those of OPERATIONAL freely; any other flag is refused with what
differs, except in a fork (train.py --fork-from: a branch from a checkpoint whose prototypes had
not started), which may change all but the network (NETWORK). A checkpoint's "config" is the
latest run's; its "changes" record every flag changed since, with the epoch it took effect at.
Every error is a runtime.Refusal (a ValueError) of one sentence, and no file is ever overwritten
by a refused run.
"""
import json
import math
import os
import re
import shutil
import zipfile

import torch
import torch.distributed as dist

from models import ARCHS, build_encoder
from runtime import Refusal, rank_world

# Format 2: the prototype heads have an optimiser of their own (format 1 had them inside LARS).
FORMAT = 2
SCHEDULE = ("epochs", "batch_size", "lr", "warmup_epochs", "train_subset")
OPERATIONAL = ("out", "data", "download", "workers", "stop_after", "save_every", "log_every",
               "timeout", "knn_every", "allow_schedule_change", "fork_from", "kmeans")
NETWORK = ("arch", "dataset", "image_size")
OLDER = {"heads_on": "h", "renew_gt_head": False}        # flags that older checkpoints lack
HEADS = ("metric_head.", "proto_heads.")


# ---------------------------------------------------------------------------------------------
# Files: read, write atomically
# ---------------------------------------------------------------------------------------------

EXPECTED = ("expected train.py's checkpoint.pth or a state dict of tensors "
            "(torch.save(encoder.state_dict()))")


def read_file(path):
    """torch.load(path) on the CPU with weights_only=True, or a Refusal of one sentence that
    says what the file is and what was expected."""
    if os.path.isdir(path):
        inside = os.path.join(path, "checkpoint.pth")
        hint = f"; did you mean {inside}?" if os.path.isfile(inside) else f"; {EXPECTED}"
        raise Refusal(f"checkpoint {path!r} is a folder, not a file{hint}")
    if not os.path.isfile(path):
        raise Refusal(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
    foreign = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"         # torch.save writes a zip archive
    if foreign:
        what = (f"a pickle holding {foreign.group(1)} objects, which torch.load(weights_only=True) "
                "refuses to run (a whole pickled model or argparse Namespace?)")
    elif zipped and not zipfile.is_zipfile(path):
        what = "a torch.save file cut short or damaged (an interrupted copy or download?)"
    elif not zipped:
        what = "not a torch.save file"
    else:
        first = text.strip().splitlines()[0] if text.strip() else "no reason given"
        what = f"a torch.save file that cannot be loaded ({first})"
    raise Refusal(f"cannot read checkpoint {path}: it is {what}; {EXPECTED}")


def previous_path(path):
    """Where atomic_save(keep_previous=True) keeps the file that path held before:
    checkpoint.pth -> checkpoint.prev.pth."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def atomic_save(obj, path, keep_previous=False):
    """torch.save to path through a temporary file and a rename: a crash (or, thanks to fsync, a
    power cut) while writing leaves the previous file whole and never a half-written one. With
    keep_previous, the file path held before stays as previous_path(path) (a hard link, or a copy
    where links are not supported), so the last two checkpoints exist at every moment."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:                      # a full disk, Ctrl-C: no half file stays behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if keep_previous and os.path.exists(path):
        previous, staged = previous_path(path), previous_path(path) + ".tmp"
        if os.path.exists(staged):
            os.remove(staged)
        try:
            os.link(path, staged)
        except OSError:                              # a filesystem without hard links
            shutil.copyfile(path, staged)
        os.replace(staged, previous)
    os.replace(tmp, path)


def check_writable(path):
    """None when a file can be written at path, else why not. The probe writes beside it,
    making the missing folders on the way and removing them after, so that a run refused later
    leaves nothing behind; an existing file at path must take appends."""
    folder, made = os.path.dirname(os.path.abspath(path)), []
    try:
        missing = []
        while not os.path.exists(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        for name in reversed(missing):
            os.mkdir(name)
            made.append(name)
        if os.path.exists(path):
            open(path, "a").close()
        else:
            probe = os.path.join(os.path.dirname(os.path.abspath(path)),
                                 f".write_test_{os.getpid()}")
            open(probe, "w").close()
            os.remove(probe)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    finally:
        for name in reversed(made):
            os.rmdir(name)
    return None


# ---------------------------------------------------------------------------------------------
# train.py's checkpoint: read, refuse with what differs, restore, save
# ---------------------------------------------------------------------------------------------

def read(path):
    """train.py's checkpoint at path; a ValueError when it is unreadable, not a train.py
    checkpoint, or of an older format."""
    try:
        ckpt = read_file(path)
    except Refusal as e:
        previous = previous_path(path)
        raise Refusal(f"{e}; move it away to start afresh" + (
            f", or replace it with {previous}, the checkpoint before it, to resume from there"
            if os.path.exists(previous) else "")) from None
    if not isinstance(ckpt, dict) or not {"config", "model", "optimizer", "epoch"} <= set(ckpt):
        raise Refusal(f"{path} is not a train.py checkpoint (an exported encoder?); use "
                      "another --out")
    if ckpt.get("format") != FORMAT:
        raise Refusal(f"{path} was written by an older train.py (format "
                      f"{ckpt.get('format', 1)}, prototype heads inside LARS), whose optimiser "
                      f"state does not fit this one (format {FORMAT}); use another --out")
    ckpt["config"] = {**OLDER, **ckpt["config"]}
    return ckpt


def schedule_changes(saved, config):
    """The flags of SCHEDULE that differ between a checkpoint's config and this run's, as text."""
    return [f"--{k.replace('_', '-')} {saved.get(k)} -> {config[k]}" for k in SCHEDULE
            if saved.get(k) != config[k]]


def check(path, saved, config, keys):
    """A Refusal when one of keys (those in config) differs between a checkpoint's config and
    this run's, or when the schedule does without --allow-schedule-change."""
    differs = [f"{k}: checkpoint {saved.get(k)!r}, now {config[k]!r}" for k in keys
               if k in config and saved.get(k) != config[k]]
    if differs:
        raise Refusal(f"{path} was trained with another configuration ({'; '.join(differs)}); "
                      "use another --out or the same flags")
    changes = schedule_changes(saved, config)
    if changes and not config["allow_schedule_change"]:
        raise Refusal(f"{path} was trained on another learning-rate schedule "
                      f"({', '.join(changes)}); resume with the checkpoint's flags, or add "
                      "--allow-schedule-change to re-plan the schedule from here")


def check_fork(path, ckpt, config):
    """A fork (--fork-from) may change the loss and prototype flags of a checkpoint (K, the
    prototype terms switched on, --w-con, --contrast, ...) because the prototypes had not started
    when it was written: what it holds (encoder and projection weights, their LARS state, the
    schedule's position, the random states) does not depend on them, its heads had no gradient
    yet, and its pairs were uniformly random. The branch makes its own heads (the metric head as
    at the start of a run, the prototype heads at its first clustering), so it equals a run that
    had its flags from the start, when the epochs before were trained alike (a SimCLR trunk with
    --contrast per-side for SPCL's warm-up epochs; tested). A Refusal otherwise."""
    saved, epoch = ckpt["config"], ckpt["epoch"]
    check(path, saved, config, NETWORK)
    if ckpt.get("partial"):
        raise Refusal(f"--fork-from {path} was written inside epoch {epoch + 1}: fork from a "
                      "checkpoint written at the end of an epoch")
    if (saved["w_metric_on"] or saved["w_proto_on"]) and epoch > saved["proto_start_epoch"]:
        raise Refusal(f"--fork-from {path} trained with prototypes from epoch "
                      f"{saved['proto_start_epoch'] + 1}: a branch starts from a checkpoint "
                      "whose prototypes have not started (a SimCLR run's, or one from before "
                      "--proto-start-epoch)")
    if (config["w_metric_on"] or config["w_proto_on"]) and config["proto_start_epoch"] < epoch:
        raise Refusal(f"--fork-from {path} holds {epoch} epochs without prototypes: give "
                      f"--proto-start-epoch {epoch} (or later)")


def find(out, config, fork_from, world, device):
    """Collective: (the checkpoint to resume from, whether it starts a fork): out's
    checkpoint.pth, else --fork-from's, else (None, False); the same on every rank. A fork starts
    out's metrics.jsonl with the source's lines, a resume drops the lines of epochs it does not
    hold (and says so)."""
    path = os.path.join(out, "checkpoint.pth")
    progress.update(epoch=None, epochs=config["epochs"], step=None, steps=None, checkpoint=path)
    ckpt, forked = None, False
    if os.path.exists(path):
        ckpt = read(path)
        check(path, ckpt["config"], config, [k for k in config if k not in OPERATIONAL + SCHEDULE])
    elif fork_from:
        ckpt, forked = read(fork_from), True
        check_fork(fork_from, ckpt, config)
    if world > 1:
        # Every rank must have read the same checkpoint: --out on a filesystem all nodes share.
        done = ckpt["epoch"] if ckpt else 0
        epochs = torch.tensor([done, -done], device=device)
        dist.all_reduce(epochs, op=dist.ReduceOp.MAX)
        if epochs[0] != -epochs[1]:
            raise Refusal(f"ranks found different checkpoints in --out {out} (epochs "
                          f"{-int(epochs[1])} to {int(epochs[0])}): put --out on a filesystem "
                          "shared by all nodes")
    metrics = os.path.join(out, "metrics.jsonl")
    if ckpt and rank_world()[0] == 0:
        if forked:
            copy_metrics(os.path.join(os.path.dirname(fork_from), "metrics.jsonl"), metrics,
                         ckpt["epoch"])
        dropped = trim_metrics(metrics, ckpt["epoch"])
        if dropped:
            print(f"{metrics}: dropped {dropped}")
    progress["saved_epoch"] = ckpt["epoch"] if ckpt else 0
    progress["saved_step"] = ckpt["partial"]["step"] if ckpt and ckpt.get("partial") else 0
    return ckpt, forked


def changed_flags(saved, config):
    """{flag: [checkpoint's value, this run's]} for every flag this run changes (OPERATIONAL
    flags aside): recorded in the checkpoint with the epoch they take effect at."""
    return {k: [saved.get(k), v] for k, v in config.items()
            if k not in OPERATIONAL and saved.get(k) != v}


def lars_names(model):
    """The names of the parameters LARS trains, in its order: all but the prototype heads."""
    return [n for n, _ in model.named_parameters() if not n.startswith("proto_heads.")]


def restore(ckpt, training, forked):
    """Load a checkpoint into training (train.Training: model, optimizer, head_optimizer, scaler,
    rank, config, ...), record the flags this run changes with the epoch they take effect at,
    and say so. A fork loads the network without its heads and the LARS state of the parameters
    both runs have, matched by name; its head optimiser is made at the first clustering.
    Returns the assignments of the checkpoint's last clustering (for nmi_prev), or None."""
    model, saved, config = training.model, ckpt["config"], training.config
    if not forked:                   # again, now with what the data told (K of --prototypes gt)
        check(progress["checkpoint"], saved, config,
              [k for k in config if k not in OPERATIONAL + SCHEDULE])
    if forked:
        missing, _ = model.load_state_dict({k: v for k, v in ckpt["model"].items()
                                            if not k.startswith(HEADS)}, strict=False)
        if [k for k in missing if not k.startswith(HEADS)]:
            raise Refusal(f"--fork-from: the checkpoint lacks {describe_keys(missing)}")
        names, trained = lars_names(model), ckpt.get("lars_params")
        if trained is None and len(ckpt["optimizer"]["param_groups"][0]["params"]) != len(names):
            raise Refusal("--fork-from: the checkpoint predates the names of its LARS "
                          "parameters and trained other heads; fork from a newer one")
        index = {name: i for i, name in enumerate(trained or names)}
        group = dict(ckpt["optimizer"]["param_groups"][0], params=list(range(len(names))))
        state = {i: ckpt["optimizer"]["state"][index[n]] for i, n in enumerate(names)
                 if n in index and index[n] in ckpt["optimizer"]["state"]}
        training.optimizer.load_state_dict({"state": state, "param_groups": [group]})
    else:
        model.load_state_dict(ckpt["model"])
        training.optimizer.load_state_dict(ckpt["optimizer"])
        if training.head_optimizer is not None:
            training.head_optimizer.load_state_dict(ckpt["proto_optimizer"])
    if ckpt["scaler"]:        # empty when saved without fp16 loss scaling (CPU, bf16 GPUs)
        training.scaler.load_state_dict(ckpt["scaler"])
    # Training draws its randomness from generators seeded by (seed, stream, epoch, rank, ...);
    # each rank's global state is restored too, for code that adds draws of its own (a checkpoint
    # of an older train.py holds rank 0's only).
    states = ckpt["rng"]["cpu"]
    if isinstance(states, list) and training.rank < len(states):
        torch.set_rng_state(states[training.rank])
    elif training.rank == 0 and torch.is_tensor(states):
        torch.set_rng_state(states)
    done, partial = ckpt["epoch"], ckpt.get("partial")
    changed = changed_flags(saved, config)
    training.changes = ckpt.get("changes", []) + (
        [{"epoch": done + 1, "flags": changed}] if changed else [])
    if training.rank == 0:
        where = (f"at step {partial['step']} of epoch {done + 1}" if partial
                 else f"after epoch {done}")
        source = (f"forked from {config['fork_from']}" if forked
                  else f"resumed from {progress['checkpoint']}")
        print(f"{source} {where} of {config['epochs']}" + (
            f"; changed: {', '.join(f'{k} {a} -> {b}' for k, (a, b) in changed.items())}"
            if changed else ""))
        rescheduled = schedule_changes(saved, config)
        if rescheduled:
            print(f"warning: the learning-rate schedule is re-planned ({', '.join(rescheduled)}): "
                  f"the lr goes from {ckpt['optimizer']['param_groups'][0]['lr']:.4g} at the "
                  f"checkpoint's last step to {training.lr(done * len(training.sampler)):.4g} now")
    clustered = (saved["w_metric_on"] or saved["w_proto_on"]) and done > saved["proto_start_epoch"]
    return ckpt["assignments"] if clustered and not forked else None


def save(out, training, epoch, assignments, stats, partial=None):
    """Collective (each rank's random state); rank 0 writes. At the end of an epoch (partial None):
    the epoch's line of metrics.jsonl, then out/checkpoint.pth holding `epoch` finished epochs, then
    the line printed. Inside an epoch: the checkpoint with partial, train_one_epoch's state, and
    the statistics so far. Atomic, the checkpoint before kept as checkpoint.prev.pth."""
    rng = [torch.get_rng_state()]
    if training.world > 1:
        rng = [None] * training.world
        dist.all_gather_object(rng, torch.get_rng_state())
    if training.rank != 0:
        return
    if partial is None:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(stats) + "\n")
    head_optimizer = training.head_optimizer
    atomic_save({"format": FORMAT, "model": training.model.state_dict(),
                 "optimizer": training.optimizer.state_dict(),
                 "proto_optimizer": head_optimizer.state_dict() if head_optimizer else None,
                 "scaler": training.scaler.state_dict(), "epoch": epoch,
                 "partial": partial and dict(partial, stats=stats), "assignments": assignments,
                 "rng": {"cpu": rng}, "config": training.config, "changes": training.changes,
                 "lars_params": lars_names(training.model)},
                os.path.join(out, "checkpoint.pth"), keep_previous=True)
    progress.update(saved_epoch=epoch, saved_step=partial["step"] if partial else 0)
    if partial is None:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()
                          if not isinstance(v, dict)}))


# Where training stands against its checkpoints (train.py updates epoch and step), for the one
# line that Ctrl-C ends with.
progress = {"epoch": None, "epochs": None, "step": None, "steps": None, "checkpoint": None,
            "saved_epoch": 0, "saved_step": 0}


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


# ---------------------------------------------------------------------------------------------
# metrics.jsonl: a JSON line per epoch
# ---------------------------------------------------------------------------------------------

def _epoch(line):
    """The epoch of a line of metrics.jsonl, or None when it is not one of train.py's lines."""
    try:
        return json.loads(line)["epoch"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def trim_metrics(path, epochs_done):
    """Keep the lines of metrics.jsonl for the epochs the checkpoint holds (1..epochs_done): a crash
    between the log and the checkpoint leaves the line of an epoch that will be redone, a crash
    during the append a half-written last line. Rewritten atomically when something is dropped.
    Returns what was dropped, as text ("" for nothing); a Refusal for a damaged line before
    the last, which is not guessed at."""
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        lines = f.readlines()
    kept, dropped = [], []
    for number, line in enumerate(lines, 1):
        epoch = _epoch(line)
        if epoch is None:
            if number < len(lines):
                raise Refusal(f"{path} line {number} is not a JSON line of train.py; repair "
                              "or delete that line")
            dropped.append(f"its half-written last line {line.strip()[:40]!r}")
        elif epoch <= epochs_done:
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
    return "; ".join(dropped)


def copy_metrics(source, path, epochs):
    """A fork's metrics.jsonl: the lines of source's first `epochs` epochs, when it exists."""
    if os.path.exists(source):
        with open(source) as f:
            lines = [line for line in f if (_epoch(line) or math.inf) <= epochs]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.writelines(lines)


# ---------------------------------------------------------------------------------------------
# The encoder alone: linear_eval.py's input and --export's output
# ---------------------------------------------------------------------------------------------

def describe_keys(keys, limit=3):
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_encoder(checkpoint_path, arch=None, dataset=None):
    """The frozen-to-be encoder of a checkpoint, as models.build_encoder's model (fc = Identity).

    checkpoint_path: train.py's checkpoint.pth ({"model": SPCLModel.state_dict(), "config": ...}),
        whose config names the arch, dataset and image size (CIFAR stem when image_size <= 64);
        or a plain torchvision state dict of the encoder, with or without fc.* (then `arch` is
        required and the CIFAR stem is recognised by its 3x3 conv1).
    arch, dataset: what the caller expects; a checkpoint of another arch or dataset is refused.

    Returns (encoder, info), info = {"format", "arch", "dataset", "image_size", "cifar_stem",
    "feature_dim", "epoch"} (dataset, image_size, epoch None for a plain state dict).
    Raises a Refusal with a one-line reason for a missing, unreadable or mismatched file.
    """
    ckpt = read_file(checkpoint_path)
    if isinstance(ckpt, dict) and "model" in ckpt and "config" in ckpt:
        config = ckpt["config"]
        lacking = [key for key in ("arch", "dataset", "image_size") if key not in config]
        if lacking:
            raise Refusal(f"{checkpoint_path}: its config lacks {', '.join(lacking)}; "
                          "not written by train.py?")
        info = {"format": "spcl", "arch": config["arch"], "dataset": config["dataset"],
                "image_size": config["image_size"], "cifar_stem": config["image_size"] <= 64,
                "epoch": ckpt.get("epoch")}
        for name, wanted in (("arch", arch), ("dataset", dataset)):
            if wanted is not None and wanted != info[name]:
                raise Refusal(f"{checkpoint_path} holds a {info['arch']} encoder pre-trained on "
                              f"{info['dataset']}, but --{name} {wanted} was asked for")
        state = {key[len("encoder."):]: value for key, value in ckpt["model"].items()
                 if key.startswith("encoder.")}
    elif isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        if arch is None:
            raise Refusal(f"{checkpoint_path} is a plain state dict: say which network it "
                          f"is with --arch ({', '.join(ARCHS)})")
        conv1 = ckpt.get("conv1.weight")
        info = {"format": "torchvision", "arch": arch, "dataset": None, "image_size": None,
                "cifar_stem": conv1 is not None and conv1.shape[-1] == 3, "epoch": None}
        state = {key: value for key, value in ckpt.items() if not key.startswith("fc.")}
    else:
        raise Refusal(f"{checkpoint_path} holds a {type(ckpt).__name__}, neither train.py's "
                      "checkpoint.pth nor a state dict of tensors")

    encoder, info["feature_dim"] = build_encoder(info["arch"], info["cifar_stem"])
    expected = encoder.state_dict()
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    wrong_shape = [key for key in expected.keys() & state.keys()
                   if expected[key].shape != state[key].shape]
    if missing or unexpected or wrong_shape:
        problems = [f"{len(missing)} missing keys ({describe_keys(missing)})" if missing else "",
                    f"{len(unexpected)} unexpected keys ({describe_keys(unexpected)})"
                    if unexpected else "",
                    f"{len(wrong_shape)} of another shape ({describe_keys(wrong_shape)})"
                    if wrong_shape else ""]
        stem = "CIFAR" if info["cifar_stem"] else "ImageNet"
        raise Refusal(f"{checkpoint_path} does not fit a {info['arch']} encoder with the "
                      f"{stem} stem: " + "; ".join(p for p in problems if p))
    encoder.load_state_dict(state, strict=True)
    return encoder, info


def export_encoder(encoder, path):
    """Write encoder's state dict without fc: `torchvision.models.<arch>()` (or, for the CIFAR stem
    or a narrow arch, models.build_encoder's network) loads it with strict=True once its fc is
    replaced by nn.Identity(). Atomic: a crash leaves no half-written file at `path`."""
    state = {key: value.detach().cpu().contiguous() for key, value in encoder.state_dict().items()
             if not key.startswith("fc.")}
    atomic_save(state, path)
