"""What the scripts measure beside the algorithm: train.py's monitors and the linear probe.

    after_epoch        train.py's end-of-epoch monitor: the kNN top-1 every --knn-every epochs and
                       the similarity probe
    knn_top1           the weighted kNN of Wu et al. 2018 (arXiv 1805.01978)
    similarity_probe   the TP / FN / TN similarities of the paper's Fig. 2b, on z and on h
    nmi, same_class_pairs   how a partition matches the classes (or the previous partition)
    LossTable          each step's losses, kept on the device and read every --log-every steps;
                       a non-finite loss raises NonFiniteLoss naming the step and the terms
    train_classifier, evaluate, cached_probe   the linear probe (linear_eval.py)
"""
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cluster
import runtime


# ---------------------------------------------------------------------------------------------
# train.py's monitors
# ---------------------------------------------------------------------------------------------

def after_epoch(model, views, test_views, knn, device, amp_dtype=None):
    """Collective: kNN top-1 on the test set when knn is true (every --knn-every epochs and after
    the last), and on rank 0 the similarity probe. Returns (stats, this rank's cluster.Shard of
    the kNN pass's train features, or None when the kNN did not run): made with the weights the
    next epoch starts from, they serve its clustering. The kNN alone gathers [N, F] onto rank 0,
    for as long as it runs."""
    rank, world = runtime.rank_world()
    targets = torch.as_tensor(views.dataset.targets)
    stats, shard = {}, None
    if knn:
        model.eval()
        shard = cluster.split_shard(model.encoder, views, len(targets), rank, world, device,
                                    amp_dtype)
        features = gather_features(shard, len(targets), device)[0]
        test_targets = torch.as_tensor(test_views.dataset.targets)
        test_features = split_features(model.encoder, test_views, len(test_targets), rank,
                                               world, device, amp_dtype)[0]
        model.train()
        if rank == 0:
            stats["knn_top1"] = knn_top1(features, targets, test_features, test_targets,
                                         num_classes=len(views.dataset.classes))
    if rank == 0:
        stats.update(similarity_probe(model, views, targets, device))
    return stats, shard


def gather_features(shard, num_samples, device):
    """Collective: the ranks' shards as one bank on rank 0, (features [N, F], targets [N]) in
    dataset-index order; (None, None) on the other ranks."""
    features = runtime.gather_rows(shard.features, shard.indices, num_samples, device)
    targets = runtime.gather_rows(shard.targets[:, None], shard.indices, num_samples, device)
    return (features, targets[:, 0]) if features is not None else (None, None)


def extract_features(encoder, loader, num_samples, device, storage_dtype=torch.float16,
                     amp_dtype=None):
    """Collective: cluster.shard_features, gathered on rank 0 (the arguments are
    shard_features's). Returns, on rank 0, (features [N, F] CPU storage_dtype, targets [N] CPU
    int64) in dataset-index order; (None, None) on the other ranks."""
    shard = cluster.shard_features(encoder, loader, num_samples, device, storage_dtype, amp_dtype)
    return gather_features(shard, num_samples, device)


def split_features(encoder, views, n, rank, world, device, amp_dtype=None, view="eval", key=None):
    """Collective: split_shard gathered on rank 0. Returns (features [n, F] float16, targets
    [n]) on rank 0, (None, None) elsewhere."""
    shard = cluster.split_shard(encoder, views, n, rank, world, device, amp_dtype, view, key)
    return gather_features(shard, n, device)


def prototype_stats(assignments, targets, previous=None):
    """How the first partition of assignments [N, H] matches the classes targets [N] (NMI, the
    share of same-prototype pairs of one class) and the previous epoch's partition (NMI)."""
    first = assignments[:, 0].numpy()
    stats = {"nmi_gt": nmi(first, targets.numpy()),
             "same_class_pairs": same_class_pairs(first, targets.numpy())}
    if previous is not None and previous.shape == assignments.shape:
        stats["nmi_prev"] = nmi(first, previous[:, 0].numpy())
    return stats


class NonFiniteLoss(ValueError):
    """A step's loss is NaN or infinite; the message names the step and every term."""


class LossTable:
    """Each step's losses of an epoch, [steps, 1 + terms] on the device, so that the steady state
    never waits for it: read() all-reduces the rows since the last read (one host-device
    synchronisation every --log-every steps) and checks them.

    names: "total", then the terms; partial: a run resumed inside the epoch, {"step", "history"}.
    """

    def __init__(self, names, steps, device, partial=None):
        self.names, self.steps = names, steps
        self.history = torch.zeros(steps, len(names), device=device)    # mean of the ranks
        self.checked = partial["step"] if partial else 0
        if partial:
            self.history[:self.checked] = partial["history"].to(device)

    def add(self, i, loss, terms):
        """Step i's total loss and its terms {name: scalar}, without reading them."""
        self.history[i] = torch.stack([loss.detach()] + [terms[n] for n in self.names[1:]]).float()

    def read(self, i, epoch):
        """Collective under DDP: the rows of steps checked..i, averaged over the ranks; raises
        NonFiniteLoss at the first step whose losses are not all finite. Returns step i's row."""
        rows = self.history[self.checked:i + 1]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(rows)
            rows /= dist.get_world_size()
        rows = rows.tolist()
        for j, values in enumerate(rows):
            if not all(math.isfinite(v) for v in values):
                named = ", ".join(f"{n}={v:.4g}" for n, v in zip(self.names, values))
                raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1} step "
                                    f"{self.checked + j + 1}/{self.steps}: {named}")
        self.checked = i + 1
        return rows[-1]

    def summary(self, last=20):
        """The epoch's mean losses, and over its last steps (how far a fresh head got)."""
        tail = self.history[-last:]
        stats = {f"loss_{n}": v for n, v in zip(self.names, self.history.mean(0).tolist())}
        stats.update({f"loss_{n}_last{len(tail)}": v
                      for n, v in zip(self.names, tail.mean(0).tolist())})
        return stats


@torch.no_grad()
def similarity_probe(model, views, targets, device, size=2048, batch=128):
    """The TP / FN / TN similarities of the paper's Fig. 2b, measured the same way for every
    method: the mean cosine similarity between the two views of an image (true positives), of two
    images of one class (false negatives) and of two classes (true negatives), over a fixed set of
    training images with fixed views (the same every epoch), in eval mode; in projection space z
    (sim_tp, ...), as the paper, and on the encoder features h that Eq. 3-4 and the linear probe
    read (sim_tp_h, ...). A kind of pair that the set lacks (two classes in a one-class dataset)
    gives None. On disk the views come in batches of `batch` images that the DataLoader workers
    share (all of them in one batch would be one worker's, 25-40 s at 224 px while the other ranks
    wait); each image's crop is a function of the key and the image, each batch's colouring of the
    key and the batch, so the views are the same at every call, whatever the workers."""
    g = torch.Generator().manual_seed(4321)
    idx = torch.randperm(len(targets), generator=g)[:size].sort().values
    targets = targets[idx].to(device)
    model.eval()
    outputs = [[], []]                                      # (h, z) of view 1, of view 2
    for pair, _, _ in views.batches([idx] if views.in_memory else idx.split(batch), "simclr",
                                    key=g, copies=2):
        for out, x in zip(outputs, pair):
            out += [model(v.contiguous(memory_format=torch.channels_last)) for v in x.split(512)]
    model.train()
    same_class = targets[:, None] == targets[None, :]
    other = ~torch.eye(len(idx), dtype=torch.bool, device=device)
    mean = lambda x: x.mean().item() if x.numel() else None      # None (JSON null): no such pair
    stats = {}
    for which, suffix in ((1, ""), (0, "_h")):                    # z, then h
        a, b = (F.normalize(torch.cat([out[which] for out in view]).float(), dim=1)
                for view in outputs)                               # M x D each
        sim = a @ b.T                                              # M x M: view 1 of i, 2 of j
        stats.update({f"sim_tp{suffix}": mean(sim.diagonal()),
                      f"sim_fn{suffix}": mean(sim[same_class & other]),
                      f"sim_tn{suffix}": mean(sim[~same_class])})
    return stats


@torch.no_grad()
def knn_top1(train_features, train_targets, test_features, test_targets, k=200, temperature=0.1,
             num_classes=None, chunk=4096, device=None):
    """Weighted kNN top-1 accuracy in percent (Wu et al. 2018, arXiv 1805.01978).

    Each test image votes with its k nearest training images by cosine similarity s, each weighted
    exp(s / temperature); the class with the largest summed weight is the prediction.

    Args:
        train_features: [N, F], any float dtype, on any device (fp16 CPU from
            monitor.extract_features is fine: every block is computed in float32).
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




# ---------------------------------------------------------------------------------------------
# The linear probe
# ---------------------------------------------------------------------------------------------

def train_classifier(classifier, epoch_batches, epochs, steps_per_epoch, lr, momentum=0.9,
                     weight_decay=0.0, encoder=None, device="cpu", amp_dtype=None, master=True):
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
    bar = tqdm(range(epochs), desc="linear probe", disable=not master, dynamic_ncols=True,
               leave=False)
    for epoch in bar:
        loss_sum, count = torch.zeros((), device=device), 0
        for x, y in epoch_batches(epoch):
            for group in optimizer.param_groups:
                group["lr"] = runtime.cosine_lr(step, total_steps, lr)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if encoder is not None:
                with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype,
                                                     enabled=amp_dtype is not None):
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


def linear_classifier(features, classes, device="cpu"):
    """The probe's classifier: nn.Linear with N(0, 0.01) weights and zero bias (moco-v3's)."""
    classifier = nn.Linear(features, classes)
    nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)
    return classifier.to(device)


def cached_probe(train_features, train_targets, test_features, test_targets, num_classes,
                 epochs=100, batch_size=256, lr=0.1, momentum=0.9, weight_decay=0.0, seed=0,
                 device="cpu"):
    """linear_eval.py --cached: linear_classifier trained by train_classifier (lr as given, not
    scaled) on fixed features [N, F] in batches of a seeded shuffle. Returns (top-1, top-5) on
    the test features."""
    classifier = linear_classifier(train_features.shape[1], num_classes, device)
    shuffle = torch.Generator().manual_seed(seed)

    def batches(epoch):
        for idx in torch.randperm(len(train_features), generator=shuffle).split(batch_size):
            yield train_features[idx], train_targets[idx]
    train_classifier(classifier, batches, epochs, math.ceil(len(train_features) / batch_size), lr,
                     momentum, weight_decay, device=device)
    return evaluate(classifier, test_features, test_targets, device)
