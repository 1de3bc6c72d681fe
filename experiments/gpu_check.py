"""One prepared check of the CUDA path on one GPU, about 5-8 minutes: one JSON line per section.

    bash experiments/gpu_check.sh             # installs the carried faiss wheel, then runs this
    python experiments/gpu_check.py --smoke   # the same sections at toy sizes (CPU is fine)

Sections:
    env       the machine: GPU, torch, faiss and its threads.
    step      one training step of ResNet-50 at 224 px (bf16 autocast, channels_last, LARS and the
              heads' SGD), SPCL and SimCLR on the same inputs already on the GPU: views/s, ms a
              step, peak GPU memory, and the SPCL / SimCLR time ratio.
    syncs     train.py's own epoch (in-memory views made on the GPU), run as a child process
              under torch.cuda.set_sync_debug_mode("warn"): the host-device synchronisations, by
              line of the repository. The steady state should have none between the --log-every
              reads (--log-every 1000: one read at the epoch's end).
    features  the feature pass (monitor.extract_features) of ResNet-50 in eval mode: images/s.
    cluster   the clustering step at ImageNet-1k size (N = 1,281,167 float16 features, F = 2048,
              K = 1000): PCA-whitening and k-means with the machine's threads (faiss on the GPU
              when faiss sees one), seconds and host peak memory.
    decode    experiments/bench.py's views_disk section, run as a child process: on-disk SimCLR
              views of ImageNet-sized JPEGs on one core, against torchvision's PIL recipe.
It imports library modules only; train.py and bench.py run as child processes.
"""
import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import cluster  # noqa: E402
import monitor  # noqa: E402
from lars import LARS  # noqa: E402
from models import SPCLModel, TrainingStep  # noqa: E402


def emit(section, **values):
    print(json.dumps({"section": section, **values}), flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def env(args, device):
    try:
        import faiss
        faiss_info = {"faiss": faiss.__version__, "faiss_gpus": faiss.get_num_gpus(),
                      "faiss_threads": faiss.omp_get_max_threads()}
    except ImportError:
        faiss_info = {"faiss": None}
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    emit("env", torch=torch.__version__, gpu=gpu, cores=len(os.sched_getaffinity(0)),
         bf16=device.type == "cuda" and torch.cuda.is_bf16_supported(), **faiss_info)


def step(args, device):
    """SPCL and SimCLR steps on the same batch already on the device."""
    torch.backends.cudnn.benchmark = device.type == "cuda"
    amp = torch.bfloat16 if device.type == "cuda" else None
    B = args.batch                                          # images: P anchors + P partners
    g = torch.Generator().manual_seed(0)
    v1, v2 = (torch.randn(B, 3, args.size, args.size, generator=g).to(device)
              .contiguous(memory_format=torch.channels_last) for _ in range(2))
    assignments = torch.randint(0, 1000, (B, 1), generator=g).to(device)
    same = (torch.arange(B // 2) % 2).to(device)
    results = {}
    for arm, weights in (("simclr", dict(w_metric=0, w_proto=0, contrast="joint")),
                         ("spcl", dict(w_metric=1, w_proto=1, contrast="per-side"))):
        torch.manual_seed(0)
        model = SPCLModel(args.arch, cifar_stem=args.size <= 64,
                          num_prototypes=[1000] if weights["w_proto"] else ())
        model = model.to(device, memory_format=torch.channels_last)
        module = TrainingStep(model, temperature=0.1, **weights)
        heads = {id(p) for p in model.proto_heads.parameters()}
        lars = LARS([p for p in model.parameters() if id(p) not in heads], lr=1.0,
                    weight_decay=1e-6)
        sgd = (torch.optim.SGD(model.proto_heads.parameters(), lr=1.0) if heads else None)

        def one_step():
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss, _ = module(v1, v2, same, assignments, True)
            model.zero_grad(set_to_none=True)
            loss.backward()
            lars.step()
            if sgd:
                sgd.step()

        for _ in range(args.warmup):
            one_step()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            one_step()
        sync(device)
        seconds = (time.perf_counter() - start) / args.steps
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        results[arm] = seconds
        emit("step", arm=arm, arch=args.arch, images=B, views=2 * B, size=args.size,
             ms_per_step=round(1000 * seconds, 2), views_per_second=round(2 * B / seconds),
             peak_gpu_gb=peak and round(peak, 2), amp=str(amp), channels_last=True)
        del model, module, lars, sgd
        if device.type == "cuda":
            torch.cuda.empty_cache()
    emit("step", spcl_over_simclr=round(results["spcl"] / results["simclr"], 3))


def fake_cifar(root, per_class, size=32):
    """An ImageFolder tree of random PNGs: the in-memory (CIFAR) path reads it like CIFAR-10."""
    from PIL import Image
    g = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 4)):
        for c in range(10):
            folder = os.path.join(root, split, f"class{c}")
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                pixels = g.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))


def syncs(args, device):
    """train.py's epoch in a child process under the sync debug mode: each synchronisation's
    warning names its line; those of the repository's files are counted."""
    root, out = tempfile.mkdtemp(), tempfile.mkdtemp()
    try:
        fake_cifar(root, per_class=args.sync_images // 10)
        argv = ["train.py", "--dataset", "cifar10", "--data", root, "--out", out, "--arch",
                args.sync_arch, "--epochs", "1", "--batch-size", "128", "--num-prototypes", "16",
                "--log-every", "1000", "--workers", "0"]
        child = ("import runpy, sys, torch\n"
                 "if torch.cuda.is_available():\n"
                 "    torch.cuda.set_sync_debug_mode('warn')\n"
                 f"sys.argv = {argv!r}\n"
                 "runpy.run_path('train.py', run_name='__main__')\n")
        done = subprocess.run([sys.executable, "-W", "always", "-c", child], cwd=ROOT,
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(done.stderr[-1500:])
        where = {}
        for line in done.stderr.splitlines():
            found = re.match(r"(/\S+\.py):(\d+): UserWarning: called a synchronizing", line)
            if found and os.path.dirname(os.path.abspath(found[1])) == ROOT:
                key = f"{os.path.basename(found[1])}:{found[2]}"
                where[key] = where.get(key, 0) + 1
        with open(os.path.join(out, "metrics.jsonl")) as f:
            steps = round(json.loads(f.readline())["images_seen"] / 128)
        emit("syncs", counted=device.type == "cuda", steps=steps, where=where,
             train_one_epoch_syncs=sum(n for k, n in where.items() if k.startswith("train.py")))
    finally:
        shutil.rmtree(root)
        shutil.rmtree(out)


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


def clustering(args, device):
    """The clustering step at ImageNet-1k size, with the machine's threads."""
    N, F, K = args.cluster_n, args.cluster_f, args.cluster_k
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(K, F, generator=g)
    feats = torch.empty(N, F, dtype=torch.float16)
    for start in range(0, N, 65536):                 # clustered synthetic features, in chunks
        end = min(N, start + 65536)
        labels = torch.randint(0, K, (end - start,), generator=g)
        feats[start:end] = (centres[labels] + 2 * torch.randn(end - start, F, generator=g)).half()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    # One process holds all N rows here; under torchrun each rank would hold N / world of them.
    assignments, stats = cluster.distributed_kmeans(feats, [K], N, seed=0, niter=args.kmeans_iters,
                                                    pca_dim=256, device=device)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    emit("cluster", n=N, f=F, k=K, iterations=args.kmeans_iters, seconds=round(seconds, 1),
         preprocess_seconds=round(stats[0]["preprocess_seconds"], 1),
         kmeans_seconds=round(stats[0]["seconds"], 1), threads=stats[0].get("threads"),
         host_peak_gb=round(peak, 2),
         host_peak_gb_before_clustering=round(before, 2), empty_clusters=stats[0]["empty_clusters"])


def decode(args, device):
    """experiments/bench.py --only views_disk as a child: its JSON line, re-emitted."""
    done = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--only", "views_disk",
                           "--repeat", "2" if args.smoke else "6"], capture_output=True,
                          text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-1500:])
    line = json.loads(done.stdout.strip().splitlines()[-1])
    emit("decode", **{k: v for k, v in line.items() if k != "section"})


SECTIONS = {"env": env, "step": step, "syncs": syncs, "features": features,
            "cluster": clustering, "decode": decode}


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help="comma list of sections")
    p.add_argument("--smoke", action="store_true", help="toy sizes, to check the script runs")
    args = p.parse_args()
    full = dict(arch="resnet50", size=224, batch=256, warmup=5, steps=15, sync_images=1280,
                sync_arch="resnet18",
                feature_batches=16, cluster_n=1_281_167, cluster_f=2048, cluster_k=1000,
                kmeans_iters=20)
    smoke = dict(arch="resnet18_narrow", size=32, batch=16, warmup=1, steps=2, sync_images=320,
                 sync_arch="resnet18_narrow",
                 feature_batches=2, cluster_n=2000, cluster_f=64, cluster_k=10, kmeans_iters=5)
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
