"""Prototypes (paper Sec. 3.2): k-means on encoder features at the start of every epoch; and the
kNN monitor, which reads the same features.

    shard = split_shard(encoder, views, N, rank, world, device)       # this rank's rows
    assignments, stats = distributed_kmeans(shard.features, [K], N, indices=shard.indices,
                                            seed=seed + epoch, device=device)  # [N, 1], all ranks
    features, targets = gather_features(shard, N, device)             # [N, F] on rank 0
    top1 = knn_top1(features, targets, test_features, test_targets)   # rank 0

Every rank keeps the features of its own share of the images (`Shard`, fp16: 0.66 GB a rank for
ImageNet with a ResNet-50 on 8 ranks). The clustering is DeepCluster's and the official code's
(PCA-whitening to 256 dims, L2 normalisation, 20 Lloyd iterations of faiss k-means from random
centroids) without [N, F] on any process: the ranks all-reduce the mean and the covariance,
rank 0's whitening is broadcast, each rank projects its own rows, and only the [N, 256] float16
rows travel to rank 0 (0.66 GB), which runs k-means on every core of the node (or its GPU) and
broadcasts the assignments. Only the kNN monitor gathers [N, F] onto rank 0. `nmi` measures
the partition against the labels or the previous epoch, `same_class_pairs` the share of
same-prototype pairs that share a class.
"""

import math
import os
import time
from typing import NamedTuple

import faiss
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data


def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _chunk_rows(row_bytes, budget=1 << 27):
    """Rows per chunk of work, so that a chunk's temporaries stay near budget bytes (128 MiB)."""
    return max(1, budget // max(1, row_bytes))


class Shard(NamedTuple):
    """One rank's rows of a feature bank: features [n, F] (CPU), their dataset indices [n] and
    targets [n] (int64). Over the ranks, every index in [0, N) lies in exactly one shard."""
    features: torch.Tensor
    indices: torch.Tensor
    targets: torch.Tensor


@torch.no_grad()
def shard_features(encoder, loader, num_samples, device, storage_dtype=torch.float16,
                   amp_dtype=None):
    """Collective: encoder features of the images this rank draws; each image kept by one rank.

    Args:
        encoder: images [B, 3, H, W] -> features [B, F]. Used as given: put it in eval mode
            first if BatchNorm statistics must not move.
        loader: yields (images, targets, indices), indices being dataset indices: this rank's
            share in any order and any number of batches, e.g. a DistributedSampler's. An index
            drawn more than once (its padding) is kept once, by the lowest rank that drew it.
        num_samples: N, the dataset size; every index in [0, N) must be drawn by some rank.
        device: where the encoder runs, and where the collective runs (NCCL needs CUDA).
        storage_dtype: dtype of the kept features; fp16 halves the memory.
        amp_dtype: run the encoder under torch.autocast in this dtype (the training one), or
            in full precision when None.

    Returns a Shard (features [n, F] CPU storage_dtype), rows in the order drawn. An index
    outside [0, N), or one that no rank drew, raises on every rank.
    """
    device = torch.device(device)
    parts = []
    for images, batch_targets, indices in loader:
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
    keep = _owned(indices, num_samples, device)
    if not keep.all():
        features, indices, targets = features[keep], indices[keep], targets[keep]
    return Shard(features, indices, targets)


def _owned(indices, num_samples, device):
    """Collective: the mask [n] of this rank's indices that it keeps: the first of its repeats,
    unless a lower rank drew the index too. Raises on every rank when an index anywhere lies
    outside [0, N) or when one was drawn by no rank."""
    rank, world_size = _dist_info()
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
        raise _index_error(indices if bad else None, num_samples)
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
    rank, world_size = _dist_info()
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
    per_step = _chunk_rows(world_size * width * rows.element_size(), step_bytes)
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


def gather_features(shard, num_samples, device):
    """Collective: the ranks' shards as one bank on rank 0, (features [N, F], targets [N]) in
    dataset-index order; (None, None) on the other ranks."""
    features = gather_rows(shard.features, shard.indices, num_samples, device)
    targets = gather_rows(shard.targets[:, None], shard.indices, num_samples, device)
    return (features, targets[:, 0]) if features is not None else (None, None)


def extract_features(encoder, loader, num_samples, device, storage_dtype=torch.float16,
                     amp_dtype=None):
    """Collective: shard_features, gathered on rank 0 (the arguments are shard_features's).

    Returns, on rank 0, (features [N, F] CPU storage_dtype, targets [N] CPU int64) in
    dataset-index order; (None, None) on the other ranks.
    """
    shard = shard_features(encoder, loader, num_samples, device, storage_dtype, amp_dtype)
    return gather_features(shard, num_samples, device)


def split_shard(encoder, views, n, rank, world, device, amp_dtype=None, view="eval", key=None):
    """Collective: shard_features over a whole split of n images, this rank's share of
    data.Views batches (the evaluation view, or a random one with its key). Returns this rank's
    Shard, float16."""
    batches = views.batches(data.shard(n, rank, world, 512), view, key)
    return shard_features(encoder, batches, n, device, amp_dtype=amp_dtype)


def split_features(encoder, views, n, rank, world, device, amp_dtype=None, view="eval", key=None):
    """Collective: split_shard gathered on rank 0. Returns (features [n, F] float16, targets
    [n]) on rank 0, (None, None) elsewhere."""
    shard = split_shard(encoder, views, n, rank, world, device, amp_dtype, view, key)
    return gather_features(shard, n, device)


def _index_error(indices, num_samples):
    """The ValueError for dataset indices outside [0, N); indices None:
    they were on another rank."""
    got = ("others on another rank" if indices is None
           else f"{int(indices.min())}..{int(indices.max())}")
    return ValueError(f"dataset indices must lie in [0, {num_samples}), got {got}")


@torch.no_grad()
def pca_whitening(features, dim, group=None, device="cpu"):
    """The PCA-whitening of features [n, F] (DeepCluster's, Sec. 3.2): (mean [F], projection
    [F, d]) float32 on device, such that (x - mean) @ projection has unit variance along each of
    the top d = min(dim, F, N - 1) principal directions (N centred points span N - 1 of them).

    Collective over `group` when one is given: every rank passes its own rows, the moments are
    all-reduced, and rank 0's eigendecomposition is broadcast, so that the ranks project with
    bit-identical matrices (eigenvectors are defined up to sign: two LAPACK builds on two nodes
    may pick different ones). No group: these rows alone.

    The moments are float64 and centred in a second pass (sum x, then sum (x - mean)(x - mean)^T):
    exact zeros for identical rows, no cancellation where the mean dwarfs the spread, as in ReLU
    features. faiss.PCAMatrix, which this replaces, sums x x^T - N mean mean^T in float32 and
    skips the division by N, a scale that the whitening and L2 normalisation remove. Whitening
    divides by sqrt(eigenvalue); directions of (numerically) zero variance, e.g. when N < F or
    units are dead, would blow round-off up to unit scale, so the eigenvalues are floored at 1e-4
    of the top one (such a direction keeps 0.1 of its scale at most).

    Raises the same ValueError on every rank when the features hold NaN or infinite values, or
    are all identical. dim 0: no whitening, (None, None), after the first check alone.
    """
    device = torch.device(device)
    features = torch.as_tensor(features)
    width = features.shape[1]
    step = _chunk_rows(width * 8)
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
    step = _chunk_rows(features.shape[1] * 4)
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


def node_threads():
    """The CPU cores this process may run on: all of the node's unless a launcher pinned it."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def run_kmeans(features, k, seed=0, niter=20, pca_dim=256, gpu=None):
    """k-means prototypes of features [N, D] (tensor or array, any float dtype).

    Pre-processing as DeepCluster: PCA-whitening to pca_dim dims (at most D and N - 1; 0 skips it,
    see pca_whitening), then L2 normalisation. faiss k-means, `niter` Lloyd iterations, on every
    core of the node, or on one GPU when gpu is True, or None and faiss sees one. faiss would train
    on a random 256·k subsample unless told otherwise, so max_points_per_centroid is raised until
    every one of the N points counts. The centroids start at k random points, as in DeepCluster
    and the official code.

    Returns:
        assignments: int64 [N], the nearest final centroid of every point.
        centroids: float32 [k, d], d = pca_dim or D, in the pre-processed space.
        stats: dict of JSON-ready numbers: objective (sum of squared distances to the
            assigned centroids), size_min, size_median, size_max, empty_clusters, seconds
            (the k-means), preprocess_seconds (checks, PCA, normalisation), pca_dim (the
            dimension used; 0 when PCA is off), threads (faiss's on the CPU).
    """
    return run_kmeans_multi(features, [k], seed=seed, niter=niter, pca_dim=pca_dim, gpu=gpu)[0]


def run_kmeans_multi(features, ks, seed=0, niter=20, pca_dim=256, gpu=None):
    """run_kmeans for every k in ks on the same features, pre-processing them once.

    The PCA is the expensive part at ImageNet size (N x D^2 for the covariance) and does not
    depend on k. Returns a list of run_kmeans's (assignments, centroids, stats), one per k;
    every stats dict carries the same preprocess_seconds. The features are read in chunks: no
    float32 copy of [N, D] is made.
    """
    start = time.perf_counter()
    features = torch.as_tensor(features)
    if features.dim() != 2 or 0 in features.shape:
        raise ValueError(f"features must be a non-empty [N, D] matrix, got shape "
                         f"{tuple(features.shape)}")
    ks = _check_ks(ks, len(features))
    gpu = _use_gpu(gpu)
    mean, projection = pca_whitening(features, pca_dim)
    x = whiten(features, mean, projection).numpy()                              # N x d
    pca_dim = 0 if projection is None else projection.shape[1]
    return _kmeans(x, ks, seed, niter, gpu, time.perf_counter() - start, pca_dim)


def _use_gpu(gpu):
    if gpu is None:
        return faiss.get_num_gpus() > 0
    if gpu and faiss.get_num_gpus() == 0:
        raise ValueError("gpu=True but faiss sees no GPU (is faiss-gpu installed?)")
    return gpu


def _kmeans(x, ks, seed, niter, gpu, preprocess_seconds, pca_dim):
    """faiss k-means of the pre-processed rows x [N, d] float32 for every k: run_kmeans_multi's
    results. Under torchrun, OMP_NUM_THREADS is 1 when a node runs several ranks; the other ranks
    wait for this k-means, so faiss takes every core of the node for it, then gives them back (the
    OpenMP runtime may be torch's as well)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(node_threads())
    try:
        results = []
        for k in ks:
            start = time.perf_counter()
            kmeans = faiss.Kmeans(
                x.shape[1], k, niter=niter, seed=seed, gpu=1 if gpu else False,
                max_points_per_centroid=x.shape[0] // k + 1,  # no subsampling: all N points train
                min_points_per_centroid=1,  # few points per centroid is our choice, not a mistake
            )
            kmeans.train(x)
            distances, assignments = kmeans.index.search(x, 1)  # [N, 1] each
            assignments = assignments[:, 0].astype(np.int64)

            sizes = np.bincount(assignments, minlength=k)
            stats = {
                "objective": float(distances.sum(dtype=np.float64)),
                "size_min": int(sizes.min()),
                "size_median": float(np.median(sizes)),
                "size_max": int(sizes.max()),
                "empty_clusters": int((sizes == 0).sum()),
                "seconds": time.perf_counter() - start,
                "preprocess_seconds": preprocess_seconds,
                "pca_dim": int(pca_dim),
                "threads": faiss.omp_get_max_threads(),
            }
            results.append((assignments, kmeans.centroids, stats))
        return results
    finally:
        faiss.omp_set_num_threads(threads)


def distributed_kmeans(features, ks, num_samples, indices=None, seed=0, niter=20, pca_dim=256,
                       device=None):
    """Collective: run_kmeans_multi of the rows the ranks hold between them; the assignments on
    every rank.

    Args:
        features: this rank's rows [n, F], any float dtype (a Shard's features); one process:
            all N rows.
        ks: the numbers of prototypes, one k-means each (an int for one).
        num_samples: N, the rows over all ranks.
        indices: the rows' dataset indices [n] (the Shard's); default 0..n-1, as for one process.
        device: where the moments, the projection and the collectives run; default the current
            CUDA device for NCCL, else CPU.

    The ranks fit the whitening together (pca_whitening), each projects and L2-normalises its own
    rows, and only these pca_dim-dim float16 rows travel to rank 0 (0.66 GB at ImageNet size),
    which runs faiss k-means on all N of them (run_kmeans_multi's, every core of the node) and
    broadcasts the assignments. No process ever holds [N, F].

    Returns:
        assignments: int64 [num_samples, len(ks)] CPU tensor, identical on every rank.
        stats: run_kmeans's stats dicts, one per k, on every rank (preprocess_seconds includes
            the travel to rank 0).
    Bad input (a k outside [2, N], rows that do not add up to N, NaN, identical features) and any
    failure of rank 0's k-means raise the same error on every rank: none is left waiting.
    """
    start = time.perf_counter()
    ks = _check_ks(ks, num_samples)
    rank, world_size = _dist_info()
    group = dist.group.WORLD if world_size > 1 else None
    if device is None:
        device = (torch.device("cuda", torch.cuda.current_device())
                  if group is not None and dist.get_backend() == "nccl" else "cpu")
    features = torch.as_tensor(features)
    indices = torch.arange(len(features)) if indices is None else torch.as_tensor(indices)
    bad = (features.dim() != 2 or indices.shape != features.shape[:1]
           or bool(len(indices)) and not 0 <= int(indices.min()) <= int(indices.max())
           < num_samples)
    # How often each index is held, over the ranks (slot N: bad input on some rank); 5 MB at
    # ImageNet size, for a partition that rank 0's buffer relies on.
    hits = torch.zeros(num_samples + 1, dtype=torch.int32)
    hits[num_samples] = int(bad)
    if not bad:
        hits[:num_samples] = torch.bincount(indices, minlength=num_samples)
    if group is not None:
        hits = hits.to(device)
        dist.all_reduce(hits, group=group)
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

    mean, projection = pca_whitening(features, pca_dim, group, device)
    rows = whiten(features, mean, projection, torch.float16 if group else torch.float32, device)
    x = gather_rows(rows, indices, num_samples, device, torch.float32)   # N x d on rank 0
    pca_dim = 0 if projection is None else projection.shape[1]

    def cluster():
        results = _kmeans(x.numpy(), ks, seed, niter, _use_gpu(None), time.perf_counter() - start,
                          pca_dim)
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


def nmi(a, b):
    """Normalised mutual information of two labelings [N] (arithmetic mean, as scikit-learn).

    I(a; b) / ((H(a) + H(b)) / 2), 1 for identical partitions up to renaming, 0 for
    independent ones; 1 as well when neither labeling splits the data.
    """
    a, b, row, col, joint = _contingency(a, b)
    p_ab = joint / a.size
    p_a = np.bincount(a) / a.size
    p_b = np.bincount(b) / a.size
    h_a = -(p_a * np.log(p_a)).sum()
    h_b = -(p_b * np.log(p_b)).sum()
    if h_a == 0 and h_b == 0:
        return 1.0
    mutual = (p_ab * np.log(p_ab / (p_a[row] * p_b[col]))).sum()
    return float(np.clip(mutual / ((h_a + h_b) / 2), 0.0, 1.0))


def same_class_pairs(assignments, targets):
    """The share of same-prototype pairs whose two images share a class: the precision of the
    positives of Eq. 3 (Sec. 3.4), which the Siamese loss pulls together.

    For a pair drawn uniformly from the images of one prototype, prototypes weighted by their size
    (as `sampler.PrototypePairSampler` takes them); prototypes of one image hold no pair. A
    random pair of CIFAR-10 images shares its class with probability 0.1; ground-truth
    prototypes give 1. nan when no prototype holds two images.
    """
    a, _, row, _, joint = _contingency(assignments, targets)
    sizes = np.bincount(a).astype(np.float64)                            # n_k
    same = np.bincount(row, weights=joint * (joint - 1.0), minlength=len(sizes))  # ordered pairs
    paired = sizes > 1
    if not paired.any():
        return float("nan")
    share = same[paired] / (sizes[paired] * (sizes[paired] - 1))         # per prototype
    return float((sizes[paired] * share).sum() / sizes[paired].sum())


def _contingency(a, b):
    """The non-empty cells of the contingency table of two labelings [N]: (a and b renamed to
    0..K-1, each cell's row and column, its count). From unique codes, never a dense [Ka, Kb]
    table (Ka = N for singletons)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two non-empty labelings of equal length, got {a.size} and {b.size}")
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    num_b = int(b.max()) + 1
    codes, joint = np.unique(a.astype(np.int64) * num_b + b, return_counts=True)
    return a, b, codes // num_b, codes % num_b, joint


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
        device: where the arithmetic runs; default CUDA when available. The train features
            move there once when they take at most half of its free memory (5.2 GB for ImageNet
            in fp16), else block by block for every chunk of test images.
    """
    if (train_features.ndim != 2 or test_features.ndim != 2
            or train_features.shape[1] != test_features.shape[1]):
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
    if device.type == "cuda" and train_features.device != device:
        size = train_features.numel() * train_features.element_size()
        if size <= torch.cuda.mem_get_info(device)[0] // 2:
            train_features = train_features.to(device)      # in its own dtype: the same blocks
    correct = 0
    for start in range(0, len(test_features), chunk):
        query = F.normalize(test_features[start:start + chunk].to(device, torch.float32),  # c x F
                            dim=1)
        top_sim = torch.full((len(query), k), -math.inf, device=device)          # c x k
        top_label = torch.zeros((len(query), k), dtype=torch.int64, device=device)
        for train_start in range(0, len(train_features), chunk):
            keys = F.normalize(
                train_features[train_start:train_start + chunk].to(device, torch.float32), dim=1)
            sim = torch.cat([top_sim, query @ keys.T], 1)                        # c x (k + b)
            labels = train_targets[train_start:train_start + chunk].expand(len(query), -1)
            top_sim, pos = sim.topk(k, dim=1)                                    # c x k
            top_label = torch.cat([top_label, labels], 1).gather(1, pos)
        votes = torch.zeros(len(query), C, device=device)
        votes.scatter_add_(1, top_label, (top_sim / temperature).exp())         # c x C
        correct += int((votes.argmax(1).cpu() == test_targets[start:start + chunk]).sum())
    return 100.0 * correct / len(test_features)
