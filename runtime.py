"""What the scripts need from the process they run in: the distributed set-up and the
DataLoader workers per rank, the device's AMP dtype, one-line failures, the learning-rate
schedule, and the collectives that keep a feature bank sharded over the ranks.

    rank, world, device = setup_distributed(timeout_minutes=60)  # torchrun, or one process
    amp_dtype = autocast_dtype(device)                            # bf16 / fp16 on CUDA, None on CPU
    fail("train.py", "--lr must be > 0")                          # one line, no traceback
    x = gather_rows(rows, indices, N, device)                     # [N, D] on rank 0
"""
import functools
import math
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
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


WORKERS_HELP = ("DataLoader worker processes per rank for on-disk datasets (default: the node's "
                "usable cores / ranks on this node, less one for the rank itself); in-memory "
                "CIFAR needs none: it decodes an ImageFolder tree once with this many threads")


def default_workers(cores=None, local_world_size=None):
    """DataLoader workers per rank when --workers is not given: this node's usable cores shared
    among its ranks, less one for the rank's own process, at least 1. Not capped: a node of 8
    GPUs with 28 cores each needs them all to decode ImageNet as fast as a ResNet-50 trains
    (README, 'Several GPUs and ImageNet'). cores: os.sched_getaffinity's count;
    local_world_size: torchrun's LOCAL_WORLD_SIZE (1 without torchrun)."""
    if cores is None:
        cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count() or 1)
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, cores // local_world_size - 1)


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


def rank_world():
    """(rank, world size) of this process: (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def on_rank0(compute):
    """Collective under torchrun: compute() on rank 0 alone, its (picklable) result on every
    rank. For what only rank 0 does (it alone writes files), so that all ranks act on it."""
    rank, world = rank_world()
    result = [compute() if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]


def fail(program, message, master=None):
    """Stop with a one-line error, printed once (by rank 0; master None: read from torchrun's
    RANK), instead of a traceback."""
    if master is None:
        master = os.environ.get("RANK", "0") == "0"
    sys.exit(f"{program}: error: {message}" if master else 1)


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


def cosine_lr(step, total_steps, base_lr, warmup_steps=0):
    """Linear warm-up over warmup_steps, then cosine decay from base_lr to 0 at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * progress))


class Refusal(ValueError):
    """Bad input, said in one sentence: a script ends with it instead of a traceback."""


def one_line_errors(program):
    """Decorator of a script's main(): a Refusal, a DataNotFound or a DataError raised anywhere
    below ends the run with `program: error: sentence` (printed once, by rank 0)."""
    def wrap(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except (Refusal, data.DataNotFound, data.DataError) as e:
                fail(program, e.sentence() if isinstance(e, data.DataError) else str(e))
        return run
    return wrap


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


# ---------------------------------------------------------------------------------------------
# Rows kept by rank, gathered onto rank 0 (the feature banks of cluster.py and monitor.py)
# ---------------------------------------------------------------------------------------------

def owned(indices, num_samples, device):
    """Collective: the mask [n] of this rank's indices that it keeps: the first of its repeats,
    unless a lower rank drew the index too. Raises on every rank when an index anywhere lies
    outside [0, N) or when one was drawn by no rank."""
    rank, world_size = rank_world()
    bad = bool(len(indices)) and not 0 <= int(indices.min()) <= int(indices.max()) < num_samples
    # Each index's lowest rank that drew it (world_size: none did); slot N flags a bad index.
    owner = torch.full((num_samples + 1,), world_size, dtype=torch.int32)
    if bad:
        owner[num_samples] = rank
    else:
        owner[indices] = rank
    if world_size > 1:
        owner = owner.to(device)
        dist.all_reduce(owner, op=dist.ReduceOp.MIN)
        owner = owner.cpu()
    if owner[num_samples] < world_size:
        raise index_error(indices if bad else None, num_samples)
    missing = int((owner[:num_samples] == world_size).sum())
    if missing:
        raise RuntimeError(f"{missing} of {num_samples} dataset indices never came out "
                           "of the loader")
    order = torch.argsort(indices, stable=True)
    ordered = indices[order]
    first = torch.ones(len(indices), dtype=torch.bool)
    first[order[1:]] = ordered[1:] != ordered[:-1]
    return first & (owner[indices] == rank)


@torch.no_grad()
def gather_rows(rows, indices, num_samples, device, dtype=None, step_bytes=1 << 26):
    """Collective: every rank's rows [n, D] put in dataset-index order on rank 0.

    indices [n] are the rows' dataset indices; over the ranks, every index in [0, N) once (a
    Shard's). The rows travel in steps of about step_bytes over all ranks (64 MiB), so that
    rank 0 holds the output and one step, never a second [N, D]. Returns [N, D] CPU in dtype
    (default the rows') on rank 0, None on the other ranks.
    """
    rank, world_size = rank_world()
    dtype = dtype or rows.dtype
    if world_size == 1:
        if dtype == rows.dtype and torch.equal(indices, torch.arange(len(rows))):
            return rows
        sizes = torch.tensor([len(rows), rows.shape[1]])
    else:
        # A rank may hold no rows at all ([0, 0]): the width comes from the others.
        sizes = torch.tensor([len(rows), rows.shape[1]], device=device)
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    most, width = (int(s) for s in sizes)
    rows = rows.reshape(-1, width)
    per_step = chunk_rows(world_size * width * rows.element_size(), step_bytes)
    out = torch.empty(num_samples, width, dtype=dtype) if rank == 0 else None
    for start in range(0, most, per_step):
        part, part_indices = rows[start:start + per_step], indices[start:start + per_step]
        if world_size > 1:
            pad = per_step - len(part)  # gather needs equal shapes; padded rows have index -1
            part = F.pad(part.to(device), (0, 0, 0, pad))
            part_indices = F.pad(part_indices.to(device), (0, pad), value=-1)
            parts = [torch.empty_like(part) for _ in range(world_size)] if rank == 0 else None
            index_parts = ([torch.empty_like(part_indices) for _ in range(world_size)]
                           if rank == 0 else None)
            dist.gather(part, parts, dst=0)
            dist.gather(part_indices, index_parts, dst=0)
            if rank != 0:
                continue
        else:
            parts, index_parts = [part], [part_indices]
        for part, part_indices in zip(parts, index_parts):
            part, part_indices = part.cpu(), part_indices.cpu()
            real = part_indices >= 0
            out[part_indices[real]] = part[real].to(dtype)
    return out


def index_error(indices, num_samples):
    """The ValueError for dataset indices outside [0, N); indices None:
    they were on another rank."""
    got = ("others on another rank" if indices is None
           else f"{int(indices.min())}..{int(indices.max())}")
    return ValueError(f"dataset indices must lie in [0, {num_samples}), got {got}")




def chunk_rows(row_bytes, budget=1 << 27):
    """Rows per chunk of work, so that a chunk's temporaries stay near budget bytes (128 MiB)."""
    return max(1, budget // max(1, row_bytes))


def check_partition(features, indices, num_samples, device):
    """Collective: a ValueError on every rank unless the ranks' rows features [n, F] with their
    dataset indices [n] hold every index in [0, N) exactly once (a cluster.Shard each)."""
    rank, world = rank_world()
    bad = (features.dim() != 2 or indices.shape != features.shape[:1]
           or bool(len(indices)) and not 0 <= int(indices.min()) <= int(indices.max())
           < num_samples)
    # How often each index is held, over the ranks (slot N: bad input on some rank); 5 MB at
    # ImageNet size, for a partition that rank 0's buffer relies on.
    hits = torch.zeros(num_samples + 1, dtype=torch.int32)
    hits[num_samples] = int(bad)
    if not bad:
        hits[:num_samples] = torch.bincount(indices, minlength=num_samples)
    if world > 1:
        hits = hits.to(device)
        dist.all_reduce(hits)
        hits = hits.cpu()
    if hits[num_samples]:
        raise ValueError(f"every rank must pass features [n, F] and their dataset indices [n] in "
                         f"[0, {num_samples}), got {tuple(features.shape)} and "
                         f"{tuple(indices.shape)} here")
    total = int(hits[:num_samples].sum())
    if total != num_samples:
        raise ValueError(f"got {total} features for num_samples={num_samples}")
    if not (hits[:num_samples] == 1).all():
        raise ValueError(f"{int((hits[:num_samples] == 0).sum())} dataset indices are on no rank "
                         "and others on several: give each rank its Shard")


def node_threads():
    """The CPU cores this process may run on: all of the node's unless a launcher pinned it."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
