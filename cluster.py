"""Prototypes (paper Sec. 3.2): k-means on encoder features at the start of every epoch; and the
kNN monitor, which reads the same features.

    features, targets = extract_features(encoder, loader, N, device)  # rank 0; None elsewhere
    assignments, stats = distributed_kmeans(features, [K], N, seed=seed + epoch,
                                            device=device)  # [N, 1]
    top1 = knn_top1(features, targets, test_features, test_targets)   # rank 0

The features are gathered onto rank 0 only, batch by batch, into one [N, F] buffer (fp16 by
default: 5.2 GB for ImageNet with a ResNet-50), which is the only full copy on any process.
Rank 0 clusters them as DeepCluster and the official code do (PCA-whitening to 256 dims, L2
normalisation, 20 Lloyd iterations of faiss k-means from random centroids) and broadcasts
the assignments. `nmi` measures the partition against the labels or the previous epoch.
"""

import math
import time

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


@torch.no_grad()
def extract_features(encoder, loader, num_samples, device, storage_dtype=torch.float16,
                     amp_dtype=None):
    """Encoder features of every image, in dataset-index order, collected on rank 0.

    Args:
        encoder: images [B, 3, H, W] -> features [B, F]. Used as given: put it in eval mode
            first if BatchNorm statistics must not move.
        loader: yields (images, targets, indices), indices being dataset indices. Any order,
            any sampler, e.g. a shuffled DistributedSampler: its padding duplicates are
            written twice to the same row with the same values.
        num_samples: N, the dataset size.
        device: where the encoder runs, and where the collectives run (NCCL needs CUDA).
        storage_dtype: dtype of the returned features; fp16 halves rank 0's memory.
        amp_dtype: run the encoder under torch.autocast in this dtype (the training one), or
            in full precision when None.

    Returns:
        On rank 0, (features [N, F] CPU storage_dtype, targets [N] CPU int64);
        (None, None) on the other ranks.
    """
    device = torch.device(device)
    rank, world_size = _dist_info()
    if world_size > 1:
        # max and -min in one reduction: a rank with fewer batches would hang the others.
        num_batches = torch.tensor([len(loader), -len(loader)], device=device)
        dist.all_reduce(num_batches, op=dist.ReduceOp.MAX)
        if num_batches[0] != -num_batches[1]:
            raise ValueError("every rank must draw the same number of batches "
                             "(use a DistributedSampler)")

    features = targets = seen = None
    for images, batch_targets, indices in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            batch_features = encoder(images.to(device, non_blocking=True))  # [B, F]
        batch_features = batch_features.to(storage_dtype)
        indices = torch.as_tensor(indices)
        bad = bool(len(indices)) and not 0 <= int(indices.min()) <= int(indices.max()) < num_samples
        if bad and world_size == 1:
            raise _index_error(indices, num_samples)
        # Indices and targets travel together as [B, 2] int64, padded rows marked index -1.
        meta = torch.stack([indices, torch.as_tensor(batch_targets)], dim=1).to(device, torch.int64)

        if world_size > 1:
            # The last batches may differ in size across ranks, and gather needs equal shapes; the
            # same reduction tells every rank about bad indices anywhere, so that all of them stop.
            size_bad = torch.tensor([len(meta), int(bad)], device=device)
            dist.all_reduce(size_bad, op=dist.ReduceOp.MAX)
            if size_bad[1]:
                raise _index_error(indices if bad else None, num_samples)
            pad = int(size_bad[0]) - len(meta)
            batch_features = torch.nn.functional.pad(batch_features, (0, 0, 0, pad))
            meta = torch.nn.functional.pad(meta, (0, 0, 0, pad), value=-1)
            gathered_features = gathered_meta = None
            if rank == 0:
                gathered_features = [torch.empty_like(batch_features) for _ in range(world_size)]
                gathered_meta = [torch.empty_like(meta) for _ in range(world_size)]
            dist.gather(batch_features, gathered_features, dst=0)
            dist.gather(meta, gathered_meta, dst=0)
            if rank != 0:
                continue
            batch_features, meta = torch.cat(gathered_features), torch.cat(gathered_meta)

        batch_features, meta = batch_features.cpu(), meta.cpu()
        real = meta[:, 0] >= 0
        batch_features, indices, batch_targets = batch_features[real], meta[real, 0], meta[real, 1]
        if features is None:
            features = torch.empty(num_samples, batch_features.shape[1], dtype=storage_dtype)
            targets = torch.full((num_samples,), -1, dtype=torch.int64)
            seen = torch.zeros(num_samples, dtype=torch.bool)
        features[indices] = batch_features
        targets[indices] = batch_targets
        seen[indices] = True

    missing = 0 if rank else num_samples if seen is None else int((~seen).sum())
    missing = torch.tensor([missing], device=device)
    if world_size > 1:
        dist.broadcast(missing, src=0)  # every rank raises, rather than wait for rank 0 later
    if missing:
        raise RuntimeError(f"{int(missing)} of {num_samples} dataset indices never came out "
                           "of the loader")
    return (features, targets) if rank == 0 else (None, None)


def split_features(encoder, views, n, rank, world, device, amp_dtype=None, view="eval", key=None):
    """extract_features over a whole split of n images: this rank's shard of data.Views batches
    (the evaluation view, or a random one with its key). Returns (features [n, F] float16, targets
    [n]) on rank 0, (None, None) elsewhere."""
    batches = views.batches(data.shard(n, rank, world, 512), view, key)
    return extract_features(encoder, batches, n, device, amp_dtype=amp_dtype)


def _index_error(indices, num_samples):
    """The ValueError for dataset indices outside [0, N); indices None:
    they were on another rank."""
    got = ("others on another rank" if indices is None
           else f"{int(indices.min())}..{int(indices.max())}")
    return ValueError(f"dataset indices must lie in [0, {num_samples}), got {got}")


def _check_features(features, ks):
    """float32, C-contiguous numpy copy of features [N, D], after validating them and every k."""
    if torch.is_tensor(features):
        features = features.detach().cpu().float().numpy()
    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"features must be a non-empty [N, D] matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    for k in ks:
        if k < 2 or k > x.shape[0]:
            raise ValueError(f"need 2 <= k <= N, got k={k} for N={x.shape[0]} features")
    return x


def run_kmeans(features, k, seed=0, niter=20, pca_dim=256, gpu=None):
    """k-means prototypes of features [N, D] (tensor or array, any float dtype).

    Pre-processing as DeepCluster: PCA-whitening to pca_dim dims (at most D and N - 1; 0 skips it),
    then L2 normalisation. faiss k-means, `niter` Lloyd iterations, one GPU when gpu is True,
    or None and faiss sees one. faiss would train on a random 256·k subsample unless told
    otherwise, so max_points_per_centroid is raised until every one of the N points counts.
    The centroids start at k random points, as in DeepCluster and the official code.

    Returns:
        assignments: int64 [N], the nearest final centroid of every point.
        centroids: float32 [k, d], d = pca_dim or D, in the pre-processed space.
        stats: dict of JSON-ready numbers: objective (sum of squared distances to the
            assigned centroids), size_min, size_median, size_max, empty_clusters, seconds
            (the k-means), preprocess_seconds (checks, PCA, normalisation), pca_dim (the
            dimension used; 0 when PCA is off).
    """
    return run_kmeans_multi(features, [k], seed=seed, niter=niter, pca_dim=pca_dim, gpu=gpu)[0]


def run_kmeans_multi(features, ks, seed=0, niter=20, pca_dim=256, gpu=None):
    """run_kmeans for every k in ks on the same features, pre-processing them once.

    The PCA is the expensive part at ImageNet size (N x D^2 for the covariance) and does not
    depend on k. Returns a list of run_kmeans's (assignments, centroids, stats), one per k;
    every stats dict carries the same preprocess_seconds.
    """
    start = time.perf_counter()
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError("need at least one k")
    x = _check_features(features, ks)
    if gpu is None:
        gpu = faiss.get_num_gpus() > 0
    elif gpu and faiss.get_num_gpus() == 0:
        raise ValueError("gpu=True but faiss sees no GPU (is faiss-gpu installed?)")

    pca_dim = min(pca_dim, x.shape[1], x.shape[0] - 1)  # N centred points span N - 1 dims
    if pca_dim > 0:
        pca = faiss.PCAMatrix(x.shape[1], pca_dim, -0.5)  # eigen_power -0.5: whitening
        pca.train(x)
        top_variance = float(faiss.vector_to_array(pca.eigenvalues).max())
        if top_variance <= 0:
            raise ValueError("features are all identical: nothing to whiten or cluster")
        # Whitening divides by sqrt(eigenvalue). Directions of (numerically) zero variance,
        # e.g. when N < D or units are dead, would blow float32 round-off up to unit scale;
        # a floor of 1e-4 of the top eigenvalue keeps them small (0.1 at most).
        pca.epsilon = 1e-4 * top_variance
        pca.prepare_Ab()
        x = pca.apply(x)
    else:
        x = x.copy()  # normalize_L2 works in place: never on the caller's array
    faiss.normalize_L2(x)
    preprocess_seconds = time.perf_counter() - start

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
        }
        results.append((assignments, kmeans.centroids, stats))
    return results


def distributed_kmeans(features, ks, num_samples, seed=0, niter=20, pca_dim=256, device=None):
    """run_kmeans_multi on rank 0, then the same assignments on every rank.

    Args:
        features: [N, F] on rank 0 (as returned by `extract_features`), None on other ranks.
        ks: the numbers of prototypes, one k-means each (an int for one).
        device: where the broadcast runs; default the current CUDA device for NCCL, else CPU.

    Returns:
        assignments: int64 [num_samples, len(ks)] CPU tensor, identical on every rank.
        stats: run_kmeans's stats dicts, one per k, on every rank.
    If clustering fails on rank 0, every rank raises its error instead of waiting forever.
    """
    ks = [ks] if isinstance(ks, int) else list(ks)

    def cluster():
        results = run_kmeans_multi(features, ks, seed=seed, niter=niter, pca_dim=pca_dim)
        columns = np.stack([assignments for assignments, _, _ in results], 1)
        if len(columns) != num_samples:  # the broadcast buffer has num_samples rows
            raise ValueError(f"got {len(columns)} features for num_samples={num_samples}")
        return torch.from_numpy(columns), [stats for _, _, stats in results]

    rank, world_size = _dist_info()
    if world_size == 1:
        return cluster()

    if device is None:
        device = (torch.device("cuda", torch.cuda.current_device())
                  if dist.get_backend() == "nccl" else "cpu")
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
def cluster_means(features, assignments, k, chunk=65536):
    """The mean feature of each of k clusters, L2-normalised: [k, F] float32 (an empty cluster's
    row is 0). features [N, F] any float dtype, assignments [N] int64 in [0, k); summed in chunks,
    so a float16 bank is never copied whole to float32."""
    features, assignments = torch.as_tensor(features), torch.as_tensor(assignments)
    if features.dim() != 2 or assignments.shape != features.shape[:1]:
        raise ValueError(f"need features [N, F] and assignments [N], got {tuple(features.shape)} "
                         f"and {tuple(assignments.shape)}")
    sums = torch.zeros(k, features.shape[1])
    for start in range(0, len(features), chunk):
        sums.index_add_(0, assignments[start:start + chunk], features[start:start + chunk].float())
    return torch.nn.functional.normalize(sums, dim=1)


def nmi(a, b):
    """Normalised mutual information of two labelings [N] (arithmetic mean, as scikit-learn).

    I(a; b) / ((H(a) + H(b)) / 2), 1 for identical partitions up to renaming, 0 for
    independent ones; 1 as well when neither labeling splits the data.
    """
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"need two non-empty labelings of equal length, got {a.size} and {b.size}")
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    num_b = int(b.max()) + 1
    # Joint counts from unique codes, never a dense [Ka, Kb] table (Ka = N for singletons).
    codes, joint = np.unique(a.astype(np.int64) * num_b + b, return_counts=True)
    p_ab = joint / a.size
    p_a = np.bincount(a) / a.size
    p_b = np.bincount(b) / a.size
    h_a = -(p_a * np.log(p_a)).sum()
    h_b = -(p_b * np.log(p_b)).sum()
    if h_a == 0 and h_b == 0:
        return 1.0
    mutual = (p_ab * np.log(p_ab / (p_a[codes // num_b] * p_b[codes % num_b]))).sum()
    return float(np.clip(mutual / ((h_a + h_b) / 2), 0.0, 1.0))


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
