"""The SPCL losses: Eq. 1-5 of Mo, Sun and Li, "Siamese Prototypical Contrastive Learning",
BMVC 2021 (https://arxiv.org/abs/2208.08819), Sec. 3.3-3.6. Imports only torch; copy this file
as it is.

    nt_xent               Eq. 1-2  SimCLR's contrastive loss, negatives from every rank of `group`
    siamese_metric_loss   Eq. 3    binary "same prototype?" on |h_a - h_b| (Koch et al. 2015)
    siamese_pairs                  the view pairs Eq. 3 is applied to in a SPCL batch
    prototype_ce          Eq. 4    cross-entropy against the k-means pseudo labels
    symmetric_ce          Eq. 4    its symmetric variant (Wang et al. 2019, "SCE")
    spcl_loss             Eq. 5    the weighted sum, skipping every term whose weight is 0

Conventions a copier should know:
- Collectives are explicit. nt_xent and spcl_loss talk to other ranks only when given a process
  group (`group=dist.group.WORLD` under DDP); then every rank of the group must call them. With
  group=None (the default) they never communicate, so an evaluation helper on one rank is safe.
- Under a group, nt_xent returns the global loss with the gradient of this rank's share, which
  DDP's averaging of gradients turns into the exact global gradient (see nt_xent).
- Every function checks shapes and raises ValueError with a message that says what is wrong.
  Values are not checked: that would cost a host-device synchronisation per call and, under DDP,
  stop only the rank that sees a bad one. Check the loss the ranks agree on instead (train.py
  all-reduces it and stops at the first non-finite step, naming the terms).
"""
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _check(condition, message):
    if not condition:
        raise ValueError(message)


# torch >= 2.14 names the single-tensor collectives *_single and deprecates the older names.
_all_gather_single = (getattr(dist, "all_gather_single", None)
                      or getattr(dist, "all_gather_into_tensor", None))
_reduce_scatter_single = (getattr(dist, "reduce_scatter_single", None)
                          or getattr(dist, "reduce_scatter_tensor", None))


def _gather(x, group):
    """Concatenate x [n, ...] over the ranks of group in rank order -> [W*n, ...], no gradient."""
    out = x.new_empty((dist.get_world_size(group) * x.shape[0],) + tuple(x.shape[1:]))
    _all_gather_single(out, x.contiguous(), group=group)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """all_gather that is differentiable: [n, ...] on each of W ranks -> [W*n, ...] on every rank.

    A plain all_gather returns tensors without history, so the other ranks' embeddings would act
    as constants and their share of the gradient would be lost (the classic bug of SimCLR ports).
    The backward sums every rank's gradient for each slice and returns the local slice to its
    owner (a reduce-scatter), which is the exact gradient of the sum of all ranks' losses.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        local = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group),)
                               + tuple(grad.shape[1:]))
        _reduce_scatter_single(local, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return local, None


def gather_with_grad(x, group):
    """A collective: every rank of group must call it. Concatenates x [n, ...] over the ranks in
    rank order -> [W*n, ...], keeping the gradient path back to each rank's own slice."""
    return _GatherWithGrad.apply(x, group)


def nt_xent(z1, z2, temperature=0.5, *, labels=None, group=None):
    """Eq. 1-2, NT-Xent (Chen et al. 2020, SimCLR). With `group` it is a collective: every rank of
    the group must call it, with the same B. The mean over all 2M views of the global batch of

        l_i = -log( exp(sim(z_i, z_i') / t) / sum_{k != i} exp(sim(z_i, z_k) / t) )

    where i' is the other view of the same image and k runs over all 2M views (of all ranks of
    `group`; of this call alone when group is None). With `labels`, every view k of another image
    with i's label leaves i's denominator (a known false negative is not pushed away);
    labels=None, or labels all distinct, is SimCLR exactly.

    Args:
        z1, z2: [B, D], the two views of this rank's B images (row j of z1 and z2: image j).
        temperature: t > 0.
        labels: optional [B] int64, e.g. each image's prototype.
        group: a torch.distributed process group (dist.group.WORLD for all ranks), or None for
            one process. Never found by itself: a call on one rank alone cannot hang.

    Returns:
        scalar, the loss of the GLOBAL batch (identical on every rank).

    Gradient convention (group given): the value is the global mean, but its gradient is that of
    this rank's anchors' share, local mean; the other ranks' views carry their gradients back to
    their owners. DDP averages parameter gradients over the W ranks, which then gives exactly the
    gradient of the global loss: world size W with B per rank equals world size 1 with B*W (same
    loss, same gradients). Without DDP's averaging, divide by nothing and sum nothing: use it
    under DDP, or all-reduce the gradients with op AVG yourself.
    """
    _check(z1.dim() == 2 and z1.shape == z2.shape,
           f"nt_xent: z1 and z2 must both be [B, D], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    _check(z1.shape[0] >= 2, f"nt_xent: needs at least 2 images per rank (got B={z1.shape[0]}): "
                             "with one image the only candidate is the positive")
    _check(temperature > 0, f"nt_xent: temperature must be > 0, got {temperature}")
    _check(labels is None or labels.shape == (z1.shape[0],),
           f"nt_xent: labels must be [B]={z1.shape[0]}, got "
           f"{None if labels is None else tuple(labels.shape)}")

    B = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)              # 2B x D, unit rows
    z_all = z if group is None else gather_with_grad(z, group)   # 2BW x D, rank r's rows at r*2B
    offset = 0 if group is None else dist.get_rank(group) * 2 * B
    # Scaling the 2B x D side by 1/t is cheaper than dividing the 2B x 2BW logits.
    logits = (z / temperature) @ z_all.T                     # 2B x 2BW
    logits.diagonal(offset).fill_(float("-inf"))             # k != i: drop each view's
                                                             # self-similarity
    local = torch.arange(2 * B, device=z.device)
    positives = offset + (local + B) % (2 * B)               # column of the other view, i'
    if labels is not None:
        views = torch.cat([labels, labels])                  # 2B, the layout of z
        everyone = views if group is None else _gather(views, group)
        same = views[:, None] == everyone[None, :]           # 2B x 2BW
        same[local, positives] = False                       # i' stays: it is the positive
        logits = logits.masked_fill(same, float("-inf"))
    loss = F.cross_entropy(logits, positives)
    if group is not None:
        # Report the global mean while keeping the local gradient (see the docstring).
        global_mean = loss.detach().clone()
        dist.all_reduce(global_mean, group=group)
        global_mean /= dist.get_world_size(group)
        loss = loss + (global_mean - loss.detach())
    return loss


def siamese_metric_loss(head, h_a, h_b, same):
    """Eq. 3, the Siamese metric loss (Koch et al. 2015): BCEWithLogits(head(|h_a - h_b|), same).

    Args:
        head: module mapping [P, F] -> [P, 1] or [P] (SPCL: one Linear(F, 1)).
        h_a, h_b: [P, F], encoder features of the two sides of P pairs.
        same: [P] of 0/1 (bool, int or float), 1 when the pair shares a prototype.

    Returns:
        scalar, the mean over the P pairs.
    """
    _check(h_a.dim() == 2 and h_a.shape == h_b.shape,
           f"siamese_metric_loss: h_a and h_b must both be [P, F], got {tuple(h_a.shape)} and "
           f"{tuple(h_b.shape)}")
    _check(h_a.shape[0] >= 1, "siamese_metric_loss: needs at least 1 pair, got 0")
    _check(same.shape == (h_a.shape[0],),
           f"siamese_metric_loss: same must be [P]={h_a.shape[0]}, got {tuple(same.shape)}")
    score = head((h_a - h_b).abs())                          # P x 1
    score = score.reshape(h_a.shape[0])                      # P
    dtype = torch.promote_types(score.dtype, torch.float32)
    return F.binary_cross_entropy_with_logits(score.to(dtype), same.to(dtype))


def siamese_pairs(h1, h2, same, same_image_pairs=True):
    """The view pairs of a SPCL batch that Eq. 3 scores.

    Args:
        h1, h2: [2P, F], the two views' encoder features of 2P images laid out as P anchors
            followed by their P partners (row j pairs with row P + j).
        same: [P] of 0/1, whether anchor j and partner j share a prototype.
        same_image_pairs: also add the two views of each image, labelled 1, as the official code
            does ((a, a') and (b, b')).

    Returns:
        (left [Q, F], right [Q, F], label [Q]) with Q = 4P, or 6P with same_image_pairs: the four
        cross-image view pairs (a x b views) labelled `same`, then the same-image pairs.
    """
    _check(h1.dim() == 2 and h1.shape == h2.shape and h1.shape[0] % 2 == 0,
           f"siamese_pairs: h1 and h2 must both be [2P, F], got {tuple(h1.shape)} and "
           f"{tuple(h2.shape)}")
    P = h1.shape[0] // 2
    _check(same.shape == (P,), f"siamese_pairs: same must be [P]={P}, got {tuple(same.shape)}")
    a1, b1 = h1[:P], h1[P:]                                  # P x F each
    a2, b2 = h2[:P], h2[P:]
    left, right, label = [a1, a1, a2, a2], [b1, b2, b1, b2], [same] * 4
    if same_image_pairs:
        ones = torch.ones_like(same)
        left, right, label = left + [a1, b1], right + [a2, b2], label + [ones, ones]
    return torch.cat(left), torch.cat(right), torch.cat(label)


def _check_logits_targets(name, logits, targets):
    _check(logits.dim() == 2, f"{name}: logits must be [N, K], got {tuple(logits.shape)}")
    _check(targets.shape == (logits.shape[0],),
           f"{name}: targets must be [N]={logits.shape[0]}, got {tuple(targets.shape)}")
    _check(logits.shape[0] >= 1, f"{name}: needs at least 1 sample, got 0")
    _check(not targets.is_floating_point(),
           f"{name}: targets must be integer class indices, got {targets.dtype}")


def prototype_ce(logits, targets):
    """Eq. 4, prototypical cross-entropy: CE(W h, y) with y the prototype of each view's image.

    Args:
        logits: [N, K], the prototype head's output for N views.
        targets: [N] int64 in [0, K), the prototypes (k-means pseudo labels).

    Returns:
        scalar, the mean over the N views.
    """
    _check_logits_targets("prototype_ce", logits, targets)
    return F.cross_entropy(logits, targets)


def symmetric_ce(logits, targets, alpha=0.1, beta=1.0, log_zero=math.log(1e-4)):
    """Eq. 4, symmetric variant (Wang et al. 2019, "Symmetric Cross Entropy"): alpha*CE + beta*RCE,

        RCE = -sum_k p_k log q_k,  p = softmax(logits), q = one-hot(target), log 0 := log_zero,

    which for a one-hot q is -log_zero * (1 - p_target). Robust to noisy labels, such as
    prototypes that do not match the classes.

    Args:
        logits: [N, K]; targets: [N] int64 in [0, K).
        alpha, beta: weights of CE and RCE (official code: 0.1 and 1.0).
        log_zero: the value standing in for log 0 (official code: log(1e-4), the clamp of q).

    Returns:
        scalar, the mean over the N samples.
    """
    _check_logits_targets("symmetric_ce", logits, targets)
    ce = F.cross_entropy(logits, targets)
    # At least float32: fp16 logits under AMP would round p close to 1.
    dtype = torch.promote_types(logits.dtype, torch.float32)
    p_target = logits.softmax(dim=1, dtype=dtype).gather(1, targets[:, None]).squeeze(1)   # N
    rce = (-log_zero * (1 - p_target)).mean()
    return alpha * ce + beta * rce


CONTRAST_MODES = ("joint", "per-side", "masked")


def spcl_loss(z1, z2, h1, h2, *, same, assignments, metric_head=None, proto_heads=(), w_con=1.0,
              w_metric=1.0, w_proto=1.0, temperature=0.5, contrast="joint", proto_loss="ce",
              same_image_pairs=True, group=None):
    """Eq. 5: L = w_con * L_con + w_metric * L_metric + w_proto * L_proto, on one rank's batch. With
    `group` it is a collective (NT-Xent's negatives): every rank of the group must call it.

    The batch holds 2P images laid out as P anchors followed by their P partners.

    Args:
        z1, z2: [2P, D], projections of the two views (Eq. 1-2).
        h1, h2: [2P, F], encoder features of the two views (Eq. 3-4).
        same: [P] of 0/1, whether anchor j and partner j share a prototype (Eq. 3).
        assignments: [2P] or [2P, H] int64, each image's prototype under each of H clusterings.
        metric_head: module [Q, F] -> [Q, 1] (Eq. 3); needed when w_metric > 0.
        proto_heads: H modules, head j: [N, F] -> [N, K_j] (Eq. 4); L_proto averages over them.
        w_con, w_metric, w_proto: the weights; a term whose weight is 0 is not computed.
        temperature: NT-Xent's t.
        contrast: which views share NT-Xent's softmax (Eq. 1-2):
            "joint"     all 4P views of the batch, as SimCLR: a same-prototype partner is a
                        negative of its anchor while Eq. 3 pulls the two together;
            "per-side"  the anchors' 2P views and the partners' 2P views separately (each with
                        negatives from every rank), L_con the mean of the two sides; the official
                        code sums them, which is this at twice w_con;
            "masked"    joint, with every view of an image of the same prototype (first column of
                        `assignments`) removed from each view's denominator.
        proto_loss: "ce" or "sce" (symmetric_ce with its defaults).
        same_image_pairs: see siamese_pairs.
        group: process group for NT-Xent's negatives (see nt_xent), or None for one process.

    Returns:
        (total scalar with gradient, {term name: detached scalar} for each computed term).
    """
    _check(proto_loss in ("ce", "sce"),
           f"spcl_loss: proto_loss must be 'ce' or 'sce', got {proto_loss!r}")
    _check(contrast in CONTRAST_MODES,
           f"spcl_loss: contrast must be one of {CONTRAST_MODES}, got {contrast!r}")
    _check(w_con or w_metric or w_proto, "spcl_loss: all three weights are 0, nothing to train")
    _check(h1.dim() == 2 and h1.shape[0] % 2 == 0 and z1.shape[0] == h1.shape[0],
           f"spcl_loss: z1 and h1 must hold 2P rows (P anchors, then P partners), got "
           f"{tuple(z1.shape)} and {tuple(h1.shape)}")
    P = h1.shape[0] // 2
    if assignments.dim() == 1:
        assignments = assignments[:, None]                   # 2P x H
    terms = {}
    if w_con and contrast == "per-side":
        sides = [nt_xent(z1[s], z2[s], temperature, group=group)
                 for s in (slice(0, P), slice(P, None))]
        terms["con"] = (w_con, (sides[0] + sides[1]) / 2)
    elif w_con:
        labels = assignments[:, 0] if contrast == "masked" else None
        terms["con"] = (w_con, nt_xent(z1, z2, temperature, labels=labels, group=group))
    if w_metric:
        _check(metric_head is not None, "spcl_loss: w_metric > 0 needs a metric_head")
        left, right, label = siamese_pairs(h1, h2, same, same_image_pairs)
        terms["metric"] = (w_metric, siamese_metric_loss(metric_head, left, right, label))
    if w_proto:
        _check(assignments.shape == (h1.shape[0], len(proto_heads)),
               f"spcl_loss: assignments must be [2P, H]=[{h1.shape[0]}, {len(proto_heads)}] "
               f"(one column per prototype head), got {tuple(assignments.shape)}")
        ce = prototype_ce if proto_loss == "ce" else symmetric_ce
        h = torch.cat([h1, h2])                              # 4P x F, every view
        per_head = [ce(head(h), assignments[:, j].repeat(2))
                    for j, head in enumerate(proto_heads)]
        terms["proto"] = (w_proto, torch.stack(per_head).mean())
    total = sum(w * value for w, value in terms.values())
    return total, {name: value.detach() for name, (_, value) in terms.items()}
