"""Prototypes (paper Sec. 3.2): k-means on the encoder features of every training image, at the
start of every epoch.

    shard = split_shard(encoder, views, N, rank, world, device)       # this rank's rows
    assignments, stats = distributed_kmeans(shard.features, [K], N, indices=shard.indices,
                                            seed=seed + epoch, device=device)  # [N, 1], all ranks

Every rank keeps the features of its own share of the images (`Shard`, fp16: 0.66 GB a rank for
ImageNet with a ResNet-50 on 8 ranks). The clustering is DeepCluster's and the official code's
(PCA-whitening to 256 dims, L2 normalisation, 20 Lloyd iterations of faiss k-means from random
centroids) without [N, F] on any process: the ranks all-reduce the mean and the covariance,
rank 0's whitening is broadcast, each rank projects its own rows, and only the [N, 256] float16
rows travel to rank 0 (0.66 GB), which runs k-means on every core of the node (or its GPU) and
broadcasts the assignments. `centroid_heads` makes prototype heads from the clusters' means.
"""

import time
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import runtime

try:
    import faiss
except ImportError:            # torch_kmeans stands in (kmeans_backend)
    faiss = None


class Shard(NamedTuple):
    """One rank's rows of a feature bank: features [n, F] (CPU), their dataset indices [n] and
    targets [n] (int64). Over the ranks, every index in [0, N) lies in exactly one shard."""
    features: torch.Tensor
    indices: torch.Tensor
    targets: torch.Tensor


@torch.no_grad()
def shard_features(encoder, loader, num_samples, device, storage_dtype=torch.float16,
                   amp_dtype=None):
    """Collective: encoder features of the images this rank draws, each image kept by one rank.
    encoder [B, 3, H, W] -> [B, F], used as given (eval mode is the caller's); loader yields
    (images, targets, dataset indices), this rank's share in any order (an index drawn twice, as
    DistributedSampler pads, is kept once, by the lowest rank); every index in [0, N) must be
    drawn by some rank, or every rank raises. device: the encoder's and the collective's (NCCL
    needs CUDA); amp_dtype: autocast's, or None. Returns a Shard (features [n, F] CPU,
    storage_dtype; fp16 halves the memory), rows in the order drawn."""
    device, parts = torch.device(device), []
    for images, batch_targets, indices in tqdm(loader, "feature pass", leave=False,
                                               disable=runtime.rank_world()[0] != 0):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            batch_features = encoder(images.to(device, non_blocking=True))  # [B, F]
        parts.append((batch_features.to(storage_dtype).cpu(),
                      torch.as_tensor(indices, dtype=torch.int64),
                      torch.as_tensor(batch_targets, dtype=torch.int64)))
    if parts:
        features, indices, targets = (torch.cat(column) for column in zip(*parts))
    else:
        features = torch.empty(0, 0, dtype=storage_dtype)
        indices = targets = torch.empty(0, dtype=torch.int64)
    parts.clear()
    keep = runtime.owned(indices, num_samples, device)
    if not keep.all():
        features, indices, targets = features[keep], indices[keep], targets[keep]
    return Shard(features, indices, targets)


def split_shard(encoder, views, n, rank, world, device, amp_dtype=None, view="eval", key=None):
    """Collective: shard_features over a whole split of n images, this rank's share of
    data.Views batches (the evaluation view, or a random one with its key). Returns this rank's
    Shard, float16."""
    batches = views.batches(data.shard(n, rank, world, 512), view, key)
    return shard_features(encoder, batches, n, device, amp_dtype=amp_dtype)


@torch.no_grad()
def pca_whitening(features, dim, group=None, device="cpu"):
    """The PCA-whitening of features [n, F] (DeepCluster's, Sec. 3.2): (mean [F], projection
    [F, d]) float32 on device, such that (x - mean) @ projection has unit variance along each of
    the top d = min(dim, F, N - 1) principal directions. Collective over `group` when one is
    given: the ranks' moments are all-reduced and rank 0's eigenvectors broadcast (they are
    defined up to sign: two LAPACK builds may pick different ones). The moments are float64 and
    centred in a second pass: no cancellation where the mean dwarfs the spread, as in ReLU
    features. Eigenvalues are floored at 1e-4 of the top one, so that directions of no variance
    (N < F, dead units) do not blow round-off up to unit scale. A ValueError on every rank for
    NaN, infinite or identical features. dim 0: no whitening, (None, None)."""
    device = torch.device(device)
    features = torch.as_tensor(features)
    width = features.shape[1]
    step = runtime.chunk_rows(width * 8)
    chunks = lambda: (features[i:i + step].to(device, torch.float64, copy=True)
                      for i in range(0, len(features), step))
    moment = torch.zeros(width + 1, dtype=torch.float64, device=device)     # [sum x, n]
    for x in chunks():
        moment[:width] += x.sum(0)
    moment[width] = len(features)
    if group is not None:
        dist.all_reduce(moment, group=group)
    count = int(moment[width])
    mean = moment[:width] / count
    if not torch.isfinite(mean).all():
        raise ValueError("features contain NaN or infinite values")
    if dim == 0:
        return None, None
    covariance = torch.zeros(width, width, dtype=torch.float64, device=device)  # F x F
    for x in chunks():
        x -= mean
        covariance.addmm_(x.T, x)
    if group is not None:
        dist.all_reduce(covariance, group=group)
    covariance /= count
    if covariance.trace() <= 0:
        raise ValueError("features are all identical: nothing to whiten or cluster")
    dim = min(dim, width, count - 1)
    projection = torch.empty(width, dim, dtype=torch.float64, device=device)
    if group is None or dist.get_rank(group) == 0:
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)            # ascending
        top = eigenvalues[-dim:].flip(0)
        # eigh returns column-major eigenvectors, and a broadcast copies memory as it lies.
        projection = (eigenvectors[:, -dim:].flip(1)
                      * (top + 1e-4 * top[0]).rsqrt()).contiguous()            # F x d
    if group is not None:
        dist.broadcast(projection, group=group, group_src=0)
    return mean.float(), projection.float()


@torch.no_grad()
def whiten(features, mean, projection, dtype=torch.float32, device="cpu"):
    """Rows [n, d] of features [n, F] (any float dtype): (x - mean) @ projection, from
    pca_whitening (skipped when projection is None), then L2-normalised; float32 arithmetic on
    device, stored as dtype on the CPU."""
    features = torch.as_tensor(features)
    width = features.shape[1] if projection is None else projection.shape[1]
    out = torch.empty(len(features), width, dtype=dtype)
    step = runtime.chunk_rows(features.shape[1] * 4)
    for start in range(0, len(features), step):
        x = features[start:start + step].to(device, torch.float32)
        if projection is not None:
            x = (x - mean) @ projection                                         # c x d
        out[start:start + step] = F.normalize(x, dim=1).to(dtype).cpu()
    return out


def _check_ks(ks, num_samples):
    """ks as a list of ints, after checking that each k lies in [2, N]."""
    ks = [ks] if isinstance(ks, int) else [int(k) for k in ks]
    if not ks:
        raise ValueError("need at least one k")
    for k in ks:
        if k < 2 or k > num_samples:
            raise ValueError(f"need 2 <= k <= N, got k={k} for N={num_samples} features")
    return ks


def run_kmeans(features, k, seed=0, niter=20, pca_dim=256, device=None, backend=None):
    """k-means prototypes of features [N, D] (tensor or array, any float dtype), as DeepCluster:
    PCA-whitening to pca_dim dims (0 skips it), L2 normalisation, `niter` Lloyd iterations from k
    random points, on all N points. device: where (default the current CUDA device, if any);
    backend: see kmeans_backend. Returns (assignments int64 [N], centroids float32 [k, d] in the
    whitened space, stats: objective (the sum of squared distances to the assigned centroids),
    size_min, size_median, size_max, empty_clusters, seconds, preprocess_seconds, pca_dim (0:
    PCA off), backend, threads)."""
    return run_kmeans_multi(features, [k], seed, niter, pca_dim, device, backend)[0]


def run_kmeans_multi(features, ks, seed=0, niter=20, pca_dim=256, device=None, backend=None):
    """run_kmeans for every k in ks on the same features, pre-processing them once (the PCA is
    the expensive part at ImageNet size and does not depend on k). Returns a list of
    run_kmeans's (assignments, centroids, stats), one per k. The features are read in chunks: no
    float32 copy of [N, D] is made."""
    start = time.perf_counter()
    features = torch.as_tensor(features)
    if features.dim() != 2 or 0 in features.shape:
        raise ValueError(f"features must be a non-empty [N, D] matrix, got shape "
                         f"{tuple(features.shape)}")
    ks = _check_ks(ks, len(features))
    mean, projection = pca_whitening(features, pca_dim)
    x = whiten(features, mean, projection)                                      # N x d
    pca_dim = 0 if projection is None else projection.shape[1]
    return _kmeans(x, ks, seed, niter, kmeans_backend(backend, device),
                   dict(preprocess_seconds=time.perf_counter() - start, pca_dim=pca_dim))


def kmeans_backend(backend=None, device=None):
    """(backend, device) of a k-means: on a CUDA device faiss-gpu runs on that one GPU when it
    sees one, and torch_kmeans runs there when it does not (faiss-gpu is what users of clustering
    methods most often cannot install); on the CPU faiss runs on every core (torch_kmeans without
    faiss). backend "faiss" or "torch" chooses instead."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:              # faiss needs the number
        device = torch.device("cuda", torch.cuda.current_device())
    faiss_gpu = device.type == "cuda" and getattr(faiss, "get_num_gpus", lambda: 0)() > 0
    if backend not in (None, "faiss", "torch"):
        raise ValueError(f"backend must be 'faiss' or 'torch', got {backend!r}")
    if backend == "faiss" and faiss is None:
        raise ValueError("k-means with faiss, but faiss is not installed (pip install faiss-cpu "
                         "or faiss-gpu, or use torch's k-means)")
    backend = backend or ("faiss" if faiss and (faiss_gpu or device.type != "cuda") else "torch")
    if backend == "faiss" and not faiss_gpu:
        device = torch.device("cpu")
    return backend, device


def _kmeans(x, ks, seed, niter, backend, stats):
    """run_kmeans_multi's results for the whitened rows x [N, d] (float32 CPU). Under torchrun
    OMP_NUM_THREADS is 1 when a node runs several ranks; the others wait for this k-means, so on
    the CPU it takes every core of the node, then gives them back."""
    name, device = backend
    threads = faiss and faiss.omp_get_max_threads(), torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(runtime.node_threads())
        if faiss:
            faiss.omp_set_num_threads(runtime.node_threads())
    try:
        results = []
        for k in ks:
            start = time.perf_counter()
            if name == "torch":
                assignments, centroids, distances = (
                    t.cpu().numpy() for t in torch_kmeans(x.to(device), k, seed, niter))
            else:
                assignments, centroids, distances = _faiss_kmeans(x.numpy(), k, seed, niter,
                                                                  device.index)
            sizes = np.bincount(assignments, minlength=k)
            print(f"k-means K={k} of {len(x)} rows ({name}, {device}): "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
            results.append((assignments.astype(np.int64), centroids, dict(
                stats, objective=float(distances.sum(dtype=np.float64)), size_min=int(sizes.min()),
                size_median=float(np.median(sizes)), size_max=int(sizes.max()),
                empty_clusters=int((sizes == 0).sum()), seconds=time.perf_counter() - start,
                backend=f"{name}-{device.type}", threads=torch.get_num_threads()
                if name == "torch" else faiss.omp_get_max_threads())))
        return results
    finally:
        torch.set_num_threads(threads[1])
        if faiss:
            faiss.omp_set_num_threads(threads[0])


def _faiss_kmeans(x, k, seed, niter, gpu=None):
    """faiss's k-means of x [N, d] float32 on every core, or on CUDA device `gpu` alone (never
    faiss.Kmeans(gpu=1), which to faiss means every GPU of the node). Returns (assignments [N],
    centroids [k, d], squared distances [N])."""
    params = faiss.ClusteringParameters()
    params.niter, params.seed = niter, seed
    params.max_points_per_centroid = x.shape[0] // k + 1   # no subsampling: all N points train
    params.min_points_per_centroid = 1     # few points per centroid is our choice, not a mistake
    index, resources = faiss.IndexFlatL2(x.shape[1]), None
    if gpu is not None:
        resources, config = faiss.StandardGpuResources(), faiss.GpuIndexFlatConfig()
        config.device = gpu
        index = faiss.GpuIndexFlatL2(resources, x.shape[1], config)
    clustering = faiss.Clustering(x.shape[1], k, params)
    clustering.train(x, index)
    distances, assignments = index.search(x, 1)                  # [N, 1] each
    return assignments[:, 0], faiss.vector_to_array(clustering.centroids).reshape(k, -1), \
        distances[:, 0]


@torch.no_grad()
def torch_kmeans(x, k, seed=0, niter=20, chunk_bytes=1 << 28):
    """faiss's k-means in torch, for a GPU without faiss-gpu (or any device): Lloyd iterations of
    x [N, d] float32 from k distinct random points (a seeded draw), each assigning every point to
    its nearest centroid (squared L2; the N x k distances in chunks of rows, never [N, k]) and
    moving each centroid to its points' mean. A centroid left empty takes a split of a cluster
    drawn with probability proportional to its size - 1, pushed apart from it by 1/1024, as
    faiss does. Returns (assignments int64 [N], centroids [k, d], squared distances [N])."""
    g = torch.Generator().manual_seed(seed)
    rows = max(1, chunk_bytes // (8 * k))

    def nearest(centroids):              # assignments, squared distances less |x|^2 [N]
        norms = (centroids * centroids).sum(1)
        best = [torch.addmm(norms, part, centroids.T, alpha=-2).min(1) for part in x.split(rows)]
        return torch.cat([b.indices for b in best]), torch.cat([b.values for b in best])

    centroids = x[torch.randperm(len(x), generator=g)[:k].to(x.device)].clone()   # k x d
    for _ in range(niter):
        assignments = nearest(centroids)[0]
        counts = torch.bincount(assignments, minlength=k)
        centroids = torch.zeros_like(centroids).index_add_(0, assignments, x) / counts.clamp(
            min=1)[:, None].to(x.dtype)
        sizes = counts.cpu().double()
        for empty in (sizes == 0).nonzero()[:, 0].tolist():
            split = int(torch.multinomial((sizes - 1).clamp(min=0), 1, generator=g))
            sign = torch.ones(x.shape[1], device=x.device)
            sign[1::2] = -1                                       # faiss's symmetric nudge
            centroids[empty] = centroids[split] * (1 + sign / 1024)
            centroids[split] = centroids[split] * (1 - sign / 1024)
            sizes[empty] = sizes[split] // 2
            sizes[split] -= sizes[empty]
    assignments, distances = nearest(centroids)
    return assignments, centroids, (distances + (x * x).sum(1)).clamp_min_(0)


def distributed_kmeans(features, ks, num_samples, indices=None, seed=0, niter=20, pca_dim=256,
                       device=None, backend=None):
    """Collective: run_kmeans_multi of the rows the ranks hold between them, features [n, F]
    with their dataset indices [n] (a Shard's; one process: all N rows, indices 0..N-1). The
    ranks fit the whitening together (pca_whitening), each projects and L2-normalises its own
    rows, and only these float16 rows travel to rank 0 (0.66 GB at ImageNet size), which runs the
    k-means on its device (kmeans_backend: its one GPU, or every core of the node). No process
    ever holds [N, F]. device: the moments', projection's and collectives' (default the current
    CUDA device under NCCL, else the CPU). Returns (assignments int64 [N, len(ks)] CPU, run_kmeans's
    stats for each k), identical on every rank. Bad input and any failure of rank 0's k-means
    raise the same error on every rank: none is left waiting."""
    start = time.perf_counter()
    ks = _check_ks(ks, num_samples)
    rank, world_size = runtime.rank_world()
    group = dist.group.WORLD if world_size > 1 else None
    if device is None:
        device = (torch.device("cuda", torch.cuda.current_device())
                  if group is not None and dist.get_backend() == "nccl" else "cpu")
    features = torch.as_tensor(features)
    indices = torch.arange(len(features)) if indices is None else torch.as_tensor(indices)
    runtime.check_partition(features, indices, num_samples, device)
    mean, projection = pca_whitening(features, pca_dim, group, device)
    rows = whiten(features, mean, projection, torch.float16 if group else torch.float32, device)
    x = runtime.gather_rows(rows, indices, num_samples, device, torch.float32)   # N x d on rank 0
    pca_dim = 0 if projection is None else projection.shape[1]

    def cluster():
        results = _kmeans(x, ks, seed, niter, kmeans_backend(backend, device),
                          dict(preprocess_seconds=time.perf_counter() - start, pca_dim=pca_dim))
        columns = np.stack([assignments for assignments, _, _ in results], 1)
        return torch.from_numpy(columns), [stats for _, _, stats in results]

    if group is None:
        return cluster()
    assignments = torch.empty(num_samples, len(ks), dtype=torch.int64, device=device)
    outcome = [None]
    if rank == 0:
        try:
            result, outcome[0] = cluster()
            assignments.copy_(result)
        except Exception as error:
            outcome[0] = error
    dist.broadcast_object_list(outcome, src=0, device=device)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    dist.broadcast(assignments, src=0)
    return assignments.cpu(), outcome[0]


@torch.no_grad()
def cluster_means(features, assignments, k, chunk=65536, group=None, device="cpu"):
    """The mean feature of each of k clusters, L2-normalised: [k, F] float32 CPU (an empty
    cluster's row is 0). features [n, F] any float dtype, assignments [n] int64 in [0, k); summed
    in chunks, so a float16 bank is never copied whole to float32. Collective over `group` when
    one is given: every rank passes its own rows (a Shard's) and the sums [k, F] are all-reduced
    on device, so that no rank needs [N, F]."""
    features, assignments = torch.as_tensor(features), torch.as_tensor(assignments)
    if features.dim() != 2 or assignments.shape != features.shape[:1]:
        raise ValueError(f"need features [N, F] and assignments [N], got {tuple(features.shape)} "
                         f"and {tuple(assignments.shape)}")
    sums = torch.zeros(k, features.shape[1])
    for start in range(0, len(features), chunk):
        sums.index_add_(0, assignments[start:start + chunk], features[start:start + chunk].float())
    if group is not None:
        sums = sums.to(device)
        dist.all_reduce(sums, group=group)
    return torch.nn.functional.normalize(sums, dim=1).cpu()


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
    return [cluster_means(shard.features, assignments[shard.indices, j], k, group=group,
                          device=device) / (temperature * norm)
            for j, k in enumerate(ks)]
