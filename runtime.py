"""What both scripts (train.py, linear_eval.py) need from the process they run in: the
distributed set-up and the DataLoader workers per rank, the device's AMP dtype, one-line
failures, checkpoint files read and written safely, and the learning-rate schedule.

    rank, world, device = setup_distributed(timeout_minutes=60)  # torchrun, or one process
    amp_dtype = autocast_dtype(device)                            # bf16 / fp16 on CUDA, None on CPU
    fail("train.py", "--lr must be > 0", master)                  # one line, no traceback
"""
import math
import os
import re
import shutil
import signal
import sys
import zipfile
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm import tqdm

import data


def setup_distributed(timeout_minutes=60):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a single process.

    Under torchrun: NCCL on CUDA (one GPU per local rank), gloo on the CPU. `timeout_minutes`
    bounds every collective, so it must cover the longest time one rank works alone while the
    others wait (rank 0's k-means). Returns (rank, world size, device).
    """
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(minutes=timeout_minutes)
    # torchrun keeps its key-value store across worker restarts (--max-restarts), and gloo would
    # read the dead workers' addresses from it: each restart gets keys of its own.
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_store, timeout=timeout)
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"spcl_restart_{restart}", store)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world,
                                device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    return rank, world, device


WORKERS_HELP = ("DataLoader worker processes per rank for on-disk datasets (default: min(8, usable "
                "cores / ranks on this node)); in-memory CIFAR needs none: it decodes an "
                "ImageFolder tree once with this many threads")


def default_workers(cores=None, local_world_size=None, cap=8):
    """DataLoader workers per rank when --workers is not given: this node's usable cores shared
    among its ranks, at least 1, at most `cap` (each worker holds its own copy of the dataset's
    file list). cores: os.sched_getaffinity's count; local_world_size: torchrun's
    LOCAL_WORLD_SIZE (1 without torchrun)."""
    if cores is None:
        cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count() or 1)
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, min(cap, cores // local_world_size))


def add_process_flags(parser, timeout_note=""):
    """The flags both scripts take for the processes they run in: --workers, --seed, --timeout."""
    parser.add_argument("--workers", type=int, help=WORKERS_HELP)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60,
                        help="minutes a rank may wait for the others in a collective before the "
                             "job stops (torch.distributed's timeout)" + timeout_note)


def setup_script(program, timeout_minutes):
    """setup_distributed for a script's --timeout, which must be positive (checked before the
    process group, which would not start with it: a one-line error instead)."""
    if not timeout_minutes > 0:
        fail(program, f"--timeout must be > 0 minutes, got {timeout_minutes}",
             os.environ.get("RANK", "0") == "0")
    return setup_distributed(timeout_minutes=timeout_minutes)


def autocast_dtype(device):
    """bf16 where the GPU has it natively (Ampere and later), fp16 (with loss scaling) on older
    GPUs, None (full precision) on the CPU."""
    if device.type != "cuda":
        return None
    return (torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False)
            else torch.float16)


def fail(program, message, master=True):
    """Stop with a one-line error, printed once (by rank 0), instead of a traceback."""
    sys.exit(f"{program}: error: {message}" if master else 1)


def check_writable(folder):
    """None when files can be written in folder (created if missing), else why not."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write_test_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None


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
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
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


def end_job(program, message, master=True):
    """Stop with a one-line error that a restart would only repeat (a non-finite loss from the
    same checkpoint and flags). Under torchrun with --max-restarts that must end the job, not
    restart it: torchrun restarts failed workers whatever their exit code, so local rank 0 of every
    node stops its node's agent (the parent process) with SIGTERM, which ends the job with an
    error. The message is written and flushed first, since the agent answers by terminating its
    workers. Elsewhere (one process, no restarts allowed) the exit alone is enough."""
    if (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
            and os.environ.get("LOCAL_RANK", "0") == "0"):
        if master:
            print(f"{program}: error: {message}", file=sys.stderr, flush=True)
        os.kill(os.getppid(), signal.SIGTERM)
        sys.exit(1)
    fail(program, message, master)


EXPECTED = ("expected train.py's checkpoint.pth or a state dict of tensors "
            "(torch.save(encoder.state_dict()))")


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
        what = (f"a pickle holding {foreign.group(1)} objects, which torch.load(weights_only=True) "
                "refuses to run (a whole pickled model or argparse Namespace?)")
    elif zipped and not zipfile.is_zipfile(path):
        what = "a torch.save file cut short or damaged (an interrupted copy or download?)"
    elif not zipped:
        what = "not a torch.save file"
    else:
        first = text.strip().splitlines()[0] if text.strip() else "no reason given"
        what = f"a torch.save file that cannot be loaded ({first})"
    raise ValueError(f"cannot read checkpoint {path}: it is {what}; {EXPECTED}")


def cosine_lr(step, total_steps, base_lr, warmup_steps=0):
    """Linear warm-up over warmup_steps, then cosine decay from base_lr to 0 at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))


def run_script(main, program, interrupted_message):
    """Run a script's main() so that its two ways of ending outside main() take one line: Ctrl-C
    (exit 130, rank 0 prints interrupted_message()) and an unreadable file met in a DataLoader
    worker (whose error arrives wrapped in the worker's traceback)."""
    try:
        main()
    except KeyboardInterrupt:
        for bar in list(tqdm._instances):       # clear the progress bar's half line
            bar.close()
        if os.environ.get("RANK", "0") == "0":
            print(interrupted_message(), file=sys.stderr)
        sys.exit(130)
    except data.DataError as e:
        sys.exit(f"{program}: error: {e.sentence()}")
