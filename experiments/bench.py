"""Performance benchmark: every number is a ratio against a baseline measured in the same run,
because shared machines are noisy. Runs on the CPU or, when present, one GPU.

    python experiments/bench.py                      # every section
    python experiments/bench.py --only nt_xent,lars  # some of them

Sections and their targets:
    nt_xent   losses.nt_xent forward+backward against a minimal NT-Xent (normalise, one matmul,
              mask the diagonal, cross_entropy): time and peak memory <= 1.1x; time ~4x per
              doubling of 2B (quadratic, not cubic).
    lars      one LARS step against one torch.optim.SGD(momentum=0.9) step on resnet50: <= 1.5x.
    kmeans    faiss k-means against scikit-learn's Lloyd (100k x 128, K=1000, 20 iterations; needs
              scikit-learn, which is not a requirement): faiss no slower. run_kmeans on
              CIFAR-10-shaped features (50k x 512, PCA 256, K=512): <= 5 s on 2 CPU cores.
    sampler   one epoch of prototype pairs at ImageNet size (N=1,281,167): <= 1 s.
    step      one SPCL training step against one SimCLR step, same images and model: <= 1.10x.
    step_input  the steady-state SPCL step with its views made by data.Views (in memory,
              BatchAugment on the training device) against the same step with the views already
              there: what making the views adds (train.py's step reads the device only every
              --log-every steps: test_spcl.py counts the reads, experiments/gpu_check.py the
              syncs on a GPU).
    augment   SimCLR views per second per core, data.BatchAugment against torchvision's PIL
              transforms on the same decoded images: >= 1.0x.
    views_disk  SimCLR views per second per core from JPEG files of ImageNet-like sizes (256-400
              px), data.Views on disk against torchvision's PIL recipe (its GaussianBlur, float
              views made per image), the same files, in a fresh process (glibc's allocator as a
              training process has it) on one thread: >= 3x. Both parts of data.Views run there:
              the workers' (decode, crop and flip in PIL) and the device's (colour jitter,
              grayscale, blur, normalisation, batched). With crop_flip_ratio, the workers' part
              alone: what a core does per view when the batched part runs on a GPU.
    epoch     one epoch of the small CPU configuration on real CIFAR-10 (needs
              ../shared/data/cifar10): the feature pass <= 20% of the epoch, k-means <= 2%.
    cluster_scale
              rank 0's clustering step at ImageNet-1k size (N = 1,281,167 float16 features,
              F = 2048, K = 1000, PCA 256, 20 iterations), each path in a fresh process:
              before, the bank gathered whole on rank 0 into the old run_kmeans_multi (a
              float32 copy, faiss.PCAMatrix, faiss on one thread as under torchrun); after,
              rank 0 of 8 torchrun ranks in cluster.distributed_kmeans. Peak resident memory
              above an idle interpreter with the same imports: after <= 3 GB. One JSON line.
              When the old path would take more than half of the free memory, it runs on a
              fraction of N and is scaled linearly (all of its memory and work grow with N).
"""
import argparse
import ctypes
import json
import os
import tempfile
import statistics
import subprocess
import sys
import time

import faiss
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2 as T

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data      # noqa: E402
import runtime   # noqa: E402
from cluster import distributed_kmeans, run_kmeans  # noqa: E402
from lars import LARS  # noqa: E402
from losses import nt_xent  # noqa: E402
import monitor  # noqa: E402
from models import SPCLModel, TrainingStep  # noqa: E402
from sampler import PrototypePairSampler  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CIFAR10 = os.path.join(ROOT, "..", "shared", "data", "cifar10")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat):
    """Median seconds of fn() over `repeat` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns, device, repeat):
    """Median seconds of each function, run in turns so that drifting machine load hits
    all alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, bucket in zip(fns, times):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            bucket.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _proc_status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


def peak_bytes(fn, device):
    """Peak bytes allocated while fn() runs, above what was live before (fn run once before)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    # CPU (Linux): glibc serves blocks >= 64 KiB with mmap and returns them at free (set below),
    # so the resident set follows the live tensors; writing 5 to clear_refs resets its peak.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status("VmRSS:")
    fn()
    return _proc_status("VmHWM:") - before


def _track_cpu_memory():
    """Make the resident set track freed tensors: a fixed mmap threshold of 64 KiB (glibc)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)    # -3 = M_MMAP_THRESHOLD
        open("/proc/self/clear_refs", "w").close()
        return True
    except OSError:
        return False


def reference_nt_xent(z1, z2, temperature):
    """The textbook NT-Xent every port starts from, the baseline of the nt_xent section."""
    B = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * B, dtype=torch.bool, device=z.device), float("-inf"))
    targets = (torch.arange(2 * B, device=z.device) + B) % (2 * B)
    return F.cross_entropy(sim, targets)


def bench_nt_xent(device, repeat):
    print("== nt_xent: forward+backward, D=128, ours / reference (target <= 1.10 time and memory)")
    print(f"{'2B':>6} {'ref ms':>9} {'ours ms':>9} {'time x':>7} {'ref MiB':>9} {'ours MiB':>9} "
          f"{'mem x':>6} {'growth':>7}")
    previous = None
    for two_b in (512, 1024, 2048, 4096):
        g = torch.Generator(device=device).manual_seed(two_b)
        z1 = torch.randn(two_b // 2, 128, device=device, generator=g, requires_grad=True)
        z2 = torch.randn(two_b // 2, 128, device=device, generator=g, requires_grad=True)
        ours = lambda: nt_xent(z1, z2, 0.5).backward()
        ref = lambda: reference_nt_xent(z1, z2, 0.5).backward()
        assert torch.allclose(nt_xent(z1, z2, 0.5), reference_nt_xent(z1, z2, 0.5), atol=1e-5)
        t_ref, t_ours = interleaved([ref, ours], device, repeat)
        m_ref = statistics.median(peak_bytes(ref, device) for _ in range(3))
        m_ours = statistics.median(peak_bytes(ours, device) for _ in range(3))
        growth = f"{t_ours / previous:7.2f}" if previous else f"{'':>7}"
        previous = t_ours
        print(f"{two_b:>6} {t_ref * 1e3:9.2f} {t_ours * 1e3:9.2f} {t_ours / t_ref:7.2f} "
              f"{m_ref / 2**20:9.1f} {m_ours / 2**20:9.1f} {m_ours / m_ref:6.2f} {growth}")
    print("(growth: ours' time over the previous row's; 4 = quadratic in 2B)")


def bench_lars(device, repeat):
    print("== lars: one optimiser step on resnet50's parameters, LARS / SGD(momentum=0.9) "
          "(target <= 1.50)")
    params = [torch.nn.Parameter(p.detach().to(device))
              for p in torchvision.models.resnet50().parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-6)
    lars = LARS(params, lr=0.1, weight_decay=1e-6)
    t_sgd, t_lars = interleaved([sgd.step, lars.step], device, repeat)
    print(f"{len(params)} tensors, {sum(p.numel() for p in params) / 1e6:.1f}M parameters: "
          f"SGD {t_sgd * 1e3:.1f} ms, LARS {t_lars * 1e3:.1f} ms, ratio {t_lars / t_sgd:.2f}")


def bench_kmeans(device, repeat):
    print("== kmeans: faiss k-means (target: no slower than scikit-learn; CIFAR-10 size <= 5 s); "
          "cluster.torch_kmeans on the same rows and cores")
    x = np.random.default_rng(0).normal(size=(100_000, 128)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)     # unit rows: pca_dim=0 leaves them as they are
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        KMeans = None
        print("scikit-learn is not installed: pip install scikit-learn for the comparison")
    faiss_s, sklearn_s, torch_s = [], [], []
    for _ in range(2):  # in turns, best of two: the machine may be shared
        faiss_s.append(run_kmeans(x, 1000, seed=0, niter=20, pca_dim=0, device="cpu",
                                  backend="faiss")[2]["seconds"])
        torch_s.append(run_kmeans(x, 1000, seed=0, niter=20, pca_dim=0, device="cpu",
                                  backend="torch")[2]["seconds"])
        if KMeans is not None:
            start = time.perf_counter()
            KMeans(1000, init="random", n_init=1, max_iter=20, tol=0, algorithm="lloyd",
                   random_state=0).fit(x)
            sklearn_s.append(time.perf_counter() - start)
    line = (f"100k x 128, K=1000, 20 iterations, {runtime.node_threads()} cores: faiss "
            f"{min(faiss_s):.2f} s, torch {min(torch_s):.2f} s, ratio torch / faiss "
            f"{min(torch_s) / min(faiss_s):.2f}")
    if sklearn_s:
        line += (f", scikit-learn {min(sklearn_s):.2f} s, ratio scikit-learn / faiss "
                 f"{min(sklearn_s) / min(faiss_s):.2f}")
    print(line)
    # ReLU features of a 10-class mixture, shaped like ResNet-18 features of CIFAR-10.
    rng = np.random.default_rng(0)
    feats = np.maximum(rng.normal(size=(10, 512))[rng.integers(0, 10, 50_000)]
                       + rng.normal(size=(50_000, 512)), 0)
    stats = run_kmeans(feats.astype(np.float32), 512, seed=0)[2]
    print(f"run_kmeans 50k x 512 -> PCA 256, K=512: "
          f"{stats['preprocess_seconds'] + stats['seconds']:.2f} s "
          f"(PCA and checks {stats['preprocess_seconds']:.2f} s); cluster sizes "
          f"{stats['size_min']}..{stats['size_max']}, {stats['empty_clusters']} empty")


def bench_sampler(device, repeat):
    print("== sampler: one epoch of pairs at ImageNet size, batch 4096 over 8 ranks "
          "(target <= 1 s)")
    n = 1_281_167
    rng = np.random.default_rng(0)
    for name, assignments in [("K=1000", rng.integers(0, 1000, n)),
                              ("K=10000", rng.integers(0, 10_000, n)),
                              ("singletons (SimCLR)", np.arange(n))]:
        sampler = PrototypePairSampler(assignments, 4096, num_replicas=8, rank=0)
        start = time.perf_counter()
        sampler.set_assignments(assignments)
        sampler.set_epoch(1)
        pairs = sampler.global_pairs()
        built = time.perf_counter() - start
        batches = list(sampler)
        print(f"{name:>20}: built in {built:.2f} s, with this rank's {len(batches)} batches "
              f"as lists {time.perf_counter() - start:.2f} s; "
              f"same share {pairs[:, 2].mean():.3f}")


def _step_setup(arch, batch, device, g):
    """The step of the step sections: random pair labels and assignments (K = 512), the model
    (CIFAR stem, channels_last), its TrainingStep (per-side) and LARS."""
    same = (torch.rand(batch // 2, generator=g) < 0.5).long().to(device)
    assignments = torch.randint(0, 512, (batch, 1), generator=g).to(device)
    model = SPCLModel(arch, cifar_stem=True, num_prototypes=[512]).to(
        device, memory_format=torch.channels_last)
    return same, assignments, TrainingStep(model, contrast="per-side"), LARS(model.parameters(),
                                                                             lr=0.1)


def bench_step(device, repeat):
    arch, batch = ("resnet18", 512) if device.type == "cuda" else ("resnet18_narrow", 256)
    print(f"== step: one training step (forward, Eq. 5, backward, LARS), {arch}, {batch} images, "
          "SPCL / SimCLR (target <= 1.10)")
    amp = torch.bfloat16 if device.type == "cuda" else None
    g = torch.Generator().manual_seed(0)
    v1, v2 = (torch.randn(batch, 3, 32, 32, generator=g).to(
        device, memory_format=torch.channels_last) for _ in range(2))
    same, assignments, step_module, optimizer = _step_setup(arch, batch, device, g)

    def step(use_prototypes):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = step_module(v1, v2, same, assignments, use_prototypes)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    t_simclr, t_spcl = interleaved([lambda: step(False), lambda: step(True)], device, repeat)
    print(f"SimCLR {t_simclr * 1e3:.1f} ms, SPCL {t_spcl * 1e3:.1f} ms, "
          f"ratio {t_spcl / t_simclr:.3f}")


def bench_step_input(device, repeat):
    arch, batch = ("resnet18", 512) if device.type == "cuda" else ("resnet18_narrow", 256)
    print(f"== step_input: the steady-state SPCL step, {arch}, {batch} images, its views made by "
          "data.Views (CIFAR-shaped uint8 images in memory, BatchAugment on the training device) "
          "/ the same step with the views already there")
    amp = torch.bfloat16 if device.type == "cuda" else None
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4 * batch, 32, 32, 3), dtype=torch.uint8, generator=g)
    dataset = data.InMemoryImages(images, torch.zeros(4 * batch, dtype=torch.int64), ["c"],
                                  *data.MEAN_STD["cifar10"])
    views = data.Views(dataset, 32, data.MEAN_STD["cifar10"], device=device)
    indices = [torch.randperm(4 * batch, generator=g)[:batch] for _ in range(repeat + 2)]
    batches = iter(views.batches(indices * 2, "simclr", key=(0,), copies=2))
    fixed = next(batches)[0]
    same, assignments, step_module, optimizer = _step_setup(arch, batch, device, g)

    def step(views_now):
        v1, v2 = (v.contiguous(memory_format=torch.channels_last) for v in views_now)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = step_module(v1, v2, same, assignments, True)[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    t_there, t_made = interleaved([lambda: step(fixed), lambda: step(next(batches)[0])], device,
                                  repeat)
    print(json.dumps({"section": "step_input", "arch": arch, "images": batch,
                      "ms_views_there": round(t_there * 1e3, 1),
                      "ms_views_made": round(t_made * 1e3, 1),
                      "ratio": round(t_made / t_there, 3)}))


def bench_augment(device, repeat):
    print("== augment: SimCLR views / s on one core, BatchAugment / torchvision PIL transforms "
          "(target >= 1.0)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    images = torch.randint(0, 256, (512, 32, 32, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    if os.path.isdir(os.path.join(CIFAR10, "test")):
        images = data.load_dataset("cifar10", CIFAR10, train=False, workers=2).images[:512]
    pil_images = [data.Image.fromarray(a.numpy()) for a in images]
    pil = data.simclr_transform(32, strength=0.5, blur=False, mean_std=data.MEAN_STD["cifar10"])
    batched = data.BatchAugment(32, data.MEAN_STD["cifar10"])
    g = torch.Generator().manual_seed(0)
    t_pil, t_batch = interleaved([lambda: [pil(im) for im in pil_images],
                                  lambda: batched(images, g)],
                                 torch.device("cpu"), max(1, repeat // 3))
    torch.set_num_threads(threads)
    print(f"PIL {len(images) / t_pil:.0f} views/s, BatchAugment {len(images) / t_batch:.0f} "
          f"views/s, ratio {t_pil / t_batch:.2f}")


def torchvision_simclr(size, strength, mean_std):
    """The views_disk baseline: SimCLR's augmentation of one PIL image as torchvision writes it
    (data.simclr_transform before it used PIL's blur and left normalising to the device)."""
    s = strength
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True), T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(2 * round(0.05 * size) + 1, sigma=(0.1, 2.0))], p=0.5),
        T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(*mean_std)])


def jpeg_folder(root, n):
    """data.synthetic_jpegs of CIFAR-10's test images, when ../shared/data/cifar10 is there."""
    return data.synthetic_jpegs(root, n, sources=os.path.join(CIFAR10, "test"))


def view_steps_ms(folder, mean_std):
    """Milliseconds per image of each step of a view, each applied to every image (the best of
    three passes): where the time of views_disk goes. colour_batched: data.Views' batched part,
    BatchAugment.colour and normalisation, on batches of 32 crops."""
    paths = [path for path, _ in folder.samples]
    images = [data.read_image(path) for path in paths]
    crop = T.RandomResizedCrop(224, scale=(0.08, 1.0), antialias=True)
    crops = [crop(image) for image in images]
    crop_batches = torch.stack([T.PILToTensor()(c) for c in crops]).split(32)
    augment = data.BatchAugment(224, mean_std, 1.0, blur=True)
    g = torch.Generator().manual_seed(0)
    steps = {"decode": lambda: [data.read_image(path) for path in paths],
             "crop": lambda: [crop(image) for image in images],
             "jitter": lambda: [T.ColorJitter(0.8, 0.8, 0.8, 0.2)(c) for c in crops],
             "blur_pil": lambda: [data.GaussianBlur()(c) for c in crops],
             "blur_torchvision": lambda: [T.GaussianBlur(23, (0.1, 2.0))(c) for c in crops],
             "to_float_normalised": lambda: [T.Compose(
                 [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(*mean_std)])(c)
                 for c in crops],
             "colour_batched": lambda: [data.standardise(augment.colour(
                 x.float().div_(255), g), mean_std) for x in crop_batches]}
    best = {}
    for name, step in steps.items():
        times = []
        for _ in range(3):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        best[name] = round(min(times) / len(paths) * 1e3, 2)
    return best


def views_disk_child(repeat, n=96):
    """views_disk in this fresh process, which keeps glibc's allocator as a DataLoader worker and a
    training process have it. bench.py's own process fixes a 64 KiB mmap threshold for its memory
    measures (_track_cpu_memory): every larger tensor is then a fresh mapping, zeroed page by page
    and unmapped when freed, a cost that the batched part's image-sized temporaries would pay
    over and over, and that no training process pays (glibc's threshold rises to the largest
    block freed, up to 32 MiB). One thread: the workers' part and the batched part both run here,
    on one core."""
    torch.set_num_threads(1)
    mean_std = data.MEAN_STD["imagenet"]
    with tempfile.TemporaryDirectory() as root:
        folder, real = jpeg_folder(root, n)
        batches = torch.arange(n).split(32)
        views = data.Views(folder, 224, mean_std, jitter=1.0, workers=0)     # this process only
        recipe = torchvision_simclr(224, 1.0, mean_std)
        ours = lambda: [x for x, _, _ in views.batches(batches, "simclr", key=(0,))]
        crops = lambda: [x for x, _, _ in views.batches(batches, "crop_flip", key=(0,))]
        theirs = lambda: [torch.stack([recipe(folder[i][0]) for i in b]) for b in batches]
        t_theirs, t_ours, t_crops = interleaved([theirs, ours, crops], torch.device("cpu"),
                                                max(1, repeat // 2))
        kb = sum(os.path.getsize(path) for path, _ in folder.samples) / n / 1e3
        steps = view_steps_ms(folder, mean_std)
    print(json.dumps({"section": "views_disk", "images": n, "size": 224,
                      "sources": "CIFAR-10 test, enlarged" if real else "noise, enlarged",
                      "kB_per_file": round(kb, 1),
                      "torchvision_views_per_s": round(n / t_theirs, 1),
                      "views_per_s": round(n / t_ours, 1), "ratio": round(t_theirs / t_ours, 2),
                      "crop_flip_views_per_s": round(n / t_crops, 1),
                      "crop_flip_ratio": round(t_theirs / t_crops, 2),
                      "ms_per_image_step": steps}))


def bench_views_disk(device, repeat, images=96):
    print("== views_disk: SimCLR views / s on one core from 256-400 px JPEGs, data.Views / "
          "torchvision's PIL recipe (target >= 3)")
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "views_disk",
                           "--repeat", str(repeat), "--images", str(images)],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"views_disk failed: {done.stderr[-2000:]}")
    print(done.stdout.strip().splitlines()[-1])


def bench_epoch(device, repeat):
    print("== epoch: one SPCL epoch, small CPU configuration, real CIFAR-10 (targets: feature "
          "pass <= 20%, k-means <= 2% of the epoch)")
    if not os.path.isdir(os.path.join(CIFAR10, "train")):
        print(f"skipped: needs the CIFAR-10 images in {CIFAR10}")
        return
    with tempfile.TemporaryDirectory() as out:
        # Epoch 1 of 2: its clustering runs on a trained encoder, like every epoch after the first.
        subprocess.run([sys.executable,
                        os.path.join(ROOT, "train.py"),
                        "--dataset", "cifar10", "--data", CIFAR10, "--arch", "resnet18_narrow",
                        "--epochs", "2", "--batch-size", "512", "--num-prototypes", "512",
                        "--warmup-epochs", "1", "--out", out], check=True)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            row = [json.loads(line) for line in f][-1]
    kmeans = row["kmeans_k512"]["seconds"]
    epoch = row["epoch_seconds"]
    print(f"epoch {epoch:.1f} s ({row['images_per_second']:.0f} images/s in training); "
          f"feature pass {row['feature_seconds']:.1f} s = "
          f"{100 * row['feature_seconds'] / epoch:.1f}%, k-means {kmeans:.2f} s = "
          f"{100 * kmeans / epoch:.2f}%")


IMAGENET_TRAIN = 1_281_167     # images in ImageNet-1k's training set


def synthetic_bank(start, stop, dim=2048, classes=1000, seed=0, block=16384):
    """Rows start..stop-1 of a fixed float16 bank shaped like ResNet-50 features of ImageNet: the
    ReLU of one of `classes` random centres plus as much Gaussian noise, so that k-means has
    clusters to find. Blocks of rows have seeds of their own: a shard equals those rows of the
    whole bank."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(seed))
    out = torch.empty(stop - start, dim, dtype=torch.float16)
    for first in range(start - start % block, stop, block):
        g = torch.Generator().manual_seed(seed + 1 + first // block)
        rows = centres[torch.randint(classes, (block,), generator=g)]
        rows += torch.randn(block, dim, generator=g)
        lo, hi = max(first, start), min(first + block, stop)
        out[lo - start:hi - start] = rows[lo - first:hi - first].relu_()
    return out


def kmeans_before(features, k, niter, pca_dim=256, seed=0):
    """Rank 0's clustering before the features were sharded (cluster.run_kmeans_multi at commit
    348372f), step for step: the whole bank [N, F], a float32 copy checked for NaN, faiss's
    PCAMatrix, its output L2-normalised, faiss k-means. The baseline of cluster_scale. Returns
    the assignments and the seconds of the pre-processing and of the k-means."""
    start = time.perf_counter()
    x = np.ascontiguousarray(features.float().numpy())
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    pca = faiss.PCAMatrix(x.shape[1], pca_dim, -0.5)
    pca.train(x)
    pca.epsilon = 1e-4 * float(faiss.vector_to_array(pca.eigenvalues).max())
    pca.prepare_Ab()
    x = pca.apply(x)
    faiss.normalize_L2(x)
    middle = time.perf_counter()
    kmeans = faiss.Kmeans(pca_dim, k, niter=niter, seed=seed,
                          max_points_per_centroid=len(x) // k + 1, min_points_per_centroid=1)
    kmeans.train(x)
    assignments = kmeans.index.search(x, 1)[1][:, 0]
    return assignments, middle - start, time.perf_counter() - middle


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:   # VmHWM := VmRSS: the bank is made, count on
        f.write("5")


def cluster_child(path, n, niter):
    """One path of cluster_scale in this fresh process; prints a JSON line of its peak resident
    bytes (VmHWM: the bank it holds, whatever the step allocates) and seconds. 'idle' is the
    interpreter with bench.py's imports alone; 'after' runs as one torchrun rank."""
    _track_cpu_memory()
    if path == "idle":
        print(json.dumps({"peak": _proc_status("VmHWM:")}))
        return
    if path == "before":
        features = synthetic_bank(0, n)
        _reset_peak()
        _, preprocess, kmeans = kmeans_before(features, 1000, niter)
        peak = _proc_status("VmHWM:")
        # The part that does not grow with N: the eigendecomposition of the 2048 x 2048
        # covariance (with the covariance of 4,096 rows, which is small beside it).
        start = time.perf_counter()
        faiss.PCAMatrix(2048, 256, -0.5).train(features[:4096].float().numpy())
        print(json.dumps({"peak": peak, "preprocess_seconds": preprocess,
                          "kmeans_seconds": kmeans, "fixed_seconds": time.perf_counter() - start,
                          "threads": faiss.omp_get_max_threads()}))
        return
    rank, world, device = runtime.setup_distributed()
    lo, hi = rank * n // world, (rank + 1) * n // world
    features = synthetic_bank(lo, hi)                                   # this rank's shard
    dist.barrier()
    _reset_peak()
    start = time.perf_counter()
    stats = distributed_kmeans(features, [1000], n, indices=torch.arange(lo, hi), niter=niter,
                               pca_dim=256, device=device)[1][0]
    if rank == 0:
        print(json.dumps({"peak": _proc_status("VmHWM:"), "seconds": time.perf_counter() - start,
                          "preprocess_seconds": stats["preprocess_seconds"],
                          "kmeans_seconds": stats["seconds"], "threads": stats["threads"],
                          "empty_clusters": stats["empty_clusters"]}))
    dist.destroy_process_group()


def _memory_available():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def bench_cluster_scale(device, repeat, n=IMAGENET_TRAIN, niter=20, world=8):
    print(f"== cluster_scale: rank 0's clustering at ImageNet-1k size, N = {n}, F = 2048, "
          f"K = 1000, before / after (target: after <= 3 GB)")
    here = os.path.abspath(__file__)

    def child(path, rows, launcher=(), env=None):
        done = subprocess.run([sys.executable, *launcher, here, "--child", path, "--cluster-n",
                               str(rows), "--cluster-iters", str(niter)], capture_output=True,
                              text=True, env={**os.environ, **(env or {})})
        if done.returncode:
            raise RuntimeError(f"cluster_scale {path} failed: {done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    idle = child("idle", 0)["peak"]
    after = child("after", n, ("-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node", str(world)))
    # The old path holds per row the fp16 bank, its float32 copy and NaN mask, the PCA output. It
    # runs on the largest share of N whose estimate takes at most half of the free memory (the
    # machine may be shared), and is scaled to N.
    per_row = 2048 * (2 + 4 + 1) + 256 * 4
    fraction = next((f for f in (1, 1 / 2, 1 / 4, 1 / 8, 1 / 16)
                     if n * f * per_row + idle < _memory_available() / 2), 1 / 32)
    measured = round(n * fraction)
    # torchrun gives every rank of a node of several one OpenMP thread, faiss's included.
    before = child("before", measured, env={"OMP_NUM_THREADS": "1"})
    scale = n / measured
    seconds = before["preprocess_seconds"] + before["kmeans_seconds"]
    gb = lambda peak: round((peak - idle) / 1e9, 2)
    result = {
        "section": "cluster_scale", "n": n, "f": 2048, "k": 1000, "pca_dim": 256,
        "niter": niter, "idle_interpreter_gb": round(idle / 1e9, 2),
        "before": {"n": measured, "peak_gb": gb(before["peak"]), "seconds": round(seconds, 1),
                   "preprocess_seconds": round(before["preprocess_seconds"], 1),
                   "kmeans_seconds": round(before["kmeans_seconds"], 1),
                   "fixed_seconds": round(before["fixed_seconds"], 1),
                   "threads": before["threads"]},
        "before_at_n": {"peak_gb": round(gb(before["peak"]) * scale, 2),
                        "seconds": round((seconds - before["fixed_seconds"]) * scale
                                         + before["fixed_seconds"], 1)},
        "after": {"world": world, "peak_gb": gb(after["peak"]),
                  "seconds": round(after["seconds"], 1),
                  "preprocess_seconds": round(after["preprocess_seconds"], 1),
                  "kmeans_seconds": round(after["kmeans_seconds"], 1),
                  "threads": after["threads"], "empty_clusters": after["empty_clusters"]},
    }
    result["peak_ratio"] = round(result["before_at_n"]["peak_gb"] / result["after"]["peak_gb"], 2)
    result["seconds_ratio"] = round(result["before_at_n"]["seconds"] / result["after"]["seconds"],
                                    2)
    print(json.dumps(result))


class _Pooled(torch.nn.Module):
    """A stand-in model (h = z = the mean colour) that costs nothing beside making views."""

    def forward(self, x):
        return x.mean((2, 3)), x.mean((2, 3))


def bench_probe_disk(device, repeat, images=512):
    print("== probe_disk: the Fig. 2b probe's views on disk (256-400 px JPEGs, 224 px views, all "
          "cores as DataLoader workers), in one batch / in batches of 64 (the wait of the others)")
    n, workers = images, max(1, runtime.node_threads())
    with tempfile.TemporaryDirectory() as root:
        folder, _ = jpeg_folder(root, n)
        views = data.Views(folder, 224, data.MEAN_STD["imagenet"], jitter=1.0, workers=workers)
        targets = torch.as_tensor(folder.targets)
        probe = lambda batch: monitor.similarity_probe(_Pooled(), views, targets,
                                                       torch.device("cpu"), size=n, batch=batch)
        t_one, t_small = interleaved([lambda: probe(n), lambda: probe(64)], torch.device("cpu"),
                                     max(1, repeat // 5))
    print(json.dumps({"section": "probe_disk", "images": n, "workers": workers,
                      "seconds_one_batch": round(t_one, 2), "seconds_batches_of_64":
                      round(t_small, 2), "ratio": round(t_one / t_small, 2)}))


SECTIONS = {"nt_xent": bench_nt_xent, "lars": bench_lars, "kmeans": bench_kmeans,
            "sampler": bench_sampler, "step": bench_step, "step_input": bench_step_input,
            "augment": bench_augment, "views_disk": bench_views_disk, "epoch": bench_epoch,
            "cluster_scale": bench_cluster_scale, "probe_disk": bench_probe_disk}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help="comma list of sections: " + ", ".join(SECTIONS))
    parser.add_argument("--repeat", type=int, default=10,
                        help="timed runs per measurement (median)")
    parser.add_argument("--cluster-n", type=int, default=IMAGENET_TRAIN,
                        help="cluster_scale: rows of the feature bank")
    parser.add_argument("--cluster-iters", type=int, default=20,
                        help="cluster_scale: k-means iterations")
    parser.add_argument("--images", type=int,
                        help="views_disk, probe_disk: JPEGs to make (default 96, 512)")
    parser.add_argument("--child", choices=("idle", "before", "after", "views_disk"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "views_disk":
        return views_disk_child(args.repeat, args.images or 96)
    if args.child:
        return cluster_child(args.child, args.cluster_n, args.cluster_iters)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not _track_cpu_memory():
        parser.error("measuring CPU memory needs Linux with glibc (/proc/self/clear_refs, mallopt)")
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {list(SECTIONS)}")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.only.split(","):
        extra = ({"n": args.cluster_n, "niter": args.cluster_iters} if name == "cluster_scale"
                 else {})
        if name in ("views_disk", "probe_disk") and args.images:
            extra = {"images": args.images}
        SECTIONS[name](device, args.repeat, **extra)


if __name__ == "__main__":
    main()
