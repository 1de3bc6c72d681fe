"""One prepared check of the CUDA path on one GPU, under 6 minutes: one JSON line per section.

    bash experiments/gpu_check.sh             # refuses without a GPU; installs a carried faiss
    python experiments/gpu_check.py --smoke   # the same sections at toy sizes (CPU is fine)

Sections:
    env       the machine: GPU, torch, faiss and its threads, cores.
    step      one training step of ResNet-50 at 224 px (bf16 autocast, channels_last, LARS and the
              heads' SGD), SPCL and SimCLR on the same inputs already on the GPU: views/s, ms a
              step, peak GPU memory, and the SPCL / SimCLR time ratio.
    syncs     train.py's own epoch (in-memory views made on the GPU), run as a child process
              under torch.cuda.set_sync_debug_mode("warn"): the host-device synchronisations, by
              line of the repository. The steady state should have none between the --log-every
              reads (--log-every 1000: one read at the epoch's end).
    features  the feature pass (monitor.extract_features) of ResNet-50 in eval mode: images/s.
    cluster   the clustering step at ImageNet-1k size (N = 1,281,167 float16 features, F = 2048,
              K = 1000), one process: PCA-whitening on the GPU, then the k-means that
              cluster.kmeans_backend picks there; seconds and host peak memory.
    kmeans    cluster.torch_kmeans at ImageNet size on the GPU (N = 1,281,167 whitened rows,
              d = 256, K = 1000, 20 iterations; target under 10 s), and faiss on the CPU's cores
              on the same rows when faiss is installed: seconds, objectives, NMI between them.
    torchrun  train.py under torchrun --nproc_per_node 1 (NCCL: a process group with the device
              id, DDP around the model and heads, NT-Xent's all-gather), on-disk ImageFolder
              views from DataLoader workers, a checkpoint written inside epoch 1 and resumed.
    pipeline  the on-disk pipeline into the step: 256-400 px JPEGs decoded, cropped and flipped
              by DataLoader workers (all cores but one), the rest of the views made on the GPU,
              then the SPCL step of `step` for a few hundred steps: views/s, and the GPU's idle
              share against the same steps with the views already there.
    decode    experiments/bench.py --only views_disk,probe_disk as a child process: on-disk views
              on one core against torchvision's PIL recipe, and the wait of the Fig. 2b probe's
              views in one batch against batches that all workers share.
It imports library modules only; train.py and bench.py run as child processes. The torch k-means
needs no faiss: without it, train.py and `cluster` use torch's k-means on the GPU.
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import cluster  # noqa: E402
import data  # noqa: E402
import monitor  # noqa: E402
import runtime  # noqa: E402
from lars import LARS  # noqa: E402
from models import SPCLModel, TrainingStep  # noqa: E402


def emit(section, **values):
    print(json.dumps({"section": section, **values}), flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def env(args, device):
    faiss = cluster.faiss
    faiss_info = ({"faiss": faiss.__version__, "faiss_gpus": faiss.get_num_gpus(),
                   "faiss_threads": faiss.omp_get_max_threads()} if faiss else {"faiss": None})
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    emit("env", torch=torch.__version__, gpu=gpu, cores=runtime.node_threads(),
         bf16=device.type == "cuda" and torch.cuda.is_bf16_supported(),
         kmeans_backend=cluster.kmeans_backend(None, device)[0], **faiss_info)


def make_step(args, device, spcl):
    """One SPCL (or SimCLR) training step of args.arch as train.py takes it: (step(v1, v2), the
    modules to free). K = 1000 random pair labels."""
    weights = (dict(w_metric=1, w_proto=1, contrast="per-side") if spcl
               else dict(w_metric=0, w_proto=0, contrast="joint"))
    amp = torch.bfloat16 if device.type == "cuda" else None
    g = torch.Generator().manual_seed(0)
    assignments = torch.randint(0, 1000, (args.batch, 1), generator=g).to(device)
    same = (torch.arange(args.batch // 2) % 2).to(device)
    torch.manual_seed(0)
    model = SPCLModel(args.arch, cifar_stem=args.size <= 64, num_prototypes=[1000] if spcl else ())
    model = model.to(device, memory_format=torch.channels_last)
    module = TrainingStep(model, temperature=0.1, **weights)
    heads = {id(p) for p in model.proto_heads.parameters()}
    lars = LARS([p for p in model.parameters() if id(p) not in heads], lr=1.0, weight_decay=1e-6)
    sgd = torch.optim.SGD(model.proto_heads.parameters(), lr=1.0) if heads else None

    def step(v1, v2):
        v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in (v1, v2))
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss, _ = module(v1, v2, same, assignments, True)
        model.zero_grad(set_to_none=True)
        loss.backward()
        lars.step()
        if sgd:
            sgd.step()
    return step


def timed_steps(step, batches, device, warmup):
    """Seconds a step, over the batches after the first `warmup` ones."""
    start, counted = None, 0
    for i, (v1, v2) in enumerate(batches):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        step(v1, v2)
        counted += i >= warmup
    sync(device)
    return (time.perf_counter() - start) / counted


def step(args, device):
    """SPCL and SimCLR steps on the same batch already on the device."""
    torch.backends.cudnn.benchmark = device.type == "cuda"
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
             for _ in range(2)]
    results = {}
    for arm in ("simclr", "spcl"):
        one = make_step(args, device, arm == "spcl")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = timed_steps(one, [views] * (args.warmup + args.steps), device, args.warmup)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        results[arm] = seconds
        emit("step", arm=arm, arch=args.arch, images=args.batch, views=2 * args.batch,
             size=args.size, ms_per_step=round(1000 * seconds, 2),
             views_per_second=round(2 * args.batch / seconds), peak_gpu_gb=peak and round(peak, 2),
             amp="bfloat16" if device.type == "cuda" else "None", channels_last=True)
        del one
        if device.type == "cuda":
            torch.cuda.empty_cache()
    emit("step", spcl_over_simclr=round(results["spcl"] / results["simclr"], 3))


def fake_cifar(root, per_class, size=32):
    """An ImageFolder tree of random PNGs: the in-memory (CIFAR) path reads it like CIFAR-10."""
    g = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 4)):
        for c in range(10):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                pixels = g.integers(0, 256, (size, size, 3), dtype=np.uint8)
                data.Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))


def run(command, **kwargs):
    """A child process from the repository's root; its output, or a RuntimeError with its end."""
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, **kwargs)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command[:4])}... exit {done.returncode}: "
                           f"{done.stderr[-1500:]}")
    return done


def syncs(args, device):
    """train.py's epoch in a child process under the sync debug mode: each synchronisation's
    warning names its line; those of the repository's files are counted."""
    with tempfile.TemporaryDirectory() as root:
        fake_cifar(os.path.join(root, "data"), per_class=args.sync_images // 10)
        argv = ["train.py", "--dataset", "cifar10", "--data", os.path.join(root, "data"),
                "--out", os.path.join(root, "out"), "--arch", args.sync_arch, "--epochs", "1",
                "--batch-size", "128", "--num-prototypes", "16", "--log-every", "1000",
                "--workers", "0"]
        child = ("import runpy, sys, torch\n"
                 "if torch.cuda.is_available():\n"
                 "    torch.cuda.set_sync_debug_mode('warn')\n"
                 f"sys.argv = {argv!r}\n"
                 "runpy.run_path('train.py', run_name='__main__')\n")
        done = run([sys.executable, "-W", "always", "-c", child])
        where = {}
        for line in done.stderr.splitlines():
            found = re.match(r"(/\S+\.py):(\d+): UserWarning: called a synchronizing", line)
            if found and os.path.dirname(os.path.abspath(found[1])) == ROOT:
                key = f"{os.path.basename(found[1])}:{found[2]}"
                where[key] = where.get(key, 0) + 1
        with open(os.path.join(root, "out", "metrics.jsonl")) as f:
            steps = round(json.loads(f.readline())["images_seen"] / 128)
    emit("syncs", counted=device.type == "cuda", steps=steps, where=where,
         train_one_epoch_syncs=sum(n for k, n in where.items() if k.startswith("train.py")))


def features(args, device):
    """extract_features of a ResNet-50 over images already on the device."""
    torch.backends.cudnn.benchmark = device.type == "cuda"
    amp = torch.bfloat16 if device.type == "cuda" else None
    model = SPCLModel(args.arch, cifar_stem=args.size <= 64).to(
        device, memory_format=torch.channels_last).eval()
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    loader = [(images, torch.zeros(args.batch, dtype=torch.int64),
               torch.arange(b * args.batch, (b + 1) * args.batch))
              for b in range(args.feature_batches)]
    n = args.batch * args.feature_batches
    for x, _, _ in loader[:2]:                       # warm-up: cudnn picks its algorithms
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            model.encoder(x)
    sync(device)
    start = time.perf_counter()
    monitor.extract_features(model.encoder, loader, n, device, amp_dtype=amp)
    sync(device)
    seconds = time.perf_counter() - start
    emit("features", arch=args.arch, images=n, size=args.size, seconds=round(seconds, 2),
         images_per_second=round(n / seconds))


def clustered_rows(n, dim, k, device, noise, dtype=torch.float32):
    """n synthetic rows [n, dim] around k random centres, made on the device in chunks."""
    g = torch.Generator(device=device).manual_seed(0)
    centres = torch.randn(k, dim, generator=g, device=device)
    rows = torch.empty(n, dim, dtype=dtype, device=device)
    for start in range(0, n, 65536):
        end = min(n, start + 65536)
        labels = torch.randint(0, k, (end - start,), generator=g, device=device)
        rows[start:end] = centres[labels] + noise * torch.randn(end - start, dim, generator=g,
                                                                device=device)
    return rows


def clustering(args, device):
    """The clustering step at ImageNet-1k size, with the machine's threads."""
    N, K = args.cluster_n, args.cluster_k
    feats = clustered_rows(N, args.cluster_f, K, device, 2.0, torch.float16).cpu()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    # One process holds all N rows here; under torchrun each rank would hold N / world of them.
    assignments, stats = cluster.distributed_kmeans(feats, [K], N, seed=0, niter=args.kmeans_iters,
                                                    pca_dim=256, device=device)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    emit("cluster", n=N, f=args.cluster_f, k=K, iterations=args.kmeans_iters,
         seconds=round(seconds, 1), preprocess_seconds=round(stats[0]["preprocess_seconds"], 1),
         kmeans_seconds=round(stats[0]["seconds"], 1), backend=stats[0]["backend"],
         threads=stats[0].get("threads"), host_peak_gb=round(peak, 2),
         host_peak_gb_before_clustering=round(before, 2), empty_clusters=stats[0]["empty_clusters"])


def kmeans(args, device):
    """torch_kmeans on the device against faiss on the CPU's cores, on the same whitened rows."""
    N, K = args.cluster_n, args.cluster_k
    x = F.normalize(clustered_rows(N, 256, K, device, 1.0), dim=1).cpu()
    results = {}
    for backend, where in (("torch", device), ("faiss", torch.device("cpu"))):
        if backend == "faiss" and cluster.faiss is None:
            continue
        assignments, _, stats = cluster.run_kmeans(x, K, seed=0, niter=args.kmeans_iters,
                                                   pca_dim=0, device=where, backend=backend)
        results[backend] = (assignments, stats)
    line = {f"{b}_seconds": round(s["seconds"], 2) for b, (_, s) in results.items()}
    line.update({f"{b}_objective": round(s["objective"], 1) for b, (_, s) in results.items()})
    if len(results) == 2:
        line["nmi"] = round(monitor.nmi(results["torch"][0], results["faiss"][0]), 4)
        seconds = {b: s["seconds"] for b, (_, s) in results.items()}
        line["torch_over_faiss"] = round(seconds["torch"] / max(seconds["faiss"], 1e-9), 3)
    emit("kmeans", n=N, d=256, k=K, iterations=args.kmeans_iters, device=str(device),
         torch_backend=results["torch"][1]["backend"], cores=runtime.node_threads(), **line)


def torchrun(args, device):
    """train.py under torchrun with one process (NCCL on a GPU), then resumed inside epoch 1."""
    with tempfile.TemporaryDirectory() as root:
        fake_cifar(os.path.join(root, "data"), per_class=args.sync_images // 10)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", "1", "train.py", "--dataset", "folder", "--image-size",
                   "32", "--data", os.path.join(root, "data"), "--out", os.path.join(root, "out"),
                   "--arch", args.sync_arch, "--epochs", "2", "--batch-size", "64",
                   "--num-prototypes", "16", "--save-every", "3", "--knn-every", "1"]
        start = time.perf_counter()
        first = run(command + ["--stop-after", "1"])
        out = os.path.join(root, "out")             # the checkpoint --save-every left in epoch 1
        os.replace(os.path.join(out, "checkpoint.prev.pth"), os.path.join(out, "checkpoint.pth"))
        second = run(command)
        seconds = time.perf_counter() - start
        with open(os.path.join(root, "out", "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    backend = "nccl" if device.type == "cuda" else "gloo"
    emit("torchrun", backend=backend, epochs=[r["epoch"] for r in rows],
         resumed="resumed from" in second.stdout, knn_top1=rows[-1].get("knn_top1"),
         loss=round(rows[-1]["loss_total"], 4), kmeans_backend=rows[-1]["kmeans_k16"]["backend"],
         seconds=round(seconds, 1), first_run_lines=len(first.stdout.splitlines()))


def pipeline(args, device):
    """On-disk views into the SPCL step: views/s, and the step's idle share against views there."""
    with tempfile.TemporaryDirectory() as root:
        folder, _ = data.synthetic_jpegs(root, args.jpegs)
        views = data.Views(folder, args.size, data.MEAN_STD["imagenet"], jitter=1.0,
                           workers=runtime.default_workers(), device=device)
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, len(folder), (args.batch,), generator=g)
                   for _ in range(args.pipeline_steps)]
        one = make_step(args, device, spcl=True)
        made = ((v1, v2) for (v1, v2), _, _ in views.batches(batches, "simclr", key=(0,),
                                                              copies=2))
        start = time.perf_counter()
        with_views = timed_steps(one, made, device, args.warmup)
        wall = time.perf_counter() - start
        there = next(iter(views.batches(batches[:1], "simclr", key=(0,), copies=2)))[0]
        alone = timed_steps(one, [there] * (args.warmup + args.steps), device, args.warmup)
    emit("pipeline", images=len(folder), workers=views.workers, steps=args.pipeline_steps,
         views_per_second=round(2 * args.batch / with_views), ms_per_step=round(1e3 * with_views),
         ms_per_step_views_there=round(1e3 * alone), idle_share=round(1 - alone / with_views, 3),
         wall_seconds=round(wall, 1))


def decode(args, device):
    """experiments/bench.py --only views_disk,probe_disk as a child: its JSON lines re-emitted."""
    done = run([sys.executable, os.path.join(HERE, "bench.py"), "--only",
                "views_disk,probe_disk", "--repeat", "1" if args.smoke else "6"]
               + (["--images", "16"] if args.smoke else []))
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            values = json.loads(line)
            emit("decode", bench=values.pop("section"), **values)


SECTIONS = {"env": env, "step": step, "syncs": syncs, "features": features,
            "cluster": clustering, "kmeans": kmeans, "torchrun": torchrun, "pipeline": pipeline,
            "decode": decode}


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help="comma list of sections")
    p.add_argument("--smoke", action="store_true", help="toy sizes, to check the script runs")
    args = p.parse_args()
    full = dict(arch="resnet50", size=224, batch=256, warmup=5, steps=15, sync_images=1280,
                sync_arch="resnet18", feature_batches=16, cluster_n=1_281_167, cluster_f=2048,
                cluster_k=1000, kmeans_iters=20, jpegs=1024, pipeline_steps=200)
    smoke = dict(arch="resnet18_narrow", size=32, batch=16, warmup=1, steps=2, sync_images=320,
                 sync_arch="resnet18_narrow", feature_batches=2, cluster_n=2000, cluster_f=64,
                 cluster_k=10, kmeans_iters=5, jpegs=24, pipeline_steps=4)
    for key, value in (smoke if args.smoke else full).items():
        setattr(args, key, value)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name in args.only.split(","):
        try:
            SECTIONS[name](args, device)
        except Exception as e:                       # one broken section must not cost the rest
            emit(name, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-1500:])


if __name__ == "__main__":
    main()
