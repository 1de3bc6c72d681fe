"""Batches of (anchor, partner, same) pairs for SPCL (paper Sec. 3.1 and 3.4).

`PrototypePairSampler` turns one k-means partition of the dataset into an epoch of image pairs,
about `p_same` of them from one prototype (positives of the metric loss, Eq. 3) and the rest
from two different prototypes (its negatives). Every image is used once per epoch, as in a
shuffled SimCLR epoch, so SPCL and SimCLR at the same flags see the same number of images.

    sampler = PrototypePairSampler(assignments, batch_size=512, num_replicas=W, rank=r)
    for epoch in ...:
        assignments = ...                      # new k-means partition, int64 [N]
        sampler.set_assignments(assignments); sampler.set_epoch(epoch)
        for triples in sampler: ...            # this rank's [(anchor, partner, same), ...]

The sampler yields indices only: the images' views come from data.Views, and each pair's
prototypes are looked up from the indices, so the dataset never changes between epochs.
With all-singleton assignments (`torch.arange(N)`) every pair is a uniformly random pair of
distinct images: plain SimCLR batches through the same code path.
"""

import numpy as np
import torch


def _as_labels(assignments):
    """Validated int64 numpy copy of a [N] tensor or array of prototype ids."""
    labels = (assignments.numpy(force=True) if torch.is_tensor(assignments)
              else np.asarray(assignments))
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"assignments must be a non-empty 1-D array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"assignments must hold integers, got dtype {labels.dtype}")
    return labels.astype(np.int64)


def _same_pairs_per_prototype(sizes, target):
    """How many same-prototype pairs to take from each prototype.

    sizes: int64 [K], images per prototype (their sum is even). target: wanted number of
    same pairs. Returns int64 [K], at most sizes // 2 each, summing to the closest feasible
    count to `target` (up to a pair or two of parity slack): the images left over must pair
    across prototypes, which needs every prototype to keep at most half of the leftovers.
    Above that floor the pairs are shared in proportion to what each prototype can still
    give, so every image has about the same chance to be in a same pair.
    """
    most = sizes // 2
    # At least: a prototype with more than half the images must pair its excess with itself.
    target = int(np.clip(target, sizes.max() - sizes.sum() // 2, most.sum()))
    half_left = (sizes.sum() - 2 * target) // 2
    # ceil((size - half_left) / 2) pairs bring a prototype down to half_left leftovers.
    need = np.clip(-((half_left - sizes) // 2), 0, most)
    extra = target - need.sum()
    if extra <= 0:
        return need
    room = most - need
    share, remainder = np.divmod(extra * room, room.sum())  # largest-remainder rounding
    # Prototypes are indexed in a random order, so the stable sort breaks ties at random.
    share[np.argsort(-remainder, kind="stable")[: extra - share.sum()]] += 1
    return need + share


def _pair_up(labels, num_protos, p_same, rng):
    """One epoch of pairs, in random order. See `PrototypePairSampler` for the algorithm.

    labels: int64 [N] in [0, num_protos). Returns anchors, partners: int64 [N // 2] each.
    """
    n = len(labels)
    # Relabel prototypes by a random rank: sorting by rank then lists the prototypes in a
    # random order, and a stable sort of shuffled images keeps each prototype's members shuffled.
    group_of = rng.permutation(num_protos)[labels]  # [N]
    images = rng.permutation(n)[: n - n % 2]  # [N'] an odd image out sits this epoch out
    images = images[np.argsort(group_of[images], kind="stable")]
    group = group_of[images]  # [N'] non-decreasing
    sizes = np.bincount(group, minlength=num_protos)  # [K]
    same_pairs = _same_pairs_per_prototype(sizes, round(p_same * (len(images) // 2)))

    # Same pairs: consecutive members (0, 1), (2, 3), ... of each prototype, up to its budget.
    member = np.arange(len(images)) - (np.cumsum(sizes) - sizes)[group]
    in_same = member < 2 * same_pairs[group]
    first = np.flatnonzero(in_same & (member % 2 == 0))
    same_a, same_b = images[first], images[first + 1]

    # Cross pairs: the leftovers, still grouped by prototype, are cut in two halves. Only the
    # prototype that straddles the cut has members in both; its members go to the front of the
    # first half and the back of the second, which cannot meet because no prototype holds more
    # than half the leftovers. Everything else is shuffled, so a leftover's partner is a random
    # leftover of the other half.
    left, left_group = images[~in_same], group[~in_same]
    half = len(left) // 2
    head, tail = left[:half], left[half:]
    if half > 0:
        straddler = left_group[half]
        in_head, in_tail = left_group[:half] == straddler, left_group[half:] == straddler
        head = np.concatenate([head[in_head], rng.permutation(head[~in_head])])
        tail = np.concatenate([rng.permutation(tail[~in_tail]), tail[in_tail]])

    anchors = np.concatenate([same_a, head])
    partners = np.concatenate([same_b, tail])
    order = rng.permutation(len(anchors))
    anchors, partners = anchors[order], partners[order]
    flip = rng.random(len(anchors)) < 0.5  # which image is the anchor carries no meaning
    return np.where(flip, partners, anchors), np.where(flip, anchors, partners)


class PrototypePairSampler(torch.utils.data.Sampler):
    """Batch sampler of (anchor, partner, same) triples, for `DataLoader(batch_sampler=...)`.

    Args:
        assignments: int64 tensor or array [N], the prototype (k-means cluster) of every image.
        batch_size: images in the GLOBAL batch, all ranks together: batch_size // 2 pairs, of
            which each rank yields batch_size // 2 // num_replicas.
        num_replicas, rank: data-parallel world size and this process's rank.
        seed: base seed; an epoch's pairs depend only on (seed, epoch, assignments).
        p_same: wanted share of same-prototype pairs.
        drop_last: drop the last, incomplete global batch. Otherwise it is kept, trimmed to a
            multiple of num_replicas pairs so that every rank yields equal batches.

    Pairing algorithm (fully vectorised, O(N log N)): shuffle the images, stable-sort them by a
    random ranking of the prototypes, so each prototype's members are contiguous and in random
    order. Each prototype gives its first 2·s_c members as s_c consecutive same pairs, with
    s_c chosen so that sum(s_c) = round(p_same · N/2) and no prototype keeps more than half of
    the leftovers (otherwise they could not all be paired across prototypes). The leftovers
    are cut in two halves and paired across the cut, after moving the one prototype with
    members on both sides so that its members cannot meet; the rest of each half is shuffled.
    Finally the pairs are shuffled and cut into global batches; rank r takes the r-th
    contiguous slice of each. When p_same cannot be reached (one prototype holds more than
    half the data, or most prototypes are singletons) the sampler comes as close as the
    partition allows, and `same` always tells the truth: same == (assignments[a] == assignments[b]).
    """

    def __init__(self, assignments, batch_size, num_replicas=1, rank=0, seed=0, p_same=0.5,
                 drop_last=True):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need 0 <= rank < num_replicas, got rank={rank}, "
                             f"num_replicas={num_replicas}")
        if batch_size <= 0 or batch_size % (2 * num_replicas):
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of 2 * "
                             f"num_replicas = {2 * num_replicas}")
        if not 0.0 <= p_same <= 1.0:
            raise ValueError(f"p_same must be in [0, 1], got {p_same}")
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.seed, self.p_same, self.drop_last, self.epoch = seed, p_same, drop_last, 0
        self.set_assignments(assignments)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def set_assignments(self, assignments):
        """New partition: int64 [N]. Prototype ids may be any integers (they are relabelled)."""
        labels = _as_labels(assignments)
        if self.batch_size > len(labels) - len(labels) % 2:
            raise ValueError(f"batch_size={self.batch_size} is more than the {len(labels)} "
                             "images to pair")
        self.assignments = labels
        _, self._labels = np.unique(labels, return_inverse=True)  # [N] in [0, K)
        self._num_protos = int(self._labels.max()) + 1

    def _batch_sizes(self):
        """(number of global batches, pairs in the last one)."""
        pairs, per_batch = len(self.assignments) // 2, self.batch_size // 2
        full, rest = divmod(pairs, per_batch)
        rest -= rest % self.num_replicas
        if self.drop_last or rest == 0:
            return full, per_batch
        return full + 1, rest

    def global_pairs(self):
        """int64 [pairs, 3] of (anchor, partner, same): this epoch's global batches,
        back to back."""
        rng = np.random.default_rng([self.seed, self.epoch])
        anchors, partners = _pair_up(self._labels, self._num_protos, self.p_same, rng)
        num_batches, last = self._batch_sizes()
        used = (num_batches - 1) * (self.batch_size // 2) + last
        anchors, partners = anchors[:used], partners[:used]
        same = self.assignments[anchors] == self.assignments[partners]
        return np.stack([anchors, partners, same], axis=1)

    def __iter__(self):
        pairs = self.global_pairs()
        per_batch = self.batch_size // 2
        num_batches, last = self._batch_sizes()
        for b in range(num_batches):
            size = per_batch if b < num_batches - 1 else last
            share = size // self.num_replicas
            start = b * per_batch + self.rank * share
            yield [tuple(t) for t in pairs[start : start + share].tolist()]

    def __len__(self):
        return self._batch_sizes()[0]
