"""Tests for the SPCL reference implementation: `python -m pytest -q test_spcl.py`.

Every check compares against an independent computation: a naive loop written from the paper's
equation, a hand-computed case, or a second code path (world size 1 against 2). Sections follow
the modules; the shared helpers (naive losses, launchers) come first. Tests that need the real
CIFAR-10 images in ../shared/data/cifar10 skip without them; `-m "not slow"` leaves out the
end-to-end and multi-process ones.
"""
import argparse
import importlib.util
import itertools
import json
import math
import os
import re
import runpy
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter

import faiss
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

import checkpoint
import cluster
import data
import linear_eval
import models
import monitor
import runtime
import train
from checkpoint import export_encoder, load_encoder
from cluster import (Shard, cluster_means, distributed_kmeans, pca_whitening, run_kmeans,
                     run_kmeans_multi, shard_features, whiten)
from lars import LARS
from losses import (nt_xent, prototype_ce, siamese_metric_loss, siamese_pairs, spcl_loss,
                    symmetric_ce)
from models import SPCLModel, TrainingStep, build_encoder
from monitor import (evaluate, extract_features, knn_top1, nmi, same_class_pairs,
                     train_classifier)
from sampler import PrototypePairSampler

HERE = os.path.dirname(os.path.abspath(__file__))
CIFAR10 = os.path.join(HERE, "..", "shared", "data", "cifar10")


# ---------------------------------------------------------------------------------------------
# Shared fixtures and helpers: real CIFAR-10 images, train.py's arguments and outputs
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def system_temp_folder_untouched(tmp_path_factory):
    """Everything the suite runs (torchrun's logs, tempfile folders of the scripts) writes its
    temporary files under pytest's own folder (pytest.ini puts it in .pytest_tmp), and the
    system temp folder ends the suite with no new entry."""
    system = tempfile.gettempdir()
    before = set(os.listdir(system))
    own = str(tmp_path_factory.mktemp("tmp"))
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"], tempfile.tempdir = own, None
    yield
    if saved is None:
        del os.environ["TMPDIR"]
    else:
        os.environ["TMPDIR"] = saved
    tempfile.tempdir = None
    left = sorted(set(os.listdir(system)) - before)
    assert not left, f"the suite left {left} in {system}"


needs_cifar = pytest.mark.skipif(not os.path.isdir(os.path.join(CIFAR10, "train")),
                                 reason="needs the real CIFAR-10 JPEGs in ../shared/data/cifar10")


@pytest.fixture(scope="session")
def small_cifar(tmp_path_factory):
    """An ImageFolder tree of real CIFAR-10 JPEGs: 32 train and 8 test images per class."""
    if not os.path.isdir(os.path.join(CIFAR10, "train")):
        pytest.skip("needs the real CIFAR-10 JPEGs in ../shared/data/cifar10")
    root = tmp_path_factory.mktemp("cifar10_small")
    for split, per_class in (("train", 32), ("test", 8)):
        for cls in sorted(os.listdir(os.path.join(CIFAR10, split))):
            os.makedirs(root / split / cls)
            for name in sorted(os.listdir(os.path.join(CIFAR10, split, cls)))[:per_class]:
                os.symlink(os.path.join(CIFAR10, split, cls, name), root / split / cls / name)
    return str(root)


def _train_args(data_root, out, *extra):
    return ["--dataset", "cifar10", "--data", data_root, "--out", str(out), "--arch",
            "resnet18_narrow", "--epochs", "2", "--batch-size", "64", "--num-prototypes", "8",
            "--warmup-epochs", "1", "--workers", "1", *extra]


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _all_finite(value):
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    return not isinstance(value, float) or math.isfinite(value)


# ---------------------------------------------------------------------------------------------
# Helpers: naive losses straight from the equations, and a two-process gloo launcher
# ---------------------------------------------------------------------------------------------

def _naive_nt_xent(z1, z2, t):
    z = torch.cat([z1, z2])
    n, B = z.shape[0], z1.shape[0]
    total = 0.0
    for i in range(n):
        pos = (i + B) % n
        sim = lambda k: torch.dot(z[i], z[k]) / (z[i].norm() * z[k].norm())
        denominator = sum(torch.exp(sim(k) / t) for k in range(n) if k != i)
        total = total - torch.log(torch.exp(sim(pos) / t) / denominator)
    return total / n


def _naive_bce_metric(w, b, h_a, h_b, same):
    total = 0.0
    for p in range(h_a.shape[0]):
        s = torch.dot(w, (h_a[p] - h_b[p]).abs()) + b
        prob = 1 / (1 + torch.exp(-s))
        total = total - (same[p] * torch.log(prob) + (1 - same[p]) * torch.log(1 - prob))
    return total / h_a.shape[0]


def _naive_ce(logits, targets):
    total = 0.0
    for n in range(logits.shape[0]):
        total = total - (logits[n, targets[n]] - torch.log(torch.exp(logits[n]).sum()))
    return total / logits.shape[0]


def _naive_sce(logits, targets, alpha, beta, log_zero):
    total = 0.0
    for n in range(logits.shape[0]):
        p = torch.exp(logits[n]) / torch.exp(logits[n]).sum()
        ce = -torch.log(p[targets[n]])
        rce = -sum(p[k] * (0.0 if k == targets[n] else log_zero) for k in range(logits.shape[1]))
        total = total + alpha * ce + beta * rce
    return total / logits.shape[0]


def _spawn(fn, world_size, tmp_path, *args):
    """Run fn(rank, world_size, init_file, *args) in world_size gloo processes."""
    init_file = os.path.join(str(tmp_path), "pg_init")
    mp.spawn(_worker, args=(fn, world_size, init_file, args), nprocs=world_size, join=True)


def _worker(rank, fn, world_size, init_file, args):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# losses.py
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,D,t", [(2, 3, 0.5), (5, 7, 0.1), (8, 4, 1.0)])
def test_nt_xent_matches_naive_loop(B, D, t):
    g = torch.Generator().manual_seed(B)
    z1 = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    loss = nt_xent(z1, z2, t)
    grads = torch.autograd.grad(loss, (z1, z2))
    ref = _naive_nt_xent(z1, z2, t)
    ref_grads = torch.autograd.grad(ref, (z1, z2))
    assert torch.allclose(loss, ref, atol=1e-6, rtol=0)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_nt_xent_identical_views_of_orthogonal_images_has_known_value():
    # Two views equal, images orthogonal: sim(i, i') = 1, the 2B-2 others 0.
    B, t = 4, 0.5
    z = torch.eye(B, dtype=torch.float64)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + (2 * B - 2)))
    assert nt_xent(z, z.clone(), t).item() == pytest.approx(expected, abs=1e-12)


def _ddp_nt_xent_worker(rank, world_size, x1, x2, state, out_dir):
    model = nn.Linear(x1.shape[1], 3).double()
    model.load_state_dict(state)
    ddp = nn.parallel.DistributedDataParallel(model)
    B = x1.shape[0] // world_size
    mine = slice(rank * B, (rank + 1) * B)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # no deprecated collectives, no other warning
        if rank == 0:       # no group: one rank alone computes its own batch's loss, no collective
            alone = nt_xent(x1[mine], x2[mine], temperature=0.3)
        loss = nt_xent(ddp(x1[mine]), ddp(x2[mine]), temperature=0.3, group=dist.group.WORLD)
        loss.backward()
    if rank == 0:
        assert torch.allclose(alone, _naive_nt_xent(x1[mine], x2[mine], 0.3), atol=1e-9)
    torch.save({"loss": loss.detach(), "grads": [p.grad for p in model.parameters()]},
               os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_nt_xent_world_size_2_equals_world_size_1(tmp_path):
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(12, 5, generator=g, dtype=torch.float64)
    x2 = x1 + 0.3 * torch.randn(12, 5, generator=g, dtype=torch.float64)
    model = nn.Linear(5, 3).double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loss = nt_xent(model(x1), model(x2), temperature=0.3)
    loss.backward()
    _spawn(_ddp_nt_xent_worker, 2, tmp_path, x1, x2, state, str(tmp_path))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.allclose(result["loss"], loss.detach(), atol=1e-5, rtol=0)
        for got, p in zip(result["grads"], model.parameters()):
            assert torch.allclose(got, p.grad, atol=1e-5, rtol=0)


def test_siamese_metric_loss_matches_naive_loop():
    g = torch.Generator().manual_seed(1)
    head = nn.Linear(6, 1).double()
    h_a = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    h_b = torch.randn(9, 6, generator=g, dtype=torch.float64, requires_grad=True)
    same = torch.randint(0, 2, (9,), generator=g)
    loss = siamese_metric_loss(head, h_a, h_b, same)
    params = (h_a, h_b, head.weight, head.bias)
    grads = torch.autograd.grad(loss, params)
    ref = _naive_bce_metric(head.weight[0], head.bias[0], h_a, h_b, same.double())
    ref_grads = torch.autograd.grad(ref, params)
    assert torch.allclose(loss.double(), ref, atol=1e-6, rtol=0)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_siamese_pairs_are_the_cross_view_pairs_and_same_image_pairs():
    P, F = 3, 2
    h1 = torch.arange(2 * P * F, dtype=torch.float64).reshape(2 * P, F)
    h2 = -h1
    same = torch.tensor([1, 0, 1])
    left, right, label = siamese_pairs(h1, h2, same)
    expected = []
    for j in range(P):
        a, b = (h1[j], h2[j]), (h1[P + j], h2[P + j])
        expected += [(a[u], b[v], same[j]) for u in range(2) for v in range(2)]
        expected += [(a[0], a[1], 1), (b[0], b[1], 1)]
    got = [(left[q], right[q], label[q]) for q in range(len(label))]
    assert len(got) == 6 * P
    key = lambda t: (tuple(t[0].tolist()), tuple(t[1].tolist()), int(t[2]))
    assert sorted(map(key, got)) == sorted(map(key, expected))
    assert len(siamese_pairs(h1, h2, same, same_image_pairs=False)[2]) == 4 * P


def test_prototype_ce_and_symmetric_ce_match_naive_loops():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (7,), generator=g)
    loss, ref = prototype_ce(logits, targets), _naive_ce(logits, targets)
    assert torch.allclose(loss, ref, atol=1e-6, rtol=0)
    assert torch.allclose(torch.autograd.grad(loss, logits)[0],
                          torch.autograd.grad(ref, logits)[0], atol=1e-6)
    for alpha, beta, log_zero in [(0.1, 1.0, math.log(1e-4)), (0.7, 0.3, -2.0)]:
        loss = symmetric_ce(logits, targets, alpha, beta, log_zero)
        ref = _naive_sce(logits, targets, alpha, beta, log_zero)
        assert torch.allclose(loss.double(), ref, atol=1e-6, rtol=0)
        assert torch.allclose(torch.autograd.grad(loss, logits)[0],
                              torch.autograd.grad(ref, logits)[0], atol=1e-6)


def test_symmetric_ce_reduces_to_ce_and_has_the_hand_computed_value():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 4, (6,), generator=g)
    assert torch.allclose(symmetric_ce(logits, targets, alpha=1, beta=0).double(),
                          prototype_ce(logits, targets), atol=1e-12)
    # logits (0, log 3) -> p = (1/4, 3/4); target 1: CE = log(4/3), RCE = -log(1e-4) * (1 - 3/4).
    hand = 0.1 * math.log(4 / 3) + 1.0 * (-math.log(1e-4)) * 0.25
    value = symmetric_ce(torch.tensor([[0.0, math.log(3)]], dtype=torch.float64), torch.tensor([1]))
    assert value.item() == pytest.approx(hand, abs=1e-9)


def _naive_masked_nt_xent(z1, z2, labels, t):
    # Eq. 1-2 with every view of another image of the same label left out of the denominator.
    z, lab = torch.cat([z1, z2]), torch.cat([labels, labels])
    n, B = z.shape[0], z1.shape[0]
    sim = lambda i, k: torch.dot(z[i], z[k]) / (z[i].norm() * z[k].norm())
    total = 0.0
    for i in range(n):
        pos = (i + B) % n
        kept = [k for k in range(n) if k != i and (k == pos or lab[k] != lab[i])]
        total = total - torch.log(torch.exp(sim(i, pos) / t)
                                  / sum(torch.exp(sim(i, k) / t) for k in kept))
    return total / n


def test_nt_xent_with_labels_matches_naive_loop_and_reduces_to_simclr():
    g = torch.Generator().manual_seed(3)
    z1 = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    loss = nt_xent(z1, z2, 0.3, labels=labels)
    ref = _naive_masked_nt_xent(z1, z2, labels, 0.3)
    assert torch.allclose(loss, ref, atol=1e-9, rtol=0)
    for a, b in zip(torch.autograd.grad(loss, (z1, z2)), torch.autograd.grad(ref, (z1, z2))):
        assert torch.allclose(a, b, atol=1e-9, rtol=0)
    assert not torch.allclose(loss, nt_xent(z1, z2, 0.3))      # the mask removed something
    assert torch.allclose(nt_xent(z1, z2, 0.3, labels=torch.arange(6)), nt_xent(z1, z2, 0.3),
                          atol=1e-12)


def test_spcl_loss_contrast_modes_match_naive_loops():
    z1, z2, h1, h2, same, protos, metric_head, proto_heads = _spcl_inputs(P=5)
    protos[:, 0] = torch.tensor([0, 1, 2, 0, 1, 0, 1, 3, 3, 4])  # repeats within and across sides
    P, t = 5, 0.4
    expected = {"joint": _naive_nt_xent(z1, z2, t),
                "per-side": (_naive_nt_xent(z1[:P], z2[:P], t)
                             + _naive_nt_xent(z1[P:], z2[P:], t)) / 2,
                "masked": _naive_masked_nt_xent(z1, z2, protos[:, 0], t)}
    for mode, value in expected.items():
        total, terms = spcl_loss(z1, z2, h1, h2, same=same, assignments=protos,
                                 metric_head=metric_head, proto_heads=proto_heads, w_metric=0,
                                 w_proto=0, temperature=t, contrast=mode)
        assert torch.allclose(total, value, atol=1e-5), mode
    assert len({round(float(v), 6) for v in expected.values()}) == 3      # three different losses


def _ddp_contrast_worker(rank, world_size, x1, x2, labels, state, mode, out_dir):
    model = nn.Linear(x1.shape[1], 3).double()
    model.load_state_dict(state)
    ddp = nn.parallel.DistributedDataParallel(model)
    P = x1.shape[0] // (2 * world_size)
    # This rank's batch: its P anchors, then their P partners (global layout: all anchors first).
    mine = torch.cat([torch.arange(rank * P, (rank + 1) * P),
                      world_size * P + torch.arange(rank * P, (rank + 1) * P)])
    z1, z2 = ddp(x1[mine]), ddp(x2[mine])
    loss, _ = spcl_loss(z1, z2, z1, z2, same=torch.zeros(P), assignments=labels[mine], w_metric=0,
                        w_proto=0, group=dist.group.WORLD,
                        temperature=0.3, contrast=mode)
    loss.backward()
    torch.save({"loss": loss.detach(), "grads": [p.grad for p in model.parameters()]},
               os.path.join(out_dir, f"{mode}_rank{rank}.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["per-side", "masked"])
def test_contrast_modes_world_size_2_equal_world_size_1(tmp_path, mode):
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(16, 5, generator=g, dtype=torch.float64)        # 8 anchors, then 8 partners
    x2 = x1 + 0.3 * torch.randn(16, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (16,), generator=g)
    model = nn.Linear(5, 3).double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    z1, z2 = model(x1), model(x2)
    loss, _ = spcl_loss(z1, z2, z1, z2, same=torch.zeros(8), assignments=labels, w_metric=0,
                        w_proto=0, temperature=0.3, contrast=mode)
    loss.backward()
    _spawn(_ddp_contrast_worker, 2, tmp_path, x1, x2, labels, state, mode, str(tmp_path))
    for rank in range(2):
        result = torch.load(tmp_path / f"{mode}_rank{rank}.pt", weights_only=True)
        assert torch.allclose(result["loss"], loss.detach(), atol=1e-9, rtol=0)
        for got, p in zip(result["grads"], model.parameters()):
            assert torch.allclose(got, p.grad, atol=1e-9, rtol=0)


def _spcl_inputs(P=4, F=6, D=3, heads=(5, 3)):
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(2 * P, D, generator=g), torch.randn(2 * P, D, generator=g)
    h1, h2 = torch.randn(2 * P, F, generator=g), torch.randn(2 * P, F, generator=g)
    same = torch.randint(0, 2, (P,), generator=g)
    protos = torch.stack([torch.randint(0, k, (2 * P,), generator=g) for k in heads], dim=1)
    return z1, z2, h1, h2, same, protos, nn.Linear(F, 1), [nn.Linear(F, k) for k in heads]


def _spcl_call(**overrides):
    z1, z2, h1, h2, same, protos, metric_head, proto_heads = _spcl_inputs()
    kwargs = dict(same=same, assignments=protos, metric_head=metric_head, proto_heads=proto_heads)
    return spcl_loss(z1, z2, h1, h2, **{**kwargs, **overrides})


def test_spcl_loss_is_the_weighted_sum_of_the_terms():
    z1, z2, h1, h2, same, protos, metric_head, proto_heads = _spcl_inputs()
    total, terms = spcl_loss(z1, z2, h1, h2, same=same, assignments=protos, metric_head=metric_head,
                             proto_heads=proto_heads, w_con=0.5, w_metric=0.1, w_proto=2.0,
                             temperature=0.2, proto_loss="sce")
    con = nt_xent(z1, z2, 0.2)
    metric = siamese_metric_loss(metric_head, *siamese_pairs(h1, h2, same))
    h = torch.cat([h1, h2])
    proto = (symmetric_ce(proto_heads[0](h), protos[:, 0].repeat(2))
             + symmetric_ce(proto_heads[1](h), protos[:, 1].repeat(2))) / 2
    assert torch.allclose(total, 0.5 * con + 0.1 * metric + 2.0 * proto, atol=1e-6)
    assert set(terms) == {"con", "metric", "proto"}
    assert all(not v.requires_grad for v in terms.values())
    assert torch.allclose(terms["proto"], proto, atol=1e-6)


class _MustNotRun(nn.Module):
    def forward(self, x):
        raise AssertionError("a head whose loss weight is 0 was evaluated")


def test_spcl_loss_skips_zero_weight_terms():
    z1, z2, h1, h2, same, protos, _, _ = _spcl_inputs()
    total, terms = spcl_loss(z1, z2, h1, h2, same=same, assignments=protos,
                             metric_head=_MustNotRun(), proto_heads=[_MustNotRun()],
                             w_metric=0, w_proto=0)
    assert set(terms) == {"con"}
    assert torch.allclose(total, nt_xent(z1, z2))


@pytest.mark.parametrize("call,message", [
    (lambda: nt_xent(torch.randn(4, 3), torch.randn(4, 2)), "must both be"),
    (lambda: nt_xent(torch.randn(1, 3), torch.randn(1, 3)), "at least 2"),
    (lambda: nt_xent(torch.randn(4, 3), torch.randn(4, 3), temperature=0), "temperature"),
    (lambda: siamese_metric_loss(nn.Linear(3, 1), torch.randn(4, 3), torch.randn(5, 3),
                                 torch.ones(4)), "must both be"),
    (lambda: siamese_metric_loss(nn.Linear(3, 1), torch.randn(4, 3), torch.randn(4, 3),
                                 torch.ones(3)), "same must be"),
    (lambda: prototype_ce(torch.randn(4, 3), torch.tensor([0, 1, 2])), "targets must be"),
    (lambda: prototype_ce(torch.randn(0, 3), torch.zeros(0, dtype=torch.long)), "at least 1"),
    (lambda: symmetric_ce(torch.randn(2, 3), torch.tensor([0.0, 1.0])), "integer"),
    (lambda: _spcl_call(proto_heads=[nn.Linear(6, 5)]), r"assignments must be \[2P, H\]"),
    (lambda: _spcl_call(proto_loss="focal"), "proto_loss"),
    (lambda: _spcl_call(contrast="sideways"), "contrast must be one of"),
    (lambda: _spcl_call(metric_head=None), "w_metric > 0 needs a metric_head"),
])
def test_bad_input_raises_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------------------------------
# lars.py
# ---------------------------------------------------------------------------------------------

def test_lars_biases_and_all_norm_parameters_get_plain_momentum_updates():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    norm_params = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) for n in
                   (f"{n}.weight", f"{n}.bias")}
    assert "layer2.0.downsample.1.weight" in norm_params      # the one name matching misses
    lr, momentum, wd = 0.3, 0.9, 0.1
    opt = LARS(model.parameters(), lr=lr, weight_decay=wd, momentum=momentum, eta=0.001)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(2)]
    for step_grads in grads:
        for n, p in model.named_parameters():
            p.grad = step_grads[n].clone()
        opt.step()
    for n, p in model.named_parameters():
        if p.ndim <= 1:
            assert n in norm_params or n == "fc.bias"
            # mu1 = g1, mu2 = m*g1 + g2; no weight decay, no trust ratio.
            expected = start[n] - lr * grads[0][n] - lr * (momentum * grads[0][n] + grads[1][n])
            assert torch.allclose(p, expected, atol=1e-6), n


def test_lars_zero_initialised_bias_still_moves():
    layer = nn.Linear(4, 2)
    nn.init.zeros_(layer.bias)
    layer.bias.grad, layer.weight.grad = torch.tensor([1.0, -2.0]), torch.ones(2, 4)
    LARS(layer.parameters(), lr=0.1).step()
    assert torch.allclose(layer.bias, torch.tensor([-0.1, 0.2]))


def test_lars_weight_gets_the_hand_computed_trust_ratio_update():
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))       # |p| = 5
    layer.weight.grad = torch.tensor([[0.5, 0.0], [0.0, 0.0]])
    lr, wd, eta = 2.0, 0.1, 0.01
    # g + wd*p = [[0.8, 0], [0, 0.4]], |g| = sqrt(0.8) ; trust = 0.01 * 5 / sqrt(0.8)
    g = torch.tensor([[0.8, 0.0], [0.0, 0.4]])
    trust = eta * 5 / math.sqrt(0.8)
    expected = torch.tensor([[3.0, 0.0], [0.0, 4.0]]) - lr * trust * g
    LARS(layer.parameters(), lr=lr, weight_decay=wd, eta=eta).step()
    assert torch.allclose(layer.weight, expected, atol=1e-6)


def test_lars_zero_weight_norm_gives_trust_one():
    layer = nn.Linear(2, 2, bias=False)
    nn.init.zeros_(layer.weight)
    layer.weight.grad = torch.ones(2, 2)
    LARS(layer.parameters(), lr=0.5, weight_decay=0.1).step()
    assert torch.allclose(layer.weight, torch.full((2, 2), -0.5))


def test_a_fresh_prototype_head_learns_within_one_epoch_on_its_own_sgd():
    # K = 512 separable clusters of features whose norm (~11) is that of the CPU encoder's; 97
    # steps = one CIFAR-10 epoch at batch 512, 1024 views a step. The head starts at N(0, 0.01).
    g = torch.Generator().manual_seed(0)
    K, F_, N = 512, 128, 4096
    y = torch.randint(0, K, (N,), generator=g)
    x = torch.randn(K, F_, generator=g)[y] + 0.5 * torch.randn(N, F_, generator=g)
    args = train.get_args(["--batch-size", "512"])
    losses = {}
    for name in ("own sgd", "inside lars"):
        model = SPCLModel("resnet18_narrow", True, num_prototypes=[K])
        model.proto_heads[0] = nn.Linear(F_, K)
        model.reset_proto_heads(torch.Generator().manual_seed(1))
        head = model.proto_heads[0]
        opt = (train.head_optimizer(model, args) if name == "own sgd"
               else LARS(head.parameters(), lr=2.0))
        for _ in range(97):
            idx = torch.randint(0, N, (1024,), generator=g)
            loss = nn.functional.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            losses[name] = nn.functional.cross_entropy(head(x), y).item()
    assert losses["own sgd"] < 0.5 and losses["inside lars"] > 3.0, losses      # ln 512 = 6.24


def test_lars_rejects_negative_hyper_parameters():
    with pytest.raises(ValueError, match="lr"):
        LARS(nn.Linear(2, 2).parameters(), lr=-1)


# ---------------------------------------------------------------------------------------------
# cluster.py, sampler.py and data.Views
# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------- NMI

def _nmi_naive(a, b):
    """NMI from the definition with python loops: I(a; b) / ((H(a) + H(b)) / 2)."""
    n = len(a)
    count_a, count_b, count_ab = Counter(a), Counter(b), Counter(zip(a, b))
    h_a = -sum(c / n * math.log(c / n) for c in count_a.values())
    h_b = -sum(c / n * math.log(c / n) for c in count_b.values())
    mutual = sum(
        c / n * math.log((c / n) / (count_a[x] / n * count_b[y] / n))
        for (x, y), c in count_ab.items()
    )
    if h_a == 0 and h_b == 0:
        return 1.0
    return mutual / ((h_a + h_b) / 2)


def test_nmi_known_answers():
    assert nmi([0, 0, 1, 1], [5, 5, 2, 2]) == pytest.approx(1.0)  # same partition, other names
    assert nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0)  # independent
    assert nmi([3, 3, 3], [1, 1, 1]) == 1.0  # neither splits the dataset
    # a = {0,1,2 | 3,4,5}, b = {0,1 | 2,3 | 4,5}: I = log 2 - (2/3) log(3/2) ... by hand:
    # H(a) = log 2, H(b) = log 3, I = H(a) - H(a|b) = log 2 - (1/3) log 2 = (2/3) log 2.
    expected = (2 / 3) * math.log(2) / ((math.log(2) + math.log(3)) / 2)
    assert nmi([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(expected)


def test_nmi_matches_its_definition():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 7, 500)
    b = np.where(rng.random(500) < 0.6, a * 3 + 1, rng.integers(-5, 40, 500))  # arbitrary ids
    assert nmi(a, b) == pytest.approx(_nmi_naive(a.tolist(), b.tolist()), abs=1e-12)
    singletons = np.arange(500)
    assert nmi(a, singletons) == pytest.approx(_nmi_naive(a.tolist(), singletons.tolist()),
                                               abs=1e-12)


def test_nmi_errors():
    with pytest.raises(ValueError, match="equal length"):
        nmi([0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="non-empty"):
        nmi([], [])


def test_same_class_pairs_against_every_pair_and_the_sampler():
    """The precision of Eq. 3's positives: from every unordered pair of each prototype, weighted
    by its size; and as the share of the sampler's same-prototype pairs that share a class."""
    assert same_class_pairs([0, 0, 1, 1], [3, 3, 4, 4]) == 1.0          # the classes themselves
    assert same_class_pairs([0, 0, 1, 1], [0, 1, 0, 1]) == 0.0
    assert np.isnan(same_class_pairs([0, 1, 2], [0, 0, 0]))             # singletons: no pair
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 3000)
    assignments = np.where(rng.random(3000) < 0.5, labels * 7 + 2,      # half follow the class
                           rng.integers(0, 40, 3000))
    assignments[:3] = [1000, 1001, 1002]                                # three singletons
    weight, total = 0.0, 0.0
    for k in set(assignments.tolist()):
        members = labels[assignments == k].tolist()
        pairs = list(itertools.combinations(members, 2))
        if pairs:
            weight += len(members) * sum(a == b for a, b in pairs) / len(pairs)
            total += len(members)
    assert same_class_pairs(assignments, labels) == pytest.approx(weight / total, abs=1e-12)
    sampler = PrototypePairSampler(torch.from_numpy(assignments), 200)
    hits, count = 0, 0
    for epoch in range(20):
        sampler.set_epoch(epoch)
        for batch in sampler:
            for anchor, partner, same in batch:
                if same:
                    hits += int(labels[anchor] == labels[partner])
                    count += 1
    assert count > 10000
    assert hits / count == pytest.approx(weight / total, abs=0.015)     # 4 standard errors


# ---------------------------------------------------------------- k-means

def _blobs(n, num_blobs, dim, seed, spread=10.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_blobs, dim)) * spread
    labels = rng.integers(0, num_blobs, n)
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def test_kmeans_recovers_blobs():
    x, labels = _blobs(2000, 5, 16, seed=0)
    # Random initial centroids can stop in a local minimum; as faiss's nredo does, keep the
    # run with the lowest objective (the choice does not look at the labels).
    runs = [run_kmeans(x, 5, seed=seed, device="cpu") for seed in range(3)]
    assignments, centroids, stats = min(runs, key=lambda run: run[2]["objective"])
    assert assignments.dtype == np.int64 and assignments.shape == (2000,)
    assert centroids.dtype == np.float32 and centroids.shape == (5, 16)
    assert stats["pca_dim"] == 16  # 256 clamped to D
    assert nmi(labels, assignments) >= 0.99
    assert _nmi_naive(labels.tolist(), assignments.tolist()) >= 0.99


def test_kmeans_trains_on_all_points_and_stats():
    # 3000 points, 4 centroids: faiss's default would train on 256 * 4 = 1024 of them.
    x, _ = _blobs(3000, 4, 8, seed=1)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # so that pca_dim=0 leaves x as it is
    assignments, centroids, stats = run_kmeans(torch.from_numpy(x), 4, pca_dim=0, device="cpu")
    for c in range(4):
        members = x[assignments == c].astype(np.float64)
        np.testing.assert_allclose(centroids[c], members.mean(0),
                                   atol=1e-5)  # the fixed point of Lloyd
    sizes = sorted(Counter(assignments.tolist()).get(c, 0) for c in range(4))
    assert (stats["size_min"], stats["size_max"]) == (sizes[0], sizes[-1])
    assert stats["size_median"] == (sizes[1] + sizes[2]) / 2
    assert stats["empty_clusters"] == sizes.count(0)
    objective = sum(float(((x[i] - centroids[assignments[i]]) ** 2).sum()) for i in range(len(x)))
    assert stats["objective"] == pytest.approx(objective, rel=1e-4)
    assert stats["pca_dim"] == 0 and stats["seconds"] > 0
    for i in range(0, 3000, 97):  # every point sits at its nearest centroid
        assert assignments[i] == np.argmin(((centroids - x[i]) ** 2).sum(1))


def test_kmeans_whitening_and_inputs():
    x, _ = _blobs(10, 2, 64, seed=2)  # N < D: only N - 1 directions exist
    assignments, centroids, stats = run_kmeans(x, 3, device="cpu")
    assert stats["pca_dim"] == 9 and centroids.shape == (3, 9) and np.isfinite(centroids).all()
    x, _ = _blobs(500, 3, 32, seed=3)
    half = torch.from_numpy(x).half()
    from_half = run_kmeans(half, 3, pca_dim=8, device="cpu")
    from_array = run_kmeans(half.float().numpy(), 3, pca_dim=8, device="cpu")
    np.testing.assert_array_equal(from_half[0], from_array[0])
    assert from_half[2]["pca_dim"] == 8


def test_kmeans_without_pca_leaves_the_callers_array_alone():
    x, _ = _blobs(200, 3, 8, seed=5)
    x = np.ascontiguousarray(x, dtype=np.float32)
    before = x.copy()
    run_kmeans(x, 3, pca_dim=0, device="cpu")
    np.testing.assert_array_equal(x, before)


def test_cluster_means_match_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(50, 6, generator=g).half()
    assignments = torch.randint(0, 4, (50,), generator=g)
    assignments[assignments == 2] = 1                   # cluster 2 left empty
    got = cluster_means(features, assignments, 5, chunk=7)
    for c in range(5):
        members = [features[n].float() for n in range(50) if assignments[n] == c]
        if not members:
            assert torch.equal(got[c], torch.zeros(6))
            continue
        mean = sum(members) / len(members)
        assert torch.allclose(got[c], mean / mean.norm(), atol=1e-6)


def _centroid_heads_case():
    g = torch.Generator().manual_seed(1)
    features = torch.rand(40, 5, generator=g)
    assignments = torch.stack([torch.arange(40) % 3, torch.arange(40) % 4], 1)
    return features, assignments


def _check_centroid_heads(heads, features, assignments):
    norm = features.norm(dim=1).mean()
    for j, k in enumerate([3, 4]):
        assert heads[j].shape == (k, 5)
        for c in range(k):
            mean = features[assignments[:, j] == c].mean(0)
            assert torch.allclose(heads[j][c], mean / mean.norm() / (0.1 * norm), atol=1e-5)


def test_centroid_heads_are_scaled_normalised_cluster_means():
    features, assignments = _centroid_heads_case()
    order = torch.randperm(40, generator=torch.Generator().manual_seed(2))  # a shard's own order
    shard = Shard(features[order], order, torch.zeros(40, dtype=torch.int64))
    heads = cluster.centroid_heads(shard, assignments, [3, 4], world=1, device="cpu")
    _check_centroid_heads(heads, features, assignments)


def test_kmeans_several_k_share_the_preprocessing():
    # One PCA for every K gives what separate runs give; single-process distributed_kmeans too.
    x, _ = _blobs(600, 6, 24, seed=4)
    together = run_kmeans_multi(x, [6, 2, 12], seed=3, pca_dim=10, device="cpu")
    assignments, stats = distributed_kmeans(torch.from_numpy(x).half(), [6, 2, 12], 600, seed=3,
                                            pca_dim=10)
    assert assignments.shape == (600, 3) and len(stats) == 3
    half = run_kmeans_multi(torch.from_numpy(x).half(), [6, 2, 12], seed=3, pca_dim=10,
                            device="cpu")
    for i, k in enumerate((6, 2, 12)):
        alone = run_kmeans(x, k, seed=3, pca_dim=10, device="cpu")
        np.testing.assert_array_equal(together[i][0], alone[0])
        np.testing.assert_array_equal(together[i][1], alone[1])
        assert together[i][2]["objective"] == pytest.approx(alone[2]["objective"])
        assert together[i][1].shape == (k, 10) and together[i][2]["preprocess_seconds"] > 0
        np.testing.assert_array_equal(assignments[:, i].numpy(), half[i][0])
    with pytest.raises(ValueError, match="k=700 for N=600"):
        run_kmeans_multi(x, [6, 700], device="cpu")
    with pytest.raises(ValueError, match="k=700 for N=600"):
        distributed_kmeans(x, [700], 600)
    with pytest.raises(ValueError, match="599 features for num_samples=600"):
        distributed_kmeans(x[:599], 6, 600)


@pytest.mark.parametrize(
    "features, k, match",
    [
        (np.zeros((5, 4), np.float32) + np.arange(5.0)[:, None], 6, "k <= N"),
        (np.random.default_rng(0).normal(size=(5, 4)), 1, "2 <= k"),
        (np.full((5, 4), np.nan), 2, "NaN"),
        (np.array([[0.0, np.inf]] * 5), 2, "NaN or infinite"),
        (np.zeros((0, 4)), 2, "non-empty"),
        (np.zeros(5), 2, r"\[N, D\]"),
        (np.ones((5, 4)), 2, "identical"),
    ],
)
def test_kmeans_errors(features, k, match):
    with pytest.raises(ValueError, match=match):
        run_kmeans(features, k, device="cpu")


def test_torch_kmeans_agrees_with_faiss_on_planted_clusters():
    # The same contract as faiss's (whitened, normalised rows; seeded Lloyd from random points):
    # on planted clusters the two partitions agree and reach the same objective.
    x, labels = _blobs(5000, 10, 32, seed=4, spread=2.0)
    for seed in (0, 1, 2):
        a_faiss, _, s_faiss = run_kmeans(x, 10, seed=seed, pca_dim=16, backend="faiss",
                                         device="cpu")
        a_torch, c_torch, s_torch = run_kmeans(x, 10, seed=seed, pca_dim=16, backend="torch",
                                               device="cpu")
        assert nmi(a_torch, a_faiss) >= 0.99 and nmi(a_torch, labels) >= 0.99
        assert abs(s_torch["objective"] - s_faiss["objective"]) <= 0.01 * s_faiss["objective"]
        assert s_torch["backend"] == "torch-cpu" and s_faiss["backend"] == "faiss-cpu"
        # The objective is the squared distance of every whitened row to its centroid.
        rows = cluster.whiten(torch.from_numpy(x), *cluster.pca_whitening(torch.from_numpy(x), 16))
        naive = ((rows - torch.from_numpy(c_torch)[a_torch]) ** 2).sum().item()
        assert s_torch["objective"] == pytest.approx(naive, rel=1e-4)


def test_torch_kmeans_in_chunks_equals_one_block_and_reseeds_empty_clusters():
    # 120 rows, 40 copies each of three points: most seeds start two centroids on one point, which
    # leaves a cluster empty after the first assignment; faiss's rule splits a cluster for it, so
    # every run still ends with the three points apart (objective 0).
    points = torch.tensor([[3.0, 1.0], [1.0, 4.0], [-1.0, 0.5]])
    x = points.repeat_interleave(40, 0)
    started_empty = 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        starts = torch.randperm(120, generator=g)[:3].div(40, rounding_mode="floor")
        started_empty += len(set(starts.tolist())) < 3
        assignments, centroids, distances = cluster.torch_kmeans(x, 3, seed=seed)
        assert torch.bincount(assignments, minlength=3).tolist() == [40, 40, 40], seed
        assert float(distances.sum()) < 1e-9
    assert started_empty >= 10
    y, _ = _blobs(500, 7, 5, seed=2)
    y = torch.from_numpy(y)
    whole = cluster.torch_kmeans(y, 7, seed=3)
    chunked = cluster.torch_kmeans(y, 7, seed=3, chunk_bytes=7 * 8 * 13)       # 13 rows a chunk
    assert torch.equal(whole[0], chunked[0])
    torch.testing.assert_close(whole[1], chunked[1])


def test_kmeans_on_a_gpu_asks_for_that_one_gpu_only(monkeypatch):
    # faiss.Kmeans(gpu=1) means every GPU of the node to faiss (1 == True): rank 0 of an 8-GPU
    # node would put replicas on all eight. Recorders stand in for faiss's GPU entry points.
    asked = []

    class Config:
        device = None

    def gpu_index(resources, d, config):
        asked.append(("index", config.device))
        return faiss.IndexFlatL2(d)

    forbidden = lambda *a, **k: pytest.fail("an all-GPU entry point was called")
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 8)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: asked.append("resources"),
                        raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatConfig", Config, raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatL2", gpu_index, raising=False)
    monkeypatch.setattr(faiss, "Kmeans", forbidden)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", forbidden, raising=False)
    x, _ = _blobs(300, 3, 8, seed=6)
    stats = run_kmeans_multi(x, [3, 4], device=torch.device("cuda", 5))
    assert asked == ["resources", ("index", 5)] * 2
    assert [s["backend"] for s in stats[0][2:] + stats[1][2:]] == ["faiss-cuda"] * 2
    # Which k-means runs where: faiss on its GPU when faiss-gpu sees one; torch's on a GPU it does
    # not see; faiss on the CPU's cores otherwise; a choice of backend is kept.
    cuda = torch.device("cuda", 1)
    assert cluster.kmeans_backend(None, cuda) == ("faiss", cuda)
    assert cluster.kmeans_backend("torch", cuda) == ("torch", cuda)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert cluster.kmeans_backend(None, cuda) == ("torch", cuda)
    assert cluster.kmeans_backend("faiss", cuda) == ("faiss", torch.device("cpu"))
    assert cluster.kmeans_backend(None, "cpu") == ("faiss", torch.device("cpu"))
    assert cluster.kmeans_backend("torch", "cpu") == ("torch", torch.device("cpu"))
    # Without faiss at all (it failed to install): torch's k-means, on the CPU too.
    monkeypatch.setattr(cluster, "faiss", None)
    assert cluster.kmeans_backend(None, "cpu") == ("torch", torch.device("cpu"))
    with pytest.raises(ValueError, match="faiss is not installed"):
        cluster.kmeans_backend("faiss", "cpu")
    assert run_kmeans(x, 3, seed=0, device="cpu")[2]["backend"] == "torch-cpu"


def test_kmeans_runs_faiss_on_every_core_and_gives_the_threads_back(monkeypatch):
    # torchrun leaves each rank OMP_NUM_THREADS=1; rank 0's k-means may take the node's cores.
    cores = len(os.sched_getaffinity(0))
    if cores < 2:
        pytest.skip("one core: nothing to tell apart")
    seen = []

    class Recording(faiss.Clustering):
        def train(self, x, *args, **kwargs):
            seen.append(faiss.omp_get_max_threads())
            if len(seen) == 2:
                raise RuntimeError("faiss failed")
            return super().train(x, *args, **kwargs)

    monkeypatch.setattr(faiss, "Clustering", Recording)
    x, _ = _blobs(300, 3, 8, seed=6)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        stats = run_kmeans(x, 3, device="cpu")[2]
        assert seen == [cores] and stats["threads"] == cores
        assert faiss.omp_get_max_threads() == 1
        with pytest.raises(RuntimeError, match="faiss failed"):
            run_kmeans(x, 3, device="cpu")
        assert seen == [cores, cores] and faiss.omp_get_max_threads() == 1
    finally:
        faiss.omp_set_num_threads(threads)


# ---------------------------------------------------------------- PCA-whitening, over ranks

def _pca_case():
    """Float16 features [300, 13] of distinct variances along random directions, and a dead unit
    (a constant column) whose zero variance the floor must catch."""
    rng = np.random.default_rng(7)
    rotation = np.linalg.qr(rng.normal(size=(12, 12)))[0]
    x = rng.normal(size=(300, 12)) * np.linspace(0.5, 6.0, 12) @ rotation + 3.0
    x = np.concatenate([np.maximum(x, 0), np.full((300, 1), 2.0)], 1)
    return torch.from_numpy(x).half()


def _naive_whitening(x, dim):
    """Mean, covariance and eigen-whitening of the rows of x in float64 numpy: each top-dim
    eigenvector divided by sqrt(its eigenvalue + 1e-4 x the top eigenvalue)."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(0)
    covariance = sum(np.outer(row - mean, row - mean) for row in x) / len(x)
    values, vectors = np.linalg.eigh(covariance)
    values, vectors = values[::-1][:dim], vectors[:, ::-1][:, :dim]
    return mean, vectors / np.sqrt(values + 1e-4 * values[0])


def _check_whitening(mean, projection, x, dim):
    expected_mean, expected = _naive_whitening(x, dim)
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-6)
    assert projection.shape == (13, dim) and projection.dtype == torch.float32
    got = projection.double().numpy()
    signs = np.sign((got * expected).sum(0))           # an eigenvector's sign is arbitrary
    np.testing.assert_allclose(got * signs, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_pca_whitening_matches_naive_float64():
    x = _pca_case()
    for dim in (4, 13, 50):                             # 50: clamped to F = 13
        mean, projection = pca_whitening(x, dim)
        _check_whitening(mean, projection, x, min(dim, 13))
    # Whitened, the directions are uncorrelated, the 12 live ones of variance lambda / (lambda +
    # 1e-4 lambda_top), near 1; the dead unit stays near 0 instead of blowing up.
    rows = (x.double() - mean.double()) @ projection.double()
    covariance = rows.T @ rows / len(rows)
    variances = covariance.diagonal()
    assert torch.allclose(covariance - torch.diag(variances), torch.zeros(13, 13).double(),
                          atol=1e-5)
    assert (variances[:12] > 0.95).all() and (variances[:12] <= 1).all() and variances[12] < 1e-9
    # L2-normalised rows, any output dtype; no projection: normalisation alone.
    unit = whiten(x, mean, projection, dtype=torch.float16)
    assert unit.dtype == torch.float16
    assert torch.allclose(unit.float(), torch.nn.functional.normalize(rows.float(), dim=1),
                          atol=1e-3)
    assert torch.equal(whiten(x, None, None), torch.nn.functional.normalize(x.float(), dim=1))
    assert pca_whitening(x[:5], 256)[1].shape == (13, 4)       # N - 1 = 4 directions exist


def test_torch_whitening_partitions_as_faiss_pca_matrix():
    # run_kmeans used faiss.PCAMatrix (float32, x x^T - N mean mean^T); the float64 two-pass
    # whitening gives the same rows up to each column's sign and the same k-means partition.
    x, labels = _blobs(1500, 5, 20, seed=8, spread=3.0)
    x = np.maximum(x, 0)
    pca = faiss.PCAMatrix(20, 8, -0.5)
    pca.train(x)
    pca.epsilon = 1e-4 * float(faiss.vector_to_array(pca.eigenvalues).max())
    pca.prepare_Ab()
    expected = pca.apply(x)
    faiss.normalize_L2(expected)
    got = whiten(x, *pca_whitening(x, 8)).numpy()
    signs = np.sign((got * expected).sum(0))
    np.testing.assert_allclose(got * signs, expected, atol=2e-3)
    ours = run_kmeans(x, 5, seed=1, pca_dim=8, device="cpu")[0]
    kmeans = faiss.Kmeans(8, 5, niter=20, seed=1, max_points_per_centroid=301,
                          min_points_per_centroid=1)
    kmeans.train(expected)
    theirs = kmeans.index.search(expected, 1)[1][:, 0]
    assert nmi(ours, theirs) == 1.0 and nmi(ours, labels) > 0.9


def _sharded_clustering_worker(rank, world_size, out_dir):
    result = {}
    x = _pca_case()
    part = slice(0, 170) if rank == 0 else slice(170, 300)        # uneven shares
    result["pca"] = pca_whitening(x[part], 6, group=dist.group.WORLD)
    for name, rows in [("nan", x[part].clone().fill_(float("nan")) if rank else x[part]),
                       ("identical", torch.ones(10, 13))]:
        try:
            pca_whitening(rows, 6, group=dist.group.WORLD)
        except ValueError as error:
            result[name] = str(error)

    blobs, _ = _blobs(500, 5, 24, seed=9)
    mine = torch.arange(rank, 500, 2).flip(0)                     # strided, in its own order
    result["kmeans"] = distributed_kmeans(torch.from_numpy(blobs[mine.numpy()]).half(), [5, 2],
                                          500, indices=mine, seed=2, pca_dim=8)
    for name, kwargs in [("k", dict(ks=600, num_samples=500)),
                         ("repeats", dict(ks=5, num_samples=500, indices=mine % 250)),
                         ("rows", dict(ks=5, num_samples=502))]:
        kwargs.setdefault("indices", mine)
        try:
            distributed_kmeans(torch.from_numpy(blobs[mine.numpy()]), **kwargs)
        except ValueError as error:
            result[f"{name}_error"] = str(error)

    features, assignments = _centroid_heads_case()
    mine = torch.arange(rank, 40, 2).flip(0)
    shard = Shard(features[mine].half().float(), mine, torch.zeros(len(mine), dtype=torch.int64))
    result["heads"] = cluster.centroid_heads(shard, assignments, [3, 4], world=2, device="cpu")
    torch.save(result, f"{out_dir}/rank{rank}.pt")


@pytest.fixture(scope="module")
def sharded_clustering(tmp_path_factory):
    """What both ranks of one gloo world of 2 got from the sharded clustering functions."""
    out = tmp_path_factory.mktemp("sharded")
    _spawn(_sharded_clustering_worker, 2, out, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow
def test_pca_whitening_over_two_ranks_matches_naive_float64(sharded_clustering):
    rank0, rank1 = sharded_clustering
    _check_whitening(*rank0["pca"], _pca_case(), 6)
    assert all(torch.equal(a, b) for a, b in zip(rank0["pca"], rank1["pca"]))   # bit-identical
    for result in sharded_clustering:                 # rank 1's NaN stops rank 0 as well
        assert result["nan"] == "features contain NaN or infinite values"
        assert "features are all identical" in result["identical"]


@pytest.mark.slow
def test_sharded_kmeans_over_two_ranks_partitions_as_one_process(sharded_clustering):
    blobs, _ = _blobs(500, 5, 24, seed=9)
    expected = run_kmeans_multi(torch.from_numpy(blobs).half(), [5, 2], seed=2, pca_dim=8,
                                device="cpu")
    (assignments, stats), (other, _) = (r["kmeans"] for r in sharded_clustering)
    assert torch.equal(assignments, other) and assignments.shape == (500, 2)
    # float16 rows travel to rank 0, float32 rows in one process: the partition must agree.
    assert nmi(assignments[:, 0], expected[0][0]) >= 0.99
    assert nmi(assignments[:, 1], expected[1][0]) >= 0.99
    assert stats[0]["pca_dim"] == 8 and stats[0]["objective"] == pytest.approx(
        expected[0][2]["objective"], rel=1e-2)
    for result in sharded_clustering:                 # every rank raises, none is left waiting
        assert "k=600 for N=500" in result["k_error"]
        assert "on no rank and others on several" in result["repeats_error"]
        assert "got 500 features for num_samples=502" in result["rows_error"]


@pytest.mark.slow
def test_centroid_heads_over_two_ranks_are_the_naive_cluster_means(sharded_clustering):
    features, assignments = _centroid_heads_case()
    _check_centroid_heads(sharded_clustering[0]["heads"], features.half().float(), assignments)
    assert all(torch.equal(a, b) for a, b in zip(*(r["heads"] for r in sharded_clustering)))


# ---------------------------------------------------------------- feature extraction

class _IndexedImages(torch.utils.data.Dataset):
    """(image, target, index), images [3, 2, 2] from a fixed generator."""

    def __init__(self, n):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 2, 2, generator=generator)
        self.targets = torch.randint(0, 5, (n,), generator=generator)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], int(self.targets[index]), index


class _RowEncoder(nn.Module):
    """[B, 3, 2, 2] -> [B, 12], row by row, so the result cannot depend on batching."""

    def forward(self, images):
        return torch.tanh(images.flatten(1)) * 3


def test_extract_features_single_process():
    dataset = _IndexedImages(23)
    reference = _RowEncoder()(dataset.images)  # one sequential pass
    loader = DataLoader(dataset, batch_size=5, shuffle=True)
    features, targets = extract_features(_RowEncoder(), loader, len(dataset), "cpu",
                                         storage_dtype=torch.float32)
    assert torch.equal(features, reference) and torch.equal(targets, dataset.targets)
    features, _ = extract_features(_RowEncoder(), loader, len(dataset), "cpu")
    assert features.dtype == torch.float16 and torch.equal(features, reference.half())
    missing = DataLoader(dataset, batch_size=5, sampler=[i for i in range(23) if i != 7])
    with pytest.raises(RuntimeError, match="1 of 23"):
        extract_features(_RowEncoder(), missing, len(dataset), "cpu")
    images, targets, _ = next(iter(loader))
    with pytest.raises(ValueError, match=r"\[0, 23\)"):
        extract_features(_RowEncoder(), [(images, targets, torch.arange(5) + 20)], len(dataset),
                         "cpu")


def _distributed_features_worker(rank, world_size, out_dir):
    dataset = _IndexedImages(37)  # 37 = 2 * 18 + 1: DistributedSampler pads with a duplicate
    sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=1)
    loader = DataLoader(dataset, batch_size=4, sampler=sampler)  # last batches hold 3 images
    result = {}
    result["fp32"] = extract_features(_RowEncoder(), loader, 37, "cpu", storage_dtype=torch.float32)
    result["fp16"] = extract_features(_RowEncoder(), loader, 37, "cpu")
    # 19 and 18 indices: the same number of batches, but last batches of 3 and 2 images.
    ragged = DataLoader(dataset, batch_size=4,
                        sampler=range(36, -1, -2) if rank == 0 else range(1, 37, 2))
    result["ragged"] = extract_features(_RowEncoder(), ragged, 37, "cpu",
                                        storage_dtype=torch.float32)
    result["shard"] = shard_features(_RowEncoder(), loader, 37, "cpu", storage_dtype=torch.float32)
    # One rank's bad index stops both ranks (the other would otherwise wait in a collective).
    batches = list(DataLoader(dataset, batch_size=4, sampler=range(rank, 36, 2)))
    if rank == 1:
        images, targets, indices = batches[2]
        batches[2] = (images, targets, indices + 40)
    try:
        extract_features(_RowEncoder(), batches, 37, "cpu")
    except ValueError as error:
        result["index_error"] = str(error)
    # Shares of any size: no collective per batch.
    uneven = DataLoader(dataset, batch_size=4, sampler=range(25) if rank == 0 else range(25, 37))
    result["uneven"] = extract_features(_RowEncoder(), uneven, 37, "cpu",
                                        storage_dtype=torch.float32)
    torch.save(result, f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_extract_features_two_processes(tmp_path):
    _spawn(_distributed_features_worker, 2, tmp_path, str(tmp_path))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    dataset = _IndexedImages(37)
    reference = _RowEncoder()(dataset.images)  # one sequential pass, in index order
    features, targets = rank0["fp32"]
    assert torch.equal(features, reference) and torch.equal(targets, dataset.targets)
    assert torch.equal(rank0["fp16"][0], reference.half())
    assert (torch.equal(rank0["ragged"][0], reference)
            and torch.equal(rank0["ragged"][1], dataset.targets))
    assert torch.equal(rank0["uneven"][0], reference)
    assert rank1["fp32"] == rank1["fp16"] == rank1["ragged"] == rank1["uneven"] == (None, None)
    # The shards: DistributedSampler's padding repeat kept by one rank only, each row its image's.
    shards = [rank0["shard"], rank1["shard"]]
    indices = torch.cat([shard.indices for shard in shards])
    assert sorted(indices.tolist()) == list(range(37))
    for shard in shards:
        assert torch.equal(shard.features, reference[shard.indices])
        assert torch.equal(shard.targets, dataset.targets[shard.indices])
    for result in (rank0, rank1):
        assert "must lie in [0, 37)" in result["index_error"]


# ---------------------------------------------------------------- pair sampler

def _epoch(assignments, batch_size, num_replicas, drop_last=True, p_same=0.5, seed=0, epoch=0):
    """All ranks' batches of one epoch, checked against the contract; returns the global pairs."""
    labels = np.asarray(assignments).tolist()
    n = len(labels)
    per_rank = []
    for rank in range(num_replicas):
        sampler = PrototypePairSampler(assignments, batch_size, num_replicas, rank, seed, p_same,
                                       drop_last)
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        per_rank.append(batches)

    pairs = []
    for step in range(len(per_rank[0])):
        slices = [batches[step] for batches in per_rank]
        assert len({len(s) for s in slices}) == 1  # equal batches on every rank
        if step < len(per_rank[0]) - 1 or drop_last:
            assert len(slices[0]) == batch_size // 2 // num_replicas
        for triple in (t for s in slices for t in s):
            assert len(triple) == 3 and all(type(v) is int for v in triple)
            anchor, partner, same = triple
            assert same == int(labels[anchor] == labels[partner])
            pairs.append(triple)

    used = Counter(i for anchor, partner, _ in pairs for i in (anchor, partner))
    assert max(used.values()) == 1 and all(0 <= i < n for i in used)
    pairs_per_batch, total = batch_size // 2, n // 2
    if drop_last:
        expected = total - total % pairs_per_batch
    else:
        rest = total % pairs_per_batch
        expected = total - rest % num_replicas
    assert len(pairs) == expected
    return pairs


def _share_bounds(labels):
    """Fewest and most same pairs any pairing of the dataset can have, as shares of N // 2 pairs."""
    sizes = list(Counter(np.asarray(labels).tolist()).values())
    n, largest = sum(sizes), max(sizes)
    most = sum(s // 2 for s in sizes)
    fewest = math.ceil(max(0, largest - (n - largest)) / 2)  # the excess must pair with itself
    return fewest / (n // 2), most / (n // 2)


def _partitions():
    rng = np.random.default_rng(0)
    n = 10_007
    return {
        "random": rng.integers(0, 50, n),
        "skewed": np.minimum(rng.geometric(0.05, n), 200),
        "odd_sizes": np.repeat(np.arange(n // 3 + 1), 3)[:n],
        "sparse_ids": rng.integers(0, 30, n) * 1_000_003 - 7,
        "one_giant": np.zeros(n, np.int64),
        "giant_and_rest": np.where(rng.random(n) < 0.8, 0, rng.integers(1, 100, n)),
        "two_unequal": (rng.random(n) < 0.1).astype(np.int64),
        "singletons": np.arange(n),
    }


@pytest.mark.parametrize("name", list(_partitions()))
@pytest.mark.parametrize("num_replicas", [1, 2, 3])
def test_sampler_contract(name, num_replicas):
    labels = _partitions()[name]
    for drop_last in (True, False):
        pairs = _epoch(labels, 60, num_replicas, drop_last=drop_last, seed=num_replicas)
    fewest, most = _share_bounds(labels)
    share = sum(same for _, _, same in pairs) / len(pairs)
    assert abs(share - min(max(0.5, fewest), most)) <= 0.02


@pytest.mark.parametrize("p_same", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_sampler_share_of_same_pairs(p_same):
    labels = _partitions()["random"]
    pairs = _epoch(labels, 2, 1, drop_last=False, p_same=p_same)  # every pair kept
    fewest, most = (round(bound * len(pairs)) for bound in _share_bounds(labels))
    wanted = min(max(round(p_same * len(pairs)), fewest), most)  # p_same = 1 is out of reach
    assert abs(sum(same for _, _, same in pairs) - wanted) <= 1


def test_sampler_global_order_and_determinism():
    labels = _partitions()["random"][:3000]
    one = _epoch(labels, 60, 1)
    assert _epoch(labels, 60, 2) == one and _epoch(labels, 60, 3) == one  # ranks only slice
    assert _epoch(labels, 60, 1) == one
    assert _epoch(labels, 60, 1, epoch=1) != one and _epoch(labels, 60, 1, seed=1) != one
    assert _epoch(np.roll(labels, 1), 60, 1) != one

    sampler = PrototypePairSampler(torch.from_numpy(labels), 60)
    assert list(sampler) == [[tuple(t) for t in one[i : i + 30]] for i in range(0, len(one), 30)]
    sampler.set_epoch(1)
    assert list(sampler) != list(PrototypePairSampler(labels, 60))
    sampler.set_epoch(0)
    sampler.set_assignments(np.arange(3000))
    assert all(same == 0 for batch in sampler for _, _, same in batch)


def test_sampler_singletons_give_uniform_pairs():
    counts = Counter()
    sampler = PrototypePairSampler(np.arange(10), 10)
    for epoch in range(3000):
        sampler.set_epoch(epoch)
        counts.update(frozenset(pair[:2]) for batch in sampler for pair in batch)
    assert len(counts) == 45  # every one of the 10 * 9 / 2 pairs occurs
    expected = 3000 * 5 / 45  # 5 pairs an epoch, spread evenly: about 333, sd about 17
    assert all(abs(c - expected) < 85 for c in counts.values())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=7), "multiple of 2"),
        (dict(batch_size=8, num_replicas=3), "multiple of 2"),
        (dict(batch_size=0), "positive"),
        (dict(p_same=1.5), "p_same"),
        (dict(p_same=-0.1), "p_same"),
        (dict(rank=2, num_replicas=2), "rank"),
        (dict(num_replicas=0), "num_replicas"),
        (dict(batch_size=22), "more than"),
        (dict(assignments=np.zeros(20, np.float32)), "integers"),
        (dict(assignments=np.zeros((20, 2), np.int64)), "1-D"),
        (dict(assignments=np.zeros(0, np.int64)), "non-empty"),
    ],
)
def test_sampler_errors(kwargs, match):
    args = dict(assignments=np.arange(21) % 4, batch_size=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        PrototypePairSampler(**args)


# ---------------------------------------------------------------- views of a dataset

def _png_folder(root, n=12, size=16):
    """An ImageFolder tree of n generated PNGs in two classes; pixel (0, 0) holds the image's
    number."""
    g = np.random.default_rng(0)
    for i in range(n):
        folder = os.path.join(root, "train", f"class{i % 2}")
        os.makedirs(folder, exist_ok=True)
        pixels = g.integers(0, 256, (size, size, 3), dtype=np.uint8)
        pixels[0, 0] = i
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:03d}.png"))
    return torchvision.datasets.ImageFolder(os.path.join(root, "train"))


def test_views_in_memory_follow_the_index_batches_and_the_key():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 8, 8, 3).contiguous()
    dataset = data.InMemoryImages(images, torch.arange(10) % 3, ["a", "b", "c"], (0.5,) * 3,
                                  (0.25,) * 3)
    views = data.Views(dataset, 8, ((0.5,) * 3, (0.25,) * 3))
    batches = [torch.tensor([3, 1, 4]), torch.tensor([0, 9])]
    for (x, targets, idx), want in zip(views.batches(batches, "eval"), batches):
        assert torch.equal(idx, want) and torch.equal(targets, want % 3)
        assert torch.allclose(x[:, 0, 0, 0], (want.float() / 255 - 0.5) / 0.25)
    one = [v for (v, _), _, _ in views.batches(batches, "simclr", key=(0, 1), copies=2)]
    again = [v for (v, _), _, _ in views.batches(batches, "simclr", key=(0, 1), copies=2)]
    other = [v for (v, _), _, _ in views.batches(batches, "simclr", key=(0, 2), copies=2)]
    assert all(torch.equal(a, b) for a, b in zip(one, again))
    assert not all(torch.equal(a, b) for a, b in zip(one, other))
    with pytest.raises(ValueError, match="is random: give the key"):
        views.batches(batches, "crop_flip")


def test_views_on_disk_depend_on_the_key_and_image_not_on_the_workers(tmp_path):
    folder = _png_folder(tmp_path)
    views = [data.Views(folder, 16, data.MEAN_STD["imagenet"], workers=w) for w in (0, 2)]
    batches = [[5, 0, 7], [11, 2]]
    runs = [[(x, idx) for x, _, idx in v.batches(batches, "simclr", key=(3, 0, 1))] for v in views]
    for (x0, idx0), (x2, idx2), want in zip(*runs, batches):
        assert idx0.tolist() == want == idx2.tolist()
        assert torch.equal(x0, x2)                       # same key, same image: the same view
    (a, b), _, _ = next(iter(views[0].batches([[4, 4]], "crop_flip", key=(3, 0, 1), copies=2)))
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], b[0])     # one image, two draws
    # The simclr view of an image twice in a batch: one crop (the image's stream), two colourings
    # (the batch's stream, a draw for each position).
    (a, b), _, _ = next(iter(views[0].batches([[4, 4]], "simclr", key=(3, 0, 1), copies=2)))
    assert not torch.equal(a[0], a[1])
    x, targets, idx = next(iter(views[0].batches([[6, 1]], "eval")))
    assert (x.shape == (2, 3, 16, 16)
            and targets.tolist() == [folder.targets[6], folder.targets[1]] == [1, 0])
    assert folder.transform is None                      # no view is ever written into the dataset


def test_similarity_probe_on_disk_has_fixed_views_in_small_batches(tmp_path):
    # On disk the probe's views come in small batches that the DataLoader workers share; its views
    # are fixed (the same every epoch, whatever worker makes them), so two calls measure the same.
    root = _jpeg_tree(tmp_path, classes=4, per_class=12, splits=("train",))
    folder = torchvision.datasets.ImageFolder(os.path.join(root, "train"), loader=data.read_image)
    torch.manual_seed(0)
    model = SPCLModel("resnet18_narrow", True)
    targets = torch.as_tensor(folder.targets)
    probe = lambda views, batch: monitor.similarity_probe(model, views, targets,
                                                          torch.device("cpu"), size=40, batch=batch)
    shared = data.Views(folder, 32, data.MEAN_STD["cifar10"], workers=2)
    first, again = probe(shared, 8), probe(shared, 8)
    alone = probe(data.Views(folder, 32, data.MEAN_STD["cifar10"], workers=0), 8)
    assert set(first) == {"sim_tp", "sim_fn", "sim_tn", "sim_tp_h", "sim_fn_h", "sim_tn_h"}
    assert first == again == alone
    # Not a constant: other views (another batching draws other colourings) measure otherwise.
    assert probe(shared, 40)["sim_tp"] != first["sim_tp"]


class _WorkerPids(torch.utils.data.Dataset):
    """A dataset's images with the id of the process that read each as its target."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][0], os.getpid()


def test_views_on_disk_keep_their_workers_and_views_across_passes(tmp_path):
    folder = _png_folder(tmp_path, n=10)
    views = data.Views(_WorkerPids(folder), 16, data.MEAN_STD["imagenet"], workers=2)
    batches = [[4, 0, 9], [2, 7], [1, 3], [8]]
    passes = [list(views.batches(batches, "simclr", key=(7, 0, epoch), copies=2))
              for epoch in range(2)]
    for epoch, one_pass in enumerate(passes):
        fresh = data.Views(folder, 16, data.MEAN_STD["imagenet"], workers=0)
        for ((a, b), pids, idx), ((fa, fb), _, fidx) in zip(
                one_pass, fresh.batches(batches, "simclr", key=(7, 0, epoch), copies=2)):
            assert torch.equal(idx, fidx) and torch.equal(a, fa) and torch.equal(b, fb)
    pids = [{int(p) for _, batch_pids, _ in one_pass for p in batch_pids} for one_pass in passes]
    assert len(pids[0]) == 2 and pids[0] == pids[1] and os.getpid() not in pids[0]
    assert not torch.equal(passes[0][0][0][0], passes[1][0][0][0])    # another epoch's key
    # A pass left after one batch (monitor.similarity_probe's) leaves the next pass whole.
    next(iter(views.batches(batches, "simclr", key=(7, 0, 1), copies=2)))
    again = list(views.batches(batches, "simclr", key=(7, 0, 0), copies=2))
    assert all(torch.equal(a[0][0], b[0][0]) and torch.equal(a[2], b[2])
               for a, b in zip(again, passes[0], strict=True))
    assert {int(p) for _, batch_pids, _ in again for p in batch_pids} == pids[0]
    # Two passes read in turns: the second gets a loader of its own, and both stay right (one
    # copy is the first of two: the same draws).
    for (x, _, idx), (e, _, _), ((want, _), _, _), (fresh_e, _, _) in zip(
            views.batches(batches, "simclr", key=(7, 0, 0)), views.batches(batches, "eval"),
            passes[0], fresh.batches(batches, "eval"), strict=True):
        assert torch.equal(x, want) and torch.equal(e, fresh_e)


@pytest.mark.parametrize("view,transform", [
    ("eval", lambda mean_std: data.eval_transform(16, mean_std)),
    ("crop_flip", lambda mean_std: data.crop_flip_transform(16, mean_std))])
def test_views_on_disk_are_made_in_uint8_and_equal_the_float_transforms(tmp_path, view, transform):
    folder = _png_folder(tmp_path, n=6, size=20)
    mean_std = data.MEAN_STD["imagenet"]
    x, _, idx = next(iter(data.Views(folder, 16, mean_std, jitter=1.0).batches(
        [[3, 0, 5]], view, key=(2, 9))))
    key = None if view == "eval" else (2, 9)
    in_worker = data.Transformed(folder, transform(None))[(3, key, None, 1)][0]
    assert in_worker.dtype == torch.uint8 and in_worker.shape == (3, 16, 16)
    # The float path, normalised in the worker as before: the PIL transforms end in uint8 either
    # way, so within a level of 255 (in fact float error).
    reference = data.Transformed(folder, transform(mean_std))
    expected = torch.stack([reference[(i, key, None, 1)][0] for i in idx.tolist()])
    assert x.dtype == expected.dtype == torch.float32 and x.shape == expected.shape
    assert (x - expected).abs().max() <= 1 / 255 / max(mean_std[1])
    assert torch.allclose(data.normalise(in_worker[None], mean_std)[0], expected[0], atol=1e-6)


def test_views_on_disk_crop_simclr_in_the_workers_and_colour_it_batched(tmp_path):
    # The simclr view: its random resized crop and flip in PIL in the workers, the same pixels as
    # simclr_transform's first two steps from the same key; its colour jitter, grayscale and blur
    # on the device, BatchAugment.colour with batch b's draws from seeded_generator(*key, -1, b).
    folder = _png_folder(tmp_path, n=6, size=48)
    mean_std = data.MEAN_STD["imagenet"]
    views = data.Views(folder, 40, mean_std, jitter=1.0)
    batches = [[3, 0, 5], [1, 4]]
    got = list(views.batches(batches, "simclr", key=(2, 9), copies=2, start=7))
    first_steps = T.Compose(data.simclr_transform(40).transforms[:2] + [T.PILToTensor()])
    augment = data.BatchAugment(40, mean_std, 1.0, blur=True)
    assert augment.blur_kernel == 5                               # 10% of 40 px, odd
    for b, (batch, ((x1, x2), _, idx)) in enumerate(zip(batches, got, strict=True), 7):
        assert idx.tolist() == batch
        crops = [data.Transformed(folder, data.crop_flip_transform(40))[(i, (2, 9), None, 2)][0]
                 for i in batch]                                  # (copy 1, copy 2) per image
        for i, (c1, _) in zip(batch, crops):
            assert c1.dtype == torch.uint8 and torch.equal(
                c1, data.Transformed(folder, first_steps)[(i, (2, 9), None, 1)][0])
        g = data.seeded_generator(2, 9, -1, b)
        for copy, x in enumerate((x1, x2)):
            crop = torch.stack([c[copy] for c in crops]).float() / 255     # B x 3 x 40 x 40
            assert torch.equal(x, data.standardise(augment.colour(crop, g), mean_std))


def test_gaussian_blur_matches_torchvision_image_by_image():
    x = torch.rand(5, 3, 30, 37, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    for kernel in (1, 5, 23):
        got = data.gaussian_blur(x, sigma, kernel)
        expected = torch.stack([TF.gaussian_blur(x[i], [kernel, kernel], [float(s), float(s)])
                                for i, s in enumerate(sigma)])
        assert got.shape == x.shape and torch.allclose(got, expected, atol=1e-6), kernel
    assert torch.equal(data.gaussian_blur(x, sigma, 1), x)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        data.gaussian_blur(x, sigma, 4)
    with pytest.raises(ValueError, match="below twice the image side"):
        data.gaussian_blur(x, sigma, 61)


@pytest.fixture
def one_thread():
    """torch on one thread: the batched views are many small operations, which a second thread
    only slows when the machine's other cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sample_std_se(v):
    """The standard error of v.std() (delta method: s sqrt((kurtosis - 1) / 4n)), for samples
    far from normal, as the colour factors' uniform draws."""
    d = v - v.mean()
    kurtosis = (d ** 4).mean() / (d ** 2).mean() ** 2
    return v.std() * torch.sqrt((kurtosis - 1) / (4 * len(v)))


@needs_cifar
def test_views_on_disk_follow_the_pil_recipe_in_distribution(tmp_path, one_thread):
    # 600 simclr views of 100 real CIFAR-10 images enlarged to 160 px with grain (std 16 levels,
    # a texture that blur removes), 128 px views (a blur kernel of 13 taps, +-3 sigma at sigma
    # 2), made by data.Views on disk and by the per-image PIL recipe data.simclr_transform from
    # the same keys: the same crops (the first draws of an image's stream), independent colour
    # draws. Every comparison allows 4 standard errors, estimated from the two samples (here all
    # within 1): a deterministic test (fixed keys) that a change of keys or of platform floats
    # does not tip, which still sees the views without their blur (13 standard errors off) or
    # with half the jitter strength (16). PIL rounds to uint8 after each step and blurs with
    # three box filters (GaussianBlur): differences far below that.
    rng = np.random.default_rng(0)
    for cls in sorted(os.listdir(os.path.join(CIFAR10, "test"))):
        os.makedirs(tmp_path / cls)
        for name in sorted(os.listdir(os.path.join(CIFAR10, "test", cls)))[:10]:
            image = data.read_image(os.path.join(CIFAR10, "test", cls, name))
            pixels = (np.asarray(image.resize((160, 160), Image.BICUBIC))
                      + rng.normal(0, 16, (160, 160, 3)))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
                tmp_path / cls / f"{name}.png")
    folder = torchvision.datasets.ImageFolder(tmp_path, loader=data.read_image)
    n, keys, mean_std = len(folder), [(k, 0) for k in range(6)], data.MEAN_STD["imagenet"]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in mean_std)

    def per_image(transform):                  # uint8 views of every image for every key
        items = data.Transformed(folder, transform)
        return torch.stack([items[(i, key, None, 1)][0] for key in keys for i in range(n)])

    def batched(views):                        # the same order, in [0, 1]
        return torch.cat([x * std + mean for key in keys for x, _, _ in views.batches(
            torch.arange(n).split(50), "simclr", key=key)])

    crops = per_image(data.crop_flip_transform(128)).float() / 255         # the views' inputs
    luma = lambda v: data._gray(v)[:, 0]
    log_ratio = lambda a, b: (a / b.clamp(min=1e-3)).log()
    roughness = lambda v: ((v[..., 1:] - v[..., :-1]).abs().mean((1, 2, 3))
                           / v.std((1, 2, 3)).clamp(min=1e-3))

    def measure(v):                            # views in [0, 1] -> {name: per view [N] or [N, 3]}
        z = (v - mean) / std
        return {"mean": z.mean((2, 3)), "std": z.std((2, 3)),
                # channels equal (within the float error of undoing the normalisation)
                "gray": ((v[:, 0] - v[:, 1]).abs() + (v[:, 1] - v[:, 2]).abs()).amax((1, 2)) < 1e-4,
                # blur: the mean absolute horizontal gradient over the view's std (which
                # brightness and contrast scale alike), against its crop's
                "smoothing": roughness(v) / roughness(crops),
                # the jitter's strength: how much the luma's mean and std move from the crop's
                "brightness": log_ratio(luma(v).mean((1, 2)), luma(crops).mean((1, 2))),
                "contrast": log_ratio(luma(v).std((1, 2)), luma(crops).std((1, 2)))}

    pil = measure(per_image(data.simclr_transform(128, 1.0)).float() / 255)
    ours = data.Views(folder, 128, mean_std, jitter=1.0)
    arms = {"ours": measure(batched(ours))}
    ours.augment.blur_kernel = None
    arms["no blur"] = measure(batched(ours))
    arms["half the jitter"] = measure(batched(data.Views(folder, 128, mean_std, jitter=0.5)))

    def standard_errors_off(arm, name, spread=False):
        a, b = arms[arm][name].float(), pil[name].float()
        if spread:                             # the std over views
            return ((a.std(0) - b.std(0)) / torch.hypot(_sample_std_se(a), _sample_std_se(b)))
        return (a.mean(0) - b.mean(0)) / torch.sqrt(a.var(0) / len(a) + b.var(0) / len(b))

    N = len(crops)
    for name in ("mean", "std", "smoothing"):
        assert standard_errors_off("ours", name).abs().max() < 4, name
    for name in ("brightness", "contrast"):
        assert abs(standard_errors_off("ours", name, spread=True)) < 4, name
    for gray in (arms["ours"]["gray"], pil["gray"]):             # p 0.2 each, binomial
        assert abs(gray.float().mean() - 0.2) < 4 * math.sqrt(0.2 * 0.8 / N)
    # The comparisons can tell: without the blur, and with half the jitter.
    assert standard_errors_off("no blur", "smoothing") > 4
    assert all(standard_errors_off("half the jitter", name, spread=True) < -4
               for name in ("brightness", "contrast"))


def _gaussian_blur_numpy(image, sigma):
    """A separable Gaussian of a [H, W, C] array, the kernel sampled to +-4 sigma, edges
    repeated."""
    r = int(math.ceil(4 * sigma)) + 1
    kernel = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    kernel /= kernel.sum()
    x = np.pad(image.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="edge")
    x = np.apply_along_axis(np.convolve, 0, x, kernel, "valid")
    return np.apply_along_axis(np.convolve, 1, x, kernel, "valid")


def test_pil_gaussian_blur_is_a_gaussian_of_the_drawn_sigma_and_follows_the_key():
    blur = data.GaussianBlur((0.1, 2.0))
    line = np.zeros((9, 41, 3), np.uint8)
    line[:, 20] = 255                                             # a vertical line impulse
    noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    sigmas = []
    for seed in range(20):                                     # sigma 0.11 to 1.94
        torch.manual_seed(seed)
        sigma = float(torch.empty(()).uniform_(0.1, 2.0))        # the draw the docstring names
        sigmas.append(sigma)
        torch.manual_seed(seed)
        profile = np.asarray(blur(Image.fromarray(line))).astype(np.float64)[4, :, 0]
        torch.manual_seed(seed)
        blurred = np.asarray(blur(Image.fromarray(noise))).astype(np.float64)
        # The impulse response's spread is sigma (PIL's three box blurs keep the variance; below
        # 0.2 its tails round to 0 in uint8).
        spread = math.sqrt((profile * (np.arange(41) - 20) ** 2).sum() / profile.sum())
        assert abs(spread - sigma) < 0.05 * sigma + 0.03 or sigma < 0.2, (sigma, spread)
        if sigma >= 0.5:   # below, a sampled Gaussian is no reference: its weight is all central
            error = [np.abs(blurred - _gaussian_blur_numpy(noise, f * sigma))[8:-8, 8:-8].mean()
                     for f in (1, 0.8, 1.25)]
            # The drawn sigma fits far better than 20% off; from sigma 1 within 1.5 levels on
            # average (three box blurs are close to a Gaussian, closer the wider they are).
            assert error[0] < 0.6 * min(error[1:]) and (error[0] < 1.5 or sigma < 1), error
    assert min(sigmas) < 0.2 and max(sigmas) > 1.9
    # Through Transformed: a function of (key, image), whatever torch's global state.
    image = Image.fromarray(noise)
    keyed = data.Transformed([(image, 0)], data.GaussianBlur())
    torch.manual_seed(0)
    a = keyed[(0, (1, 2), None, 1)][0]
    torch.manual_seed(1)
    assert np.array_equal(a, keyed[(0, (1, 2), None, 1)][0])
    assert not np.array_equal(a, keyed[(0, (1, 3), None, 1)][0])


def test_pair_batches_are_the_anchors_then_their_partners():
    labels = np.arange(40) % 6
    sampler = PrototypePairSampler(labels, 8, num_replicas=2, rank=1)
    for triples, idx in zip(sampler, train.pair_batches(sampler)):
        P = len(triples)
        assert (idx[:P].tolist() == [t[0] for t in triples]
                and idx[P:].tolist() == [t[1] for t in triples])
        assert (labels[idx[:P]] == labels[idx[P:]]).astype(int).tolist() == [t[2] for t in triples]


# ---------------------------------------------------------------------------------------------
# train.py, on real CIFAR-10 images (a few hundred, in a small ImageFolder tree: small_cifar)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_two_epochs_logs_clusters_and_checkpoints(small_cifar, tmp_path, monkeypatch):
    passes = []
    real_pass = cluster.shard_features
    monkeypatch.setattr(cluster, "shard_features",
                        lambda *a, **k: passes.append(a[2]) or real_pass(*a, **k))
    train.main(_train_args(small_cifar, tmp_path, "--knn-every", "1"))
    # Feature passes (train 320, test 80): clustering, kNN; then kNN only, as epoch 1's clustering
    # reuses the train features of epoch 0's kNN pass (same weights).
    assert passes == [320, 320, 80, 320, 80]
    rows = _metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2]                    # the epoch just finished, from 1
    for r in rows:
        assert _all_finite(r) and 0 <= r["knn_top1"] <= 100
        assert {"loss_con", "loss_metric", "loss_proto", "sim_tp", "sim_fn", "sim_tn",
                "nmi_gt"} <= set(r)
    assert "nmi_prev" in rows[1]
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["assignments"].shape == (320, 1)
    assert ckpt["config"]["arch"] == "resnet18_narrow"
    sizes = np.bincount(ckpt["assignments"][:, 0].numpy(), minlength=8)  # the last clustering
    stats = rows[-1]["kmeans_k8"]
    assert (sizes.min(), sizes.max(), int((sizes == 0).sum())) == (
        stats["size_min"], stats["size_max"], stats["empty_clusters"])


@pytest.mark.slow
@needs_cifar
def test_loss_falls_on_one_fixed_batch(small_cifar):
    torch.manual_seed(0)
    images = data.load_dataset("cifar10", small_cifar, train=True).images[:32]
    augment = data.BatchAugment(32, data.MEAN_STD["cifar10"])
    g = torch.Generator().manual_seed(0)
    v1, v2 = augment(images, g), augment(images, g)
    same = torch.tensor([1, 0] * 8)
    protos = torch.randint(0, 8, (32, 1), generator=g)
    model = SPCLModel("resnet18_narrow", True, [8])
    step = TrainingStep(model, contrast="per-side")
    opt = LARS(model.parameters(), lr=0.5)
    losses = []
    for _ in range(15):
        loss = step(v1, v2, same, protos, True)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def _run(cmd, timeout=240, **kw):
    return subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=timeout, **kw)


def _same_run(straight, other):
    """Two runs' final checkpoints and metric lines are identical (bit for bit)."""
    a = torch.load(os.path.join(straight, "checkpoint.pth"), weights_only=True)
    b = torch.load(os.path.join(other, "checkpoint.pth"), weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["partial"] is b["partial"] is None
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert torch.equal(a["assignments"], b["assignments"])
    rows_a, rows_b = _metrics(straight), _metrics(other)
    assert [r["epoch"] for r in rows_b] == [1, 2]
    for ra, rb in zip(rows_a, rows_b):
        for key in ("loss_total", "loss_con", "loss_metric", "loss_proto", "loss_total_last5",
                    "sim_tp", "sim_fn", "sim_tp_h", "nmi_gt"):
            assert ra.get(key) == rb.get(key), key           # None: no such term that epoch
        assert ra.get("loss_total") is not None
        assert ra.get("nmi_prev") == rb.get("nmi_prev")


def _resume_inside_epoch_2(run, out, resumed):
    """Copy run's checkpoint.prev.pth, which --save-every 2 left at step 4 of epoch 2 (5 steps an
    epoch), to a fresh --out with the metric lines: the state of a run preempted there."""
    ckpt = torch.load(os.path.join(out, "checkpoint.prev.pth"), weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["partial"]["step"] == 4
    os.makedirs(resumed)
    shutil.copy(os.path.join(out, "checkpoint.prev.pth"), os.path.join(resumed, "checkpoint.pth"))
    shutil.copy(os.path.join(out, "metrics.jsonl"), resumed)   # epoch 2's line is dropped
    result = run(resumed)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout and "at step 4 of epoch 2" in result.stdout


@pytest.mark.slow
def test_resume_is_exact(small_cifar, tmp_path):
    # At epoch ends (two processes, one epoch each, with --save-every 2 inside the epochs, which
    # must change nothing), and inside an epoch (from the checkpoint --save-every left at step 4).
    straight, split, inside = tmp_path / "straight", tmp_path / "split", tmp_path / "inside"
    train.main(_train_args(small_cifar, straight))
    run = lambda out, *extra: _run([sys.executable, "train.py",
                                    *_train_args(small_cifar, out, "--save-every", "2", *extra)])
    # The first half may run in this process; the resume must be a fresh one (a process that
    # went on would carry the random state a missing restore would lose).
    train.main(_train_args(small_cifar, split, "--save-every", "2", "--stop-after", "1"))
    result = run(split, "--stop-after", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed from" in result.stdout
    _same_run(straight, split)
    _resume_inside_epoch_2(run, split, inside)
    _same_run(straight, inside)


@pytest.mark.slow
def test_on_disk_resume_under_torchrun_is_exact(small_cifar, tmp_path):
    # --dataset folder (PIL views in DataLoader workers) at world size 2: the workers' seeds must
    # not matter, and every rank's random state comes back.
    args = lambda out: _train_args(small_cifar, out, "--dataset", "folder", "--image-size", "32",
                                   "--save-every", "2", "--workers", "2")
    run = lambda out: _run(_torchrun(args(out)))
    straight = tmp_path / "straight"
    result = run(straight)
    assert result.returncode == 0, result.stderr[-2000:]
    _resume_inside_epoch_2(run, straight, tmp_path / "inside")
    _same_run(straight, tmp_path / "inside")


def test_checkpoints_keep_the_one_before(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    for epoch in (1, 2, 3):
        checkpoint.atomic_save({"epoch": epoch}, path, keep_previous=True)
    assert torch.load(path, weights_only=True)["epoch"] == 3
    assert torch.load(checkpoint.previous_path(path), weights_only=True)["epoch"] == 2
    monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError("no links here")))
    checkpoint.atomic_save({"epoch": 4}, path, keep_previous=True)         # copied instead
    assert torch.load(checkpoint.previous_path(path), weights_only=True)["epoch"] == 3
    assert set(os.listdir(tmp_path)) == {"checkpoint.pth", "checkpoint.prev.pth"}


@pytest.mark.slow
def test_the_steady_state_step_reads_the_device_every_log_every_steps(small_cifar, tmp_path,
                                                                      monkeypatch):
    # Every read of a tensor's value from Python (item, tolist, bool(), ...) is a host-device sync
    # on a GPU. One epoch of 5 steps at --log-every 2 may read at steps 2, 4 and 5, then twice for
    # the epoch's means: 5 reads, all tolist.
    reads, real_epoch = Counter(), train.train_one_epoch

    def counting(name):
        method = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            reads[name] += 1
            return method(self, *args, **kwargs)
        return read

    def counted_epoch(*args, **kwargs):
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu",
                         "numpy"):
                m.setattr(torch.Tensor, name, counting(name))
            return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", counted_epoch)
    train.main(_train_args(small_cifar, tmp_path, "--epochs", "1", "--log-every", "2"))
    assert reads == {"tolist": 5}, reads


@pytest.mark.slow
def test_a_non_finite_loss_under_torchrun_ends_the_job_without_restarts(small_cifar, tmp_path):
    # torchrun restarts failed workers whatever their exit code; a restart from the same
    # checkpoint would meet the same NaN, so the run must end the job instead.
    wrapper = tmp_path / "diverging_train.py"
    wrapper.write_text(
        "import runpy, sys, torch\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "import losses, models\n"
        "def diverging(*args, **kwargs):\n"
        "    total, terms = losses.spcl_loss(*args, **kwargs)\n"
        "    return total * float('nan'), terms\n"
        "models.spcl_loss = diverging\n"
        f"runpy.run_path({os.path.join(HERE, 'train.py')!r}, run_name='__main__')\n")
    cmd = _torchrun(_train_args(small_cifar, tmp_path / "out", "--epochs", "1"), "--max-restarts",
                    "3")
    cmd[cmd.index("train.py")] = str(wrapper)
    result = _run(cmd)
    output = result.stdout + result.stderr
    assert result.returncode != 0                     # the job failed, and said why, once:
    assert output.count("train.py: error: non-finite loss at epoch 1 step 1/") == 1, output[-3000:]


def test_end_job_writes_its_message_before_it_stops_the_agent(tmp_path):
    # torchrun's agent answers the SIGTERM by killing its workers at once, so the error must be on
    # stderr before the signal is sent. The stand-in agent below kills its worker on SIGTERM.
    worker, agent = tmp_path / "worker.py", tmp_path / "agent.py"
    worker.write_text(f"import sys\nsys.path.insert(0, {HERE!r})\nimport runtime\n"
                      "runtime.end_job('train.py', 'it diverged')\n")
    agent.write_text(
        "import os, signal, subprocess, sys\n"
        f"worker = subprocess.Popen([sys.executable, {str(worker)!r}])\n"
        "def stop(*_):\n"
        "    os.kill(worker.pid, signal.SIGKILL)\n"
        "    print('agent: stopped', file=sys.stderr, flush=True)\n"
        "    os._exit(3)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "sys.exit(worker.wait())\n")
    env = dict(os.environ, TORCHELASTIC_MAX_RESTARTS="3", LOCAL_RANK="0")
    result = subprocess.run([sys.executable, str(agent)], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 3                     # the agent was stopped
    assert result.stderr.splitlines() == ["train.py: error: it diverged", "agent: stopped"]
    env.pop("TORCHELASTIC_MAX_RESTARTS")              # no restarts: the worker's exit is enough
    result = subprocess.run([sys.executable, str(agent)], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 1 and result.stderr == "train.py: error: it diverged\n"


def test_scripts_import_library_modules_only():
    # The house rule: train.py and linear_eval.py share library modules, never each other; the
    # library modules never import a script; nothing under experiments/ imports a script (what
    # two scripts share lives in a library module).
    experiments = os.path.join(HERE, "experiments")
    scripts = {"train", "linear_eval"} | {name[:-3] for name in os.listdir(experiments)
                                          if name.endswith(".py")}
    files = [os.path.join(HERE, name) for name in os.listdir(HERE)] + [
        os.path.join(experiments, name) for name in os.listdir(experiments)]
    for path in sorted(files):
        if not path.endswith(".py") or os.path.basename(path).startswith("test_"):
            continue
        with open(path) as f:
            imported = set(re.findall(r"^\s*(?:from|import) (\w+)", f.read(), flags=re.MULTILINE))
        assert not imported & scripts, f"{path} imports {sorted(imported & scripts)}"


def test_the_reading_path_keeps_its_line_budget():
    # experiments/lines.py counts non-blank lines: the algorithm's files at most 1,400 together,
    # train.py at most 450, every other file but the tests at most 600.
    result = _run([sys.executable, os.path.join("experiments", "lines.py"), "--check"])
    assert result.returncode == 0, result.stderr
    total = int(re.search(r"\| reading path \(.*\) \| (\d+) \|", result.stdout)[1])
    assert total == sum(sum(1 for line in open(os.path.join(HERE, name)) if line.strip())
                        for name in ("train.py", "losses.py", "cluster.py", "sampler.py",
                                     "models.py", "lars.py"))


@pytest.mark.parametrize("cores,local_world,want", [
    (2, 1, 1), (16, 1, 15), (224, 8, 27), (32, 8, 3), (4, 8, 1), (1, 1, 1), (7, 2, 2)])
def test_default_workers_share_the_cores_among_the_ranks_of_a_node(cores, local_world, want):
    assert runtime.default_workers(cores, local_world) == want


def test_workers_flag_defaults_from_affinity_and_local_world_size(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(24)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    for get_args in (train.get_args,
                     lambda argv: linear_eval.get_args(["--checkpoint", "c"] + argv)):
        assert get_args([]).workers == 24 // 4 - 1 and get_args(["--workers", "0"]).workers == 0
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert train.get_args([]).workers == 23


def test_crash_while_writing_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    checkpoint.atomic_save({"epoch": 1, "w": torch.ones(3)}, str(tmp_path / "checkpoint.pth"))

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save({"epoch": 2, "w": torch.zeros(3)}, str(tmp_path / "checkpoint.pth"))
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 1 and torch.equal(ckpt["w"], torch.ones(3))


class _Stop(Exception):
    pass


@pytest.mark.parametrize("script, argv", [(train, []), (linear_eval, ["--checkpoint", "c.pth"])])
def test_timeout_reaches_the_process_group_and_must_be_positive(script, argv, monkeypatch):
    seen = []

    def setup_distributed(timeout_minutes=60):
        seen.append(timeout_minutes)
        raise _Stop

    monkeypatch.setattr(runtime, "setup_distributed", setup_distributed)
    for timeout, expected in [([], 60), (["--timeout", "7.5"], 7.5)]:
        with pytest.raises(_Stop):
            script.main(argv + timeout)
        assert seen[-1] == expected
    with pytest.raises(SystemExit, match="--timeout must be > 0 minutes, got 0.0"):
        script.main(argv + ["--timeout", "0"])
    assert len(seen) == 2


def _torchrun(args, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *extra,
            "train.py", *args]


@pytest.mark.parametrize("extra,key", [
    # k-means in both epochs; the heads idle in epoch 0, then made from cluster means all-reduced
    # over the ranks' shards.
    (["--epochs", "2", "--proto-start-epoch", "1", "--head-init", "centroids"], "kmeans_k8"),
    (["--epochs", "1", "--prototypes", "gt", "--w-con", "0", "--w-metric", "0"],
     "loss_proto"),  # supervised
])
@pytest.mark.slow
def test_torchrun_two_processes(small_cifar, tmp_path, extra, key):
    result = _run(_torchrun(_train_args(small_cifar, tmp_path, *extra)))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _metrics(tmp_path)
    assert len(rows) == int(extra[1]) and all(_all_finite(r) for r in rows) and key in rows[-1]
    assert "world size 2" in result.stdout
    # What every rank says alike, rank 0 says (DDP's note on its unused-parameter search).
    notes = re.findall(r"\[rank(\d)\]:\[W[^]]*\] Warning: find_unused_parameters", result.stderr)
    assert notes in ([], ["0"])


@pytest.mark.slow
def test_torchrun_clusters_exactly_as_one_process(small_cifar, tmp_path):
    # DDP starts every rank from rank 0's weights, which are the single process's (same seed), so
    # the first clustering (features of every image in the evaluation view, gathered from both
    # ranks, before any step) must be the single process's, up to float round-off in the
    # convolutions of other batch sizes, which may move a point that sits between two centroids. The
    # training steps that follow see the same global pairs but per-rank views and BatchNorm
    # statistics, so their loss only agrees roughly.
    args = ("--epochs", "1", "--train-subset", "128", "--knn-every", "0")
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(_train_args(small_cifar, one, *args))
    result = _run(_torchrun(_train_args(small_cifar, two, *args)))
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (torch.load(out / "checkpoint.pth", weights_only=True) for out in (one, two))
    same = (a["assignments"] == b["assignments"]).float().mean().item()
    assert same >= 0.95 and nmi(a["assignments"][:, 0], b["assignments"][:, 0]) >= 0.95, same
    row_one, row_two = _metrics(one)[0], _metrics(two)[0]
    assert row_two["nmi_gt"] == pytest.approx(row_one["nmi_gt"], abs=0.03)
    assert row_two["loss_total"] == pytest.approx(row_one["loss_total"], rel=0.1)


def _descendants(pid):
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    return children + [d for c in children for d in _descendants(c)]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"),
                    reason="finds the workers through Linux /proc")
def test_torchrun_restarts_a_killed_worker_from_the_last_checkpoint(small_cifar, tmp_path):
    args = _train_args(small_cifar, tmp_path, "--epochs", "3")
    proc = subprocess.Popen(_torchrun(args, "--max-restarts", "1"), cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while not os.path.exists(tmp_path / "checkpoint.pth") and time.time() < deadline:
            time.sleep(0.2)
        assert os.path.exists(tmp_path / "checkpoint.pth"), "no checkpoint after the first epoch"
        time.sleep(0.5)                                        # into the second epoch
        workers = [p for p in _descendants(proc.pid)
                   if "train.py" in open(f"/proc/{p}/cmdline").read() and p != proc.pid]
        os.kill(workers[-1], signal.SIGKILL)
        output, _ = proc.communicate(timeout=200)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)                # torchrun and any stray worker
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, output[-3000:]
    assert "resumed from" in output
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 3
    assert [r["epoch"] for r in _metrics(tmp_path)] == [1, 2, 3]  # the killed epoch logged once


@pytest.mark.slow
def test_simclr_mode_clusters_nothing_and_gt_mode_uses_labels(small_cifar, tmp_path):
    train.main(_train_args(small_cifar, tmp_path / "simclr", "--epochs", "1", "--w-metric", "0",
                           "--w-proto", "0"))
    row = _metrics(tmp_path / "simclr")[0]
    assert "cluster_seconds" not in row and "loss_metric" not in row and "loss_proto" not in row
    assert set(row) >= {"loss_con", "sim_tp"}
    train.main(_train_args(small_cifar, tmp_path / "gt", "--epochs", "1", "--prototypes", "gt"))
    ckpt = torch.load(tmp_path / "gt" / "checkpoint.pth", weights_only=True)
    labels = data.load_dataset("cifar10", small_cifar, train=True).targets
    assert torch.equal(ckpt["assignments"][:, 0], labels)
    assert "cluster_seconds" not in _metrics(tmp_path / "gt")[0]


@pytest.mark.slow
def test_a_fork_that_switches_prototypes_on_equals_a_run_that_never_stopped(small_cifar,
                                                                             tmp_path):
    # Straight: SPCL with one warm-up epoch of per-side NT-Xent. Forked: a SimCLR trunk trained
    # the same way (no heads at all, so another LARS parameter list), stopped after epoch 1, then
    # a branch with --fork-from that switches the prototype terms on with K = 8.
    straight, trunk, branch = tmp_path / "straight", tmp_path / "trunk", tmp_path / "branch"
    warm_up = ["--proto-start-epoch", "1", "--contrast", "per-side"]
    train.main(_train_args(small_cifar, straight, *warm_up))
    train.main(_train_args(small_cifar, trunk, "--w-metric", "0", "--w-proto", "0",
                           "--num-prototypes", "3", "--contrast", "per-side", "--stop-after", "1"))
    train.main(_train_args(small_cifar, branch, *warm_up, "--fork-from",
                           str(trunk / "checkpoint.pth")))
    _same_run(straight, branch)
    ckpt = torch.load(branch / "checkpoint.pth", weights_only=True)
    assert ckpt["changes"] == [{"epoch": 2, "flags": {
        "w_metric": [0.0, 1.0], "w_proto": [0.0, 1.0], "num_prototypes": [[3], [8]],
        "proto_start_epoch": [0, 1], "w_metric_on": [False, True], "w_proto_on": [False, True]}}]
    # A branch of the branch would start from prototypes already made: refused, as is a plain
    # resume with other loss flags, and a fork whose prototypes would start inside the trunk.
    with pytest.raises(SystemExit, match="trained with prototypes from epoch 2: a branch starts"):
        train.main(_train_args(small_cifar, tmp_path / "b2", "--fork-from",
                               str(branch / "checkpoint.pth")))
    with pytest.raises(SystemExit, match=r"another configuration \(w_con: checkpoint 1.0, now 2.0"):
        train.main(_train_args(small_cifar, branch, *warm_up, "--w-con", "2", "--epochs", "2"))
    with pytest.raises(SystemExit, match="holds 1 epochs without prototypes: give "
                                         "--proto-start-epoch 1"):
        train.main(_train_args(small_cifar, tmp_path / "b3", "--fork-from",
                               str(trunk / "checkpoint.pth")))
    assert [r["epoch"] for r in _metrics(branch)] == [1, 2]      # the trunk's line, then its own


def test_prototype_terms_on_the_projection_match_a_naive_loop():
    # --heads-on z: Eq. 3 and Eq. 4 read z (128 wide) instead of h; NT-Xent is unchanged.
    torch.manual_seed(0)
    model = SPCLModel("resnet18_narrow", True, [5], heads_on="z").eval()
    assert model.metric_head.in_features == model.proto_heads[0].in_features == 128
    v1, v2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    same, labels = torch.tensor([1, 0]), torch.tensor([[0], [3], [4], [1]])
    step = TrainingStep(model, w_con=1.0, w_metric=1.0, w_proto=1.0, temperature=0.5,
                        contrast="per-side")
    loss, terms = step(v1, v2, same, labels, True)
    with torch.no_grad():
        _, z1 = model(v1)
        _, z2 = model(v2)
        w, b = model.metric_head.weight[0], model.metric_head.bias[0]
        a1, b1, a2, b2 = z1[:2], z1[2:], z2[:2], z2[2:]
        pairs = [(a1, b1), (a1, b2), (a2, b1), (a2, b2)]
        left = torch.cat([p[0] for p in pairs] + [a1, b1])
        right = torch.cat([p[1] for p in pairs] + [a2, b2])
        label = torch.cat([same] * 4 + [torch.ones(2, dtype=torch.long)] * 2).float()
        metric = _naive_bce_metric(w, b, left, right, label)
        head = model.proto_heads[0]
        proto = _naive_ce(torch.cat([z1, z2]) @ head.weight.T + head.bias, labels[:, 0].repeat(2))
        con = (_naive_nt_xent(z1[:2], z2[:2], 0.5) + _naive_nt_xent(z1[2:], z2[2:], 0.5)) / 2
    torch.testing.assert_close(terms["metric"], metric, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["proto"], proto, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["con"], con, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, con + metric + proto, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_on_disk_folder_pipeline_runs(small_cifar, tmp_path):
    # --dataset folder: PIL transforms in DataLoader workers (data.Views on disk).
    train.main(_train_args(small_cifar, tmp_path, "--dataset", "folder", "--image-size", "32",
                           "--epochs", "1", "--knn-every", "1", "--num-prototypes", "4,8"))
    row = _metrics(tmp_path)[0]
    assert _all_finite(row) and "kmeans_k8" in row and 0 <= row["knn_top1"] <= 100


def test_prototype_heads_restart_identically_whatever_the_global_rng():
    heads = []
    for global_seed in (0, 1):               # two ranks: seed + rank
        torch.manual_seed(global_seed)
        model = SPCLModel("resnet18_narrow", True, [5, 7])
        model.reset_proto_heads(torch.Generator().manual_seed(3))
        heads.append([p.clone() for p in model.proto_heads.parameters()])
    for a, b in zip(*heads):
        assert torch.equal(a, b)
    w = heads[0][0]
    assert (w.std().item() == pytest.approx(0.01, rel=0.3)
            and not heads[0][1].any())    # N(0, 0.01), zero bias


@pytest.mark.slow
@pytest.mark.parametrize("prototypes, restarts", [("kmeans", [1, 2]), ("gt", [1]),
                                                  ("gt --renew-gt-head", [1, 2])])
def test_proto_heads_restart_after_each_clustering_only(small_cifar, tmp_path, monkeypatch,
                                                        prototypes, restarts):
    # k-means ids are arbitrary each epoch; class ids are not, so a GT head must keep its training,
    # unless --renew-gt-head asks for the k-means rows' restarts (a matched control).
    seen = []
    original = SPCLModel.reset_proto_heads

    def recording(self, generator=None, weights=None):
        if generator is not None:            # None: the constructor's initialisation
            seen.append(len(_metrics(tmp_path)) if os.path.exists(tmp_path / "metrics.jsonl")
                        else 0)
        return original(self, generator, weights)

    monkeypatch.setattr(SPCLModel, "reset_proto_heads", recording)
    train.main(_train_args(small_cifar, tmp_path, "--epochs", "3", "--proto-start-epoch", "1",
                           "--prototypes", *prototypes.split(), "--train-subset", "128",
                           "--knn-every", "0"))
    assert seen == restarts      # restarted at the start of these epochs (epochs finished before)


@pytest.mark.slow
def test_sce_and_several_k_run(small_cifar, tmp_path):
    train.main(_train_args(small_cifar, tmp_path, "--epochs", "1", "--proto-loss", "sce",
                           "--num-prototypes", "4,8"))
    row = _metrics(tmp_path)[0]
    assert "kmeans_k4" in row and "kmeans_k8" in row and _all_finite(row)
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["assignments"].shape == (320, 2)
    assert (ckpt["model"]["proto_heads.0.weight"].shape[0] == 4
            and ckpt["model"]["proto_heads.1.weight"].shape[0] == 8)


@pytest.mark.parametrize("extra,message", [
    (["--data", "/nonexistent"], r"'/nonexistent' is not a directory; give the folder that holds "
                                 r"ImageFolder trees train/<class>/\*.jpg and test/<class>/\*.jpg "
                                 r"\(or torchvision's cifar-10-batches-py/\), "
                                 "or add --download to fetch cifar10 there$"),
    (["--data", HERE], "does not hold cifar10: expected ImageFolder trees train/<class>/"),
    (["--dataset", "imagenet", "--download"], "--download fetches CIFAR only"),
    (["--batch-size", "63"], "multiple of 2 x world size"),
    (["--num-prototypes", "320"], "2 <= K < N"),
    (["--arch", "resnet7"], "unknown --arch"),
    (["--batch-size", "0"], "positive multiple of 2"),
    (["--batch-size", "2"], r"^train.py: error: --batch-size 2 must be a positive multiple of 2 x "
                            r"world size = 2 and at least 4, so that each rank holds 2 anchors "
                            r"and 2 partners \(it counts images, made of pairs, split evenly "
                            r"over the ranks\)$"),
    (["--num-prototypes", "512,"], "comma list"),
    (["--num-prototypes", "1"], "K must be >= 2"),
    (["--p-same", "1.5"], r"--p-same must be in \[0, 1\]"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--w-metric", "-0.1"], "weights must be >= 0"),
    (["--w-con", "0", "--w-metric", "0", "--w-proto", "0"], "all three loss weights are 0"),
    (["--w-con", "0", "--proto-start-epoch", "1"], "nothing to train before --proto-start-epoch 1"),
    (["--kmeans-iters", "0"], "--kmeans-iters must be >= 1"),
    (["--knn-every", "-1"], "--knn-every must be >= 0, got -1"),
    (["--head-lr", "0"], "--head-lr must be > 0"),
    (["--jitter", "-1"], "--jitter must be >= 0"),
    (["--pca-dim", "-1"], "--pca-dim must be >= 0"),
    (["--head-init", "centroids", "--prototypes", "gt"],
     "--head-init centroids needs k-means prototypes"),
    (["--head-init", "centroids", "--w-proto", "0"],
     "--head-init centroids needs k-means prototypes"),
])
@pytest.mark.slow
def test_train_bad_input_gets_a_clear_error(small_cifar, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        train.main(_train_args(small_cifar, tmp_path) + extra)


@pytest.mark.slow
def test_a_checkpoint_of_the_older_format_is_refused_and_kept(small_cifar, tmp_path):
    # Format 1 kept the prototype heads inside LARS: its optimiser state cannot fit this one's.
    train.main(_train_args(small_cifar, tmp_path, "--stop-after", "1", "--train-subset", "128"))
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["format"] == checkpoint.FORMAT and ckpt["proto_optimizer"] is not None
    del ckpt["format"]
    torch.save(ckpt, tmp_path / "checkpoint.pth")
    before = (tmp_path / "checkpoint.pth").read_bytes()
    with pytest.raises(SystemExit, match="written by an older train.py"):
        train.main(_train_args(small_cifar, tmp_path, "--train-subset", "128"))
    assert (tmp_path / "checkpoint.pth").read_bytes() == before


@pytest.mark.slow
def test_resume_into_fp16_loss_scaling_from_a_run_without_it(small_cifar, tmp_path, monkeypatch):
    # Trained on the CPU (or a bf16 GPU): no scaler state. Resumed where fp16 needs loss scaling
    # (a V100, say), which an enabled CPU GradScaler stands in for here.
    train.main(_train_args(small_cifar, tmp_path, "--stop-after", "1", "--train-subset", "128"))
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["scaler"] == {}
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: real("cpu", enabled=True))
    train.main(_train_args(small_cifar, tmp_path, "--train-subset", "128"))
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["scaler"]["scale"] > 0


@pytest.mark.slow
def test_a_foreign_file_in_out_is_refused_and_kept(small_cifar, tmp_path):
    export_encoder(build_encoder("resnet18_narrow", True)[0], str(tmp_path / "checkpoint.pth"))
    before = (tmp_path / "checkpoint.pth").read_bytes()
    with pytest.raises(SystemExit, match="not a train.py checkpoint"):
        train.main(_train_args(small_cifar, tmp_path))
    assert (tmp_path / "checkpoint.pth").read_bytes() == before
    torch.save({"args": argparse.Namespace(lr=0.1)}, tmp_path / "checkpoint.pth")
    with pytest.raises(SystemExit, match=r"^train.py: error: cannot read checkpoint .*: it is a "
                                         r"pickle holding argparse.Namespace objects, [^\n]*; "
                                         r"move it away to start afresh$"):
        train.main(_train_args(small_cifar, tmp_path))


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_message_and_keeps_the_checkpoint(small_cifar, tmp_path,
                                                                       monkeypatch):
    train.main(_train_args(small_cifar, tmp_path, "--stop-after", "1"))
    before = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    calls = []

    def diverging(*args, **kwargs):
        total, terms = spcl_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            terms["metric"] = torch.tensor(float("nan"))
            total = total * float("nan")
        return total, terms

    monkeypatch.setattr(models, "spcl_loss", diverging)
    with pytest.raises(SystemExit, match=r"non-finite loss at epoch 2 step 3/5: .*metric=nan"):
        train.main(_train_args(small_cifar, tmp_path))
    after = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert after["epoch"] == 1
    for key, value in before["model"].items():
        assert torch.equal(value, after["model"][key]), key


@pytest.mark.slow
def test_checkpoint_of_another_configuration_is_refused(small_cifar, tmp_path):
    train.main(_train_args(small_cifar, tmp_path, "--epochs", "1"))
    with pytest.raises(SystemExit, match="num_prototypes: checkpoint \\[8\\], now \\[4\\]"):
        train.main(_train_args(small_cifar, tmp_path, "--num-prototypes", "4"))
    with open(tmp_path / "checkpoint.pth", "r+b") as f:
        f.truncate(100)
    with pytest.raises(SystemExit, match="cannot read checkpoint"):
        train.main(_train_args(small_cifar, tmp_path))


def _jpeg_tree(root, classes, per_class, splits=("train", "test"), seed=0):
    """An ImageFolder tree of random 32 x 32 JPEGs, root/<split>/c<k>/<i>.jpg; returns root."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for k in range(classes):
            os.makedirs(root / split / f"c{k}")
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    root / split / f"c{k}" / f"{i}.jpg")
    return str(root)


def test_a_refused_run_leaves_no_out_folder_and_long_phases_show_progress(tmp_path, capsys):
    with pytest.raises(SystemExit, match="is not a directory"):
        train.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run" / "a")])
    assert os.listdir(tmp_path) == []                    # the probe of --out made nothing stay
    # The phases that take minutes at scale say so: a bar over the feature pass, a line per K.
    images = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8)
    dataset = data.InMemoryImages(images, torch.zeros(40, dtype=torch.int64), ["c"],
                                  *data.MEAN_STD["cifar10"])
    views = data.Views(dataset, 32, data.MEAN_STD["cifar10"])
    shard = cluster.split_shard(nn.Flatten(), views, 40, 0, 1, "cpu")
    run_kmeans(shard.features, 3, device="cpu")
    out, err = capsys.readouterr()
    assert "feature pass" in err and re.search(r"k-means K=3 of 40 rows \(faiss, cpu\): \d", out)


def test_download_without_network_creates_data_and_says_where_to_put_it(tmp_path, monkeypatch):
    def no_dns(*args, **kwargs):                 # what an offline machine answers
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    root = tmp_path / "data"                      # does not exist yet: --download creates it
    with pytest.raises(SystemExit) as stop:
        train.main(["--dataset", "cifar10", "--data", str(root), "--download", "--out",
                    str(tmp_path / "run")])
    assert root.is_dir()
    assert re.fullmatch(
        rf"train.py: error: could not download cifar10 into {re.escape(str(root))} "
        r"\(URLError: [^\n]*Name or service not known[^\n]*\); without network, put it there "
        r"yourself as ImageFolder trees train/<class>/\*.jpg and test/<class>/\*.jpg "
        r"\(or torchvision's cifar-10-batches-py/\)", stop.value.code), stop.value.code


def test_linear_eval_data_hint_has_no_download_flag(tmp_path):
    _spcl_checkpoint(tmp_path / "checkpoint.pth")
    with pytest.raises(SystemExit) as stop:
        linear_eval.main(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--data",
                          str(tmp_path / "dta"), "--knn"])
    assert re.fullmatch(r"linear_eval.py: error: --data '.*dta' is not a directory; give the "
                        r"folder that holds ImageFolder trees train/<class>/\*.jpg and "
                        r"test/<class>/\*.jpg \(or torchvision's cifar-10-batches-py/\)",
                        stop.value.code), stop.value.code


def test_a_truncated_jpeg_is_named(tmp_path):
    root = _jpeg_tree(tmp_path / "data", classes=2, per_class=4)
    bad = os.path.join(root, "train", "c1", "2.jpg")
    with open(bad, "rb") as f:
        blob = f.read()
    with open(bad, "wb") as f:
        f.write(blob[:len(blob) // 2])
    # In-memory CIFAR: decoded in train.py's process, one line.
    with pytest.raises(SystemExit) as stop:
        train.main(["--dataset", "cifar10", "--data", root, "--out", str(tmp_path / "run"),
                    "--workers", "1"])
    assert re.fullmatch(rf"train.py: error: cannot read image {re.escape(bad)}: "
                        r"[^\n]*truncated[^\n]*", stop.value.code, re.IGNORECASE), stop.value.code
    # On disk: read in a DataLoader worker, which wraps the error in its traceback; sentence() is
    # the line.
    folder = data.load_dataset("folder", root, train=True)
    loader = DataLoader(data.Transformed(folder, data.eval_transform(32)), batch_size=8,
                        num_workers=1)
    with pytest.raises(data.DataError) as caught:
        list(loader)
    assert "Traceback" in str(caught.value)
    assert re.fullmatch(rf"cannot read image {re.escape(bad)}: [^\n]*truncated[^\n]*",
                        caught.value.sentence(), re.IGNORECASE)


def test_an_unwritable_out_stops_before_any_data_is_loaded(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("a file where --out wants a folder")
    out = tmp_path / "file" / "run"
    loads = []
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: loads.append(args))
    with pytest.raises(SystemExit, match=rf"^train.py: error: --out '{re.escape(str(out))}' "
                                         r"cannot be written \(NotADirectoryError: "
                                         r"Not a directory\); give a folder you can write to$"):
        train.main(["--dataset", "cifar10", "--data", str(tmp_path), "--out", str(out)])
    _spcl_checkpoint(tmp_path / "checkpoint.pth")
    with pytest.raises(SystemExit, match=r"^linear_eval.py: error: --out .* cannot be written "
                                         r"\(NotADirectoryError"):
        linear_eval.main(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--data", str(tmp_path),
                          "--cached", "--out", str(out / "linear_eval.jsonl")])
    assert loads == []


@pytest.mark.slow
def test_resume_drops_a_torn_line_says_when_finished_and_guards_the_schedule(small_cifar, tmp_path,
                                                                             monkeypatch, capsys):
    args = _train_args(small_cifar, tmp_path, "--train-subset", "128", "--warmup-epochs", "0")
    train.main(args + ["--stop-after", "1"])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "loss_total": 7.4')      # a crash while epoch 2 was appended
    capsys.readouterr()
    train.main(args)
    assert ("metrics.jsonl: dropped its half-written last line '{\"epoch\": 2, \"loss_total\": 7.4'"
            in capsys.readouterr().out)
    assert [r["epoch"] for r in _metrics(tmp_path)] == [1, 2]
    assert set(os.listdir(tmp_path)) == {"checkpoint.pth", "checkpoint.prev.pth",  # no temporary
                                         "metrics.jsonl"}                          # left

    # Finished: said before any data is loaded. --knn-every does not re-plan the schedule.
    saved = (tmp_path / "checkpoint.pth").read_bytes()
    loads = []
    real_load = data.load_dataset
    monkeypatch.setattr(data, "load_dataset", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    train.main(args + ["--knn-every", "1"])
    assert capsys.readouterr().out.startswith(
        f"{tmp_path} is finished: {tmp_path / 'checkpoint.pth'} holds epoch 2 of 2, nothing to do")
    with pytest.raises(SystemExit, match=r"checkpoint.pth was trained on another learning-rate "
                                         r"schedule \(--epochs 2 -> 3\); "
                                         r".* add --allow-schedule-change"):
        train.main(args + ["--epochs", "3"])
    assert loads == [] and (tmp_path / "checkpoint.pth").read_bytes() == saved
    train.main(args + ["--epochs", "3", "--allow-schedule-change"])
    # 2 steps per epoch, lr 1.0 x 64 / 256, no warm-up: the cosine over 4 steps ended at step 3; the
    # one over 6 steps goes on from step 4.
    old, new = (0.25 * 0.5 * (1 + math.cos(math.pi * 3 / 4)),
                0.25 * 0.5 * (1 + math.cos(math.pi * 4 / 6)))
    assert (f"warning: the learning-rate schedule is re-planned (--epochs 2 -> 3): the lr goes "
            f"from {old:.4g} at the checkpoint's last step to "
            f"{new:.4g} now") in capsys.readouterr().out
    assert [r["epoch"] for r in _metrics(tmp_path)] == [1, 2, 3]

    # A damaged line before the last is not guessed at: it is named, and the file is kept.
    damaged = "garbage\n" + "".join(
        (tmp_path / "metrics.jsonl").read_text().splitlines(keepends=True)[1:])
    (tmp_path / "metrics.jsonl").write_text(damaged)
    with pytest.raises(SystemExit, match=r"metrics.jsonl line 1 is not a JSON line of train.py; "
                                         r"repair or delete"):
        train.main(args + ["--epochs", "4", "--allow-schedule-change"])
    assert (tmp_path / "metrics.jsonl").read_text() == damaged


@pytest.mark.slow
def test_ctrl_c_ends_in_one_line_that_says_how_to_resume(small_cifar, tmp_path):
    proc = subprocess.Popen([sys.executable, "train.py",
                             *_train_args(small_cifar, tmp_path, "--epochs", "50",
                                          "--train-subset", "128")],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # A shell without job control starts background jobs with SIGINT
                            # ignored (`pytest &`, nohup), and Python keeps it so: restore it.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while (not os.path.exists(tmp_path / "checkpoint.pth") and time.time() < deadline
               and proc.poll() is None):
            time.sleep(0.1)
        assert os.path.exists(tmp_path / "checkpoint.pth"), "no checkpoint after the first epoch"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    saved = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"]
    last = [line for line in err.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert re.fullmatch(rf"train.py: interrupted in epoch {saved + 1}/50 "
                        r"(at step [12]/2|before its first step); the last checkpoint is "
                        rf"{re.escape(str(tmp_path / 'checkpoint.pth'))} \(after epoch {saved}\); "
                        "run the same command to resume", last), last


def test_one_class_metrics_have_no_nan_and_nmi_prev_compares_clusterings_only(tmp_path):
    root = _jpeg_tree(tmp_path / "data", classes=1, per_class=64, splits=("train",))
    args = ["--dataset", "cifar10", "--data", root, "--out", str(tmp_path / "run"), "--arch",
            "resnet18_narrow", "--epochs", "3", "--batch-size", "32", "--num-prototypes", "4",
            "--warmup-epochs", "1", "--proto-start-epoch", "1", "--workers", "1"]
    train.main(args + ["--stop-after", "1"])            # epoch 1 SimCLR; the prototypes start
                                                        # after resuming
    train.main(args)

    def no_constants(name):
        raise ValueError(f"{name} in metrics.jsonl")

    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line, parse_constant=no_constants) for line in f]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["images_seen"] for r in rows] == [64, 128, 192]  # epoch x the images of an epoch
    assert all(r["sim_tn"] is None and -1 <= r["sim_fn"] <= 1
               for r in rows)     # no pair of two classes
    assert "nmi_gt" not in rows[0] and "nmi_gt" in rows[1]
    assert "nmi_prev" not in rows[1] and 0 <= rows[2]["nmi_prev"] <= 1   # no k-means before epoch 2


def test_seeded_generators_are_distinct_per_stream_epoch_and_rank():
    def draws(*keys):
        return tuple(torch.randint(0, 2**31, (4,), generator=data.seeded_generator(*keys)).tolist())

    assert draws(0, data.TRAIN_VIEWS, 3, 5) == draws(0, data.TRAIN_VIEWS, 3, 5)      # reproducible
    # The old seed * 1000003 + epoch * 101 + rank (+ 7 for cluster views) gave the first six
    # one seed per pair: rank 101 = next epoch's rank 0, rank 7 = cluster views,
    # seed 1 = epoch 9901.
    keys = [(0, data.TRAIN_VIEWS, 0, 101), (0, data.TRAIN_VIEWS, 1, 0),
            (0, data.CLUSTER_VIEWS, 0, 0), (0, data.TRAIN_VIEWS, 0, 7),
            (1, data.TRAIN_VIEWS, 0, 0), (0, data.TRAIN_VIEWS, 9901, 2),
            (-1, data.TRAIN_VIEWS, 0, 0), (0, data.PROTO_HEADS, 0), (0, data.PROBE_VIEWS, 0, 0)]
    assert len({draws(*k) for k in keys}) == len(keys)


# ---------------------------------------------------------------------------------------------
# monitor.knn_top1: the weighted kNN
# ---------------------------------------------------------------------------------------------

def _naive_knn(train_features, train_targets, test_features, test_targets, k, t):
    """Wu et al.'s weighted vote, one test image at a time, in float64."""
    train_x = train_features.double().numpy()
    train_norms = np.linalg.norm(train_x, axis=1)
    correct = 0
    for q, y in zip(test_features.double().numpy(), test_targets.tolist()):
        sims = (train_x @ q / (train_norms * np.linalg.norm(q))).tolist()
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        scores = {}
        for i in nearest:
            label = int(train_targets[i])
            scores[label] = scores.get(label, 0.0) + math.exp(sims[i] / t)
        correct += max(scores, key=scores.get) == y
    return 100.0 * correct / len(test_targets)


def test_knn_hand_computed_toy_case():
    # Cosine similarities to q1 = [2, 0] are the x-coordinates of the unit vectors:
    # 1, .6, .6, 0, -1.
    # The second 0.6 is scaled by 3: cosine, not dot product, must ignore that.
    train_x = torch.tensor([[1.0, 0.0], [1.8, 2.4], [0.6, -0.8], [0.0, 1.0], [-1.0, 0.0]])
    train_y = torch.tensor([1, 0, 0, 2, 2])
    q1 = torch.tensor([[2.0, 0.0]])
    # k=3, t=0.1: class 1 scores e^10 = 22026, class 0 scores 2 e^6 = 807: a weighted vote says 1,
    # although a majority vote says 0.
    assert knn_top1(train_x, train_y, q1, torch.tensor([1]), k=3, temperature=0.1) == 100.0
    # k=3, t=1: class 1 e^1 = 2.72 < class 0 2 e^0.6 = 3.64.
    assert knn_top1(train_x, train_y, q1, torch.tensor([0]), k=3, temperature=1.0) == 100.0
    # k=1: only the nearest votes.
    assert knn_top1(train_x, train_y, q1, torch.tensor([1]), k=1, temperature=1.0) == 100.0
    # q2 = [-.6, -.8]: similarities -.6, -1, .28, -.8, .6. k=2: {.6 -> 2, .28 -> 0} says 2; k=200
    # (clamped to 5), t=1: class 2 e^.6 + e^-.8 = 2.27 > class 0 e^.28 + e^-1 = 1.69 > class 1 .55.
    q2 = torch.tensor([[-0.6, -0.8]])
    assert knn_top1(train_x, train_y, q2, torch.tensor([2]), k=2, temperature=1.0) == 100.0
    assert knn_top1(train_x, train_y, q2, torch.tensor([2]), k=200, temperature=1.0) == 100.0
    both = torch.cat([q1, q2])
    assert knn_top1(train_x, train_y, both, torch.tensor([1, 0]), k=3, temperature=0.1) == 50.0


@pytest.mark.parametrize("chunk", [7, 4096])
def test_knn_matches_naive_loop_in_fp16_blocks(chunk):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g)
    train_y, test_y = (torch.randint(0, 5, (300,), generator=g),
                       torch.randint(0, 5, (60,), generator=g))
    train_x = (centres[train_y] + 1.5 * torch.randn(300, 16, generator=g)).half()
    test_x = (centres[test_y] + 1.5 * torch.randn(60, 16, generator=g)).half()
    for k, t in ((20, 0.1), (7, 0.5)):
        expected = _naive_knn(train_x, train_y, test_x, test_y, k, t)
        assert 20 < expected < 100                           # a case that can tell right from wrong
        assert knn_top1(train_x, train_y, test_x, test_y, k=k, temperature=t,
                        chunk=chunk) == pytest.approx(expected)


def test_knn_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\[N, F\] and \[M, F\]"):
        knn_top1(torch.randn(4, 3), torch.zeros(4), torch.randn(2, 5), torch.zeros(2))
    with pytest.raises(ValueError, match="one target per feature"):
        knn_top1(torch.randn(4, 3), torch.zeros(3), torch.randn(2, 3), torch.zeros(2))


# ---------------------------------------------------------------------------------------------
# linear_eval.py: the probe on synthetic features
# ---------------------------------------------------------------------------------------------

def test_evaluate_matches_naive_top1_top5():
    g = torch.Generator().manual_seed(1)
    classifier = nn.Linear(8, 10)
    x, y = torch.randn(50, 8, generator=g), torch.randint(0, 10, (50,), generator=g)
    with torch.no_grad():
        logits = classifier(x)
    ranks = [sorted(range(10), key=lambda c: -float(row[c])) for row in logits]
    top1 = 100 * sum(r[0] == int(t) for r, t in zip(ranks, y)) / 50
    top5 = 100 * sum(int(t) in r[:5] for r, t in zip(ranks, y)) / 50
    assert evaluate(classifier, x, y, chunk=16) == pytest.approx((top1, top5))


def test_probe_reaches_95_percent_on_linearly_separable_features():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(10, 32, generator=g)

    def sample(n):
        y = torch.randint(0, 10, (n,), generator=g)
        return means[y] + 0.3 * torch.randn(n, 32, generator=g), y

    (train_x, train_y), (test_x, test_y) = sample(2000), sample(1000)
    torch.manual_seed(0)
    classifier = nn.Linear(32, 10)
    nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)

    def batches(epoch):
        for idx in torch.randperm(2000, generator=g).split(256):
            yield train_x[idx], train_y[idx]

    train_classifier(classifier, batches, epochs=10, steps_per_epoch=8, lr=0.1)
    top1, top5 = evaluate(classifier, test_x, test_y)
    assert top1 >= 95 and top5 >= top1


# ---------------------------------------------------------------------------------------------
# models.py: encoder loading and export
# ---------------------------------------------------------------------------------------------

def _spcl_checkpoint(path, arch="resnet18_narrow", dataset="cifar10", image_size=32, model=None):
    """A file in train.py's checkpoint.pth format; returns the model it holds."""
    model = model or SPCLModel(arch, image_size <= 64, [8])
    torch.save({"model": model.state_dict(),
                "config": {"arch": arch, "dataset": dataset, "image_size": image_size},
                "epoch": 3}, path)
    return model


def _with_bn_statistics(encoder, size):
    """BN running statistics that differ from their initial 0 and 1, so that export must
    carry them."""
    encoder.train()
    with torch.no_grad():
        encoder(torch.randn(4, 3, size, size))
    return encoder.eval()


def test_export_loads_into_torchvision_resnet50_strict_with_equal_features(tmp_path):
    encoder = _with_bn_statistics(build_encoder("resnet50", cifar_stem=False)[0], 64)
    export_encoder(encoder, str(tmp_path / "resnet50.pth"))
    reference = torchvision.models.resnet50()
    reference.fc = nn.Identity()                    # fc set aside: the export has none
    reference.load_state_dict(torch.load(tmp_path / "resnet50.pth", weights_only=True), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(encoder(x), reference.eval()(x), atol=1e-6)


def test_export_from_checkpoint_of_cifar_stem_roundtrips(tmp_path):
    model = SPCLModel("resnet18_narrow", cifar_stem=True, num_prototypes=[8])
    _with_bn_statistics(model.encoder, 32)
    _spcl_checkpoint(tmp_path / "checkpoint.pth", model=model)
    linear_eval.main(["--checkpoint", str(tmp_path / "checkpoint.pth"), "--export",
                      str(tmp_path / "enc.pth")])
    state = torch.load(tmp_path / "enc.pth", weights_only=True)
    assert not any(key.startswith("fc.") for key in state)
    network = build_encoder("resnet18_narrow", cifar_stem=True)[0]   # the CIFAR-stem model of
                                                                     # models.py
    network.load_state_dict(state, strict=True)
    loaded, info = load_encoder(str(tmp_path / "enc.pth"), arch="resnet18_narrow")
    assert info["cifar_stem"] and info["format"] == "torchvision"
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        h = model.encoder.eval()(x)
        assert torch.allclose(network.eval()(x), h, atol=1e-6)
        assert torch.allclose(loaded.eval()(x), h, atol=1e-6)


def test_plain_state_dict_with_fc_loads(tmp_path):
    network = torchvision.models.resnet18()
    torch.save(network.state_dict(), tmp_path / "tv.pth")                   # fc.* included
    encoder, info = load_encoder(str(tmp_path / "tv.pth"), arch="resnet18")
    assert not info["cifar_stem"] and info["feature_dim"] == 512
    assert torch.equal(encoder.conv1.weight, network.conv1.weight)


def test_export_never_destroys_a_file_nor_leaves_a_temporary_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    model = SPCLModel("resnet18_narrow", True, [8])
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 3,
                "config": {"arch": "resnet18_narrow", "dataset": "cifar10", "image_size": 32}},
               path)
    saved = path.read_bytes()
    run = lambda *extra: linear_eval.main(["--checkpoint", str(path), *extra])
    with pytest.raises(SystemExit, match=r"^linear_eval.py: error: --export '.*checkpoint.pth' "
                                         r"already holds a train.py checkpoint; give another "
                                         r"path, or add --force to replace it$"):
        run("--export", str(path))                         # the typo of a week's training
    with pytest.raises(SystemExit, match=r"^linear_eval.py: error: --export '.*' is a folder; "
                                         r"give a file path, such as .*_encoder.pth$"):
        run("--export", str(tmp_path))
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit, match=r"cannot be written \(NotADirectoryError"):
        run("--export", str(tmp_path / "file" / "encoder.pth"))

    def full_disk(obj, f):
        f.write(b"half an encoder")
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(torch, "save", full_disk)
        with pytest.raises(SystemExit, match=r"could not be written \(No space left on device\)"):
            run("--export", str(tmp_path / "encoder.pth"))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "file"]       # no .tmp behind
    run("--export", str(tmp_path / "encoder.pth"))
    with pytest.raises(SystemExit, match="already holds a file"):
        run("--export", str(tmp_path / "encoder.pth"))
    run("--export", str(tmp_path / "encoder.pth"), "--force")
    assert load_encoder(str(tmp_path / "encoder.pth"), arch="resnet18_narrow")[1]["cifar_stem"]
    # --out takes a .jsonl file or a folder: a JSON line appended to a checkpoint would break it.
    with pytest.raises(SystemExit, match=r"--out '.*checkpoint.pth' is a file, not a .jsonl file "
                                         r"or a folder"):
        run("--data", str(tmp_path), "--cached", "--out", str(path))
    assert path.read_bytes() == saved


def test_bad_checkpoints_get_clear_messages(tmp_path):
    expected = (r"; expected train.py's checkpoint.pth or a state dict of tensors "
                r"\(torch.save\(encoder.state_dict\(\)\)\)$")
    with pytest.raises(ValueError, match="does not exist"):
        load_encoder(str(tmp_path / "nothing.pth"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"'.*empty' is a folder, not a file" + expected):
        load_encoder(str(tmp_path / "empty"))
    _spcl_checkpoint(tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match=r"is a folder, not a file; did you mean "
                                         rf"{re.escape(str(tmp_path))}/checkpoint.pth\?$"):
        load_encoder(str(tmp_path))
    blob = (tmp_path / "checkpoint.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(blob[:len(blob) // 2])
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*truncated.pth: it is a "
                                         r"torch.save file cut short or damaged "
                                         r"\(an interrupted copy or download\?\)" + expected):
        load_encoder(str(tmp_path / "truncated.pth"))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*text.pth: it is not a "
                                         r"torch.save file" + expected):
        load_encoder(str(tmp_path / "text.pth"))
    torch.save({"args": argparse.Namespace(lr=0.1)}, tmp_path / "namespace.pth")
    with pytest.raises(ValueError) as caught:
        load_encoder(str(tmp_path / "namespace.pth"))
    assert re.search(r"namespace.pth: it is a pickle holding argparse.Namespace objects, .*"
                     + expected, str(caught.value))
    assert "weights_only=False" not in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="resnet18_narrow encoder .* but --arch resnet50"):
        load_encoder(str(tmp_path / "checkpoint.pth"), arch="resnet50")
    with pytest.raises(ValueError, match="pre-trained on cifar10, but --dataset cifar100"):
        load_encoder(str(tmp_path / "checkpoint.pth"), dataset="cifar100")
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "tv.pth")
    with pytest.raises(ValueError, match="plain state dict.*--arch"):
        load_encoder(str(tmp_path / "tv.pth"))
    with pytest.raises(ValueError, match="does not fit a resnet34 .*missing keys .*layer1.2"):
        load_encoder(str(tmp_path / "tv.pth"), arch="resnet34")
    with pytest.raises(ValueError, match="does not fit a resnet50 .*another shape"):
        load_encoder(str(tmp_path / "tv.pth"), arch="resnet50")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds a list, neither"):
        load_encoder(str(tmp_path / "list.pth"))
    with pytest.raises(SystemExit, match="linear_eval.py: error: .*does not exist"):
        linear_eval.main(["--checkpoint", str(tmp_path / "nothing.pth"), "--knn"])


# ---------------------------------------------------------------------------------------------
# linear_eval.py on real CIFAR-10 images
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoders(small_cifar, tmp_path_factory):
    """{"fresh": a random encoder as a plain state dict, "pretrained": train.py's checkpoint.pth
    after one short epoch of SPCL}, with the extra flags each needs."""
    out = tmp_path_factory.mktemp("spcl_run")
    train.main(["--dataset", "cifar10", "--data", small_cifar, "--train-subset", "256",
                "--epochs", "1", "--batch-size", "64", "--arch", "resnet18_narrow",
                "--num-prototypes", "8", "--out", str(out), "--workers", "1"])
    torch.manual_seed(0)
    export_encoder(build_encoder("resnet18_narrow", cifar_stem=True)[0], str(out / "fresh.pth"))
    return {"fresh": [str(out / "fresh.pth"), "--arch", "resnet18_narrow", "--dataset", "cifar10"],
            "pretrained": [str(out / "checkpoint.pth")]}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cached", "augmented"])
@pytest.mark.parametrize("which", ["fresh", "pretrained"])
def test_linear_eval_on_real_cifar_leaves_the_encoder_alone(small_cifar, encoders, which, mode,
                                                            tmp_path, monkeypatch):
    seen = {}

    def spy(*args, **kwargs):                    # keep the very encoder main() trains against
        seen["encoder"], info = load_encoder(*args, **kwargs)
        return seen["encoder"], info

    monkeypatch.setattr(linear_eval, "load_encoder", spy)
    linear_eval.main(["--checkpoint", *encoders[which], "--data", small_cifar, "--subset", "200",
                      "--test-subset", "60", "--epochs", "2", "--batch-size", "64",
                      "--workers", "0", "--out", str(tmp_path)]
                     + (["--cached"] if mode == "cached" else []))
    with open(tmp_path / "linear_eval.jsonl") as f:
        (result,) = [json.loads(line) for line in f]
    assert result["mode"] == mode and result["encoder_unchanged"] is True
    assert result["train_images"] == 200 and result["test_images"] == 60
    assert result["lr"] == pytest.approx(0.1 * 64 / 256)
    assert 0 <= result["top1"] <= result["top5"] <= 100
    untouched, _ = load_encoder(encoders[which][0], arch="resnet18_narrow")
    for key, value in untouched.state_dict().items():        # BN running statistics included
        assert torch.equal(seen["encoder"].state_dict()[key].cpu(), value), key


@pytest.mark.slow
def test_knn_mode_matches_a_plain_forward_pass(small_cifar, encoders, tmp_path):
    result = linear_eval.main(["--checkpoint", *encoders["pretrained"], "--data", small_cifar,
                               "--knn", "--knn-k", "20", "--workers", "0",
                               "--out", str(tmp_path / "knn.jsonl")])
    encoder, _ = load_encoder(encoders["pretrained"][0])
    encoder.eval()
    features = {}
    for split in ("train", "test"):
        ds = data.load_dataset("cifar10", small_cifar, train=split == "train", workers=1)
        with torch.no_grad():
            features[split] = (encoder(torch.stack([ds[i][0] for i in range(len(ds))])), ds.targets)
    expected = _naive_knn(*features["train"], *features["test"], k=20, t=0.1)
    # main() stores features in fp16: a near-tie may flip, at most for one of the 80 test images.
    assert abs(result["knn_top1"] - expected) <= 100 / 80 + 1e-9
    with open(tmp_path / "knn.jsonl") as f:
        assert json.loads(f.readline())["knn_top1"] == result["knn_top1"]


@pytest.mark.slow
def test_augmented_probe_under_torchrun_with_two_processes(small_cifar, encoders, tmp_path):
    out = tmp_path / "result.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "linear_eval.py", "--checkpoint", *encoders["pretrained"],
               "--data", small_cifar, "--epochs", "1", "--batch-size", "64", "--workers", "0",
               "--out", str(out)]
    finished = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-2000:]
    with open(out) as f:
        (result,) = [json.loads(line) for line in f]          # one line: rank 0 alone writes
    assert (result["world_size"] == 2 and result["mode"] == "augmented"
            and result["encoder_unchanged"])
    assert 0 <= result["top1"] <= result["top5"] <= 100


# ---------------------------------------------------------------------------------------------
# experiments/: the report and the plot
# ---------------------------------------------------------------------------------------------

def _write_lines(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_report_reads_each_mode_by_name_and_says_what_it_skipped(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("report",
                                                  os.path.join(HERE, "experiments", "report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    epoch = {"epoch": 1, "knn_top1": 40.0, "sim_tp": 0.6, "sim_fn": 0.2, "images_seen": 512,
             "epoch_seconds": 60.0, "same_class_pairs": 0.3174}
    cached, augmented = {"mode": "cached", "top1": 45.0}, {"mode": "augmented", "top1": 41.0}
    _write_lines(tmp_path / "a" / "metrics.jsonl", [epoch])
    _write_lines(tmp_path / "a" / "linear_eval.jsonl",
                 [cached, augmented, {"mode": "knn", "knn_top1": 39.0}])
    _write_lines(tmp_path / "b" / "linear_eval.jsonl",
                 [{"mode": "knn", "knn_top1": 31.5}, {"mode": "cached", "top1": 30.0}])
    _write_lines(tmp_path / "c" / "linear_eval.jsonl", [{"mode": "knn", "knn_top1": 20.0}])
    os.makedirs(tmp_path / "d")
    _write_lines(tmp_path / "e" / "linear_eval.jsonl", [cached])
    with open(tmp_path / "e" / "linear_eval.jsonl", "a") as f:
        f.write('{"mode": "cac')
    report.main(str(tmp_path))
    out, err = capsys.readouterr()
    table = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in out.splitlines()
             if line.startswith("| ")}
    columns = table["row"]
    assert columns[:2] == ["kNN top-1", "linear top-1"]
    assert {name: cells[:2] for name, cells in table.items() if name != "row"} == {
        "a": ["40.00", "45.00"], "b": ["31.50", "30.00"]}
    same = columns.index("same-class pairs")
    assert table["a"][same] == "0.317" and table["b"][same] == "-"      # b has no metrics.jsonl
    assert table["a"][columns.index("train min")] == "1.00"
    assert err.splitlines() == [
        "report.py: skipped c: no linear_eval.py --cached result in its linear_eval.jsonl "
        "(only knn)",
        "report.py: skipped d: no linear_eval.jsonl (run linear_eval.py --cached --out on this "
        "folder)",
        f"report.py: skipped e: {tmp_path / 'e' / 'linear_eval.jsonl'} line 2 is not JSON"]
    report.main(str(tmp_path / "a"))                       # one run folder
    assert "| a | 40.00 | 45.00 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no finished run in .*d: a row is a folder with"):
        report.main(str(tmp_path / "d"))


def test_prototypes_script_scores_each_checkpoint_against_the_classes(small_cifar, tmp_path,
                                                                        capsys):
    spec = importlib.util.spec_from_file_location(
        "prototypes", os.path.join(HERE, "experiments", "prototypes.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    labels = torch.as_tensor(data.load_dataset("cifar10", small_cifar, train=True).targets)
    assert np.array_equal(script.train_targets("cifar10", small_cifar), labels.numpy())
    rng = np.random.default_rng(0)
    noisy = torch.where(torch.from_numpy(rng.random(len(labels)) < 0.5), labels,
                        torch.from_numpy(rng.integers(0, 10, len(labels))))
    runs = {"gt": labels, "noisy": noisy, "simclr": torch.arange(len(labels)),
            "subset": labels[:100]}
    for name, assignments in runs.items():
        torch.save({"config": {"dataset": "cifar10"}, "epoch": 7,
                    "assignments": assignments[:, None]}, tmp_path / f"{name}.pth")
    script.main(["--data", small_cifar]
                + [str(tmp_path / f"{name}.pth") for name in runs if name != "subset"])
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in capsys.readouterr().out
            .splitlines()[2:]}
    assert rows[str(tmp_path / "gt.pth")] == ["7", "10", "1.000", "1.000 |"]
    assert rows[str(tmp_path / "simclr.pth")] == ["7", "-", "no prototypes (SimCLR)", "- |"]
    # the noisy partition pair by pair: each prototype's share of same-class pairs, weighted by
    # its size
    shares = [sum(a == b for a, b in itertools.combinations(labels[noisy == k].tolist(), 2))
              / math.comb(int((noisy == k).sum()), 2) for k in range(10)]
    sizes = [int((noisy == k).sum()) for k in range(10)]
    want = sum(s * n for s, n in zip(shares, sizes)) / sum(sizes)
    assert rows[str(tmp_path / "noisy.pth")][3] == f"{want:.3f} |"
    assert 0.15 < want < 0.9                           # neither random (0.1) nor the classes
    with pytest.raises(SystemExit, match="100 assignments for 320 images; give the --data"):
        script.main(["--data", small_cifar, str(tmp_path / "subset.pth")])


def test_plot_without_matplotlib_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match="^plot.py needs matplotlib, which requirements.txt leaves "
                                         "out: pip install matplotlib$"):
        runpy.run_path(os.path.join(HERE, "experiments", "plot.py"), run_name="__main__")


@pytest.mark.slow
def test_gpu_check_runs_every_section_at_toy_sizes():
    # The GPU check waits for a session with a GPU: --smoke runs its sections on the CPU, so that
    # it does not rot meanwhile. Every section prints one JSON line and none reports an error.
    result = _run([sys.executable, os.path.join("experiments", "gpu_check.py"), "--smoke"],
                  timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    lines = [line for line in lines if "section" in line]      # not train.py's own epoch line
    assert [line["section"] for line in lines] == ["env", "step", "step", "step", "syncs",
                                                    "features", "cluster", "kmeans", "torchrun",
                                                    "pipeline", "decode", "decode"]
    assert not [line for line in lines if "error" in line], lines
    by_section = {line["section"]: line for line in lines}
    assert by_section["cluster"]["empty_clusters"] == 0 and by_section["cluster"]["k"] == 10
    kmeans = by_section["kmeans"]
    assert kmeans["torch_backend"] == "torch-cpu" and kmeans["nmi"] > 0.5
    assert by_section["torchrun"]["epochs"] == [1, 2] and by_section["torchrun"]["resumed"]
    assert 0 <= by_section["pipeline"]["idle_share"] < 1


# ---------------------------------------------------------------------------------------------
# The README, end to end
# ---------------------------------------------------------------------------------------------

# Tiny settings for the README's commands: one epoch of SPCL on 256 images, with the kNN monitor.
README_SCALE = {"train.py": {"--epochs": "1", "--proto-start-epoch": "0", "--knn-every": "1",
                             "--batch-size": "64", "--train-subset": "256", "--num-prototypes": "8",
                             "--warmup-epochs": "1", "--image-size": "32", "--workers": "1"},
                "linear_eval.py": {"--epochs": "1", "--batch-size": "64", "--workers": "0"}}


def _readme_steps():
    """The commands of the README's 'Set up, test, train' and 'Evaluate and export', in order:
    ("sh", argv) for each `python ...` line of a bash block, ("py", code) for a python block. Left
    out: pip (and the test command behind it), torchrun, and the lines that need what a test has
    not (a network: --download; data at /path/to/...)."""
    with open(os.path.join(HERE, "README.md")) as f:
        text = f.read()
    steps = []
    for section in ("## Set up, test, train\n", "## Evaluate and export\n"):
        body = text.split(section, 1)[1].split("\n## ", 1)[0]
        for language, block in re.findall(r"```(bash|python)\n(.*?)```", body, re.S):
            if language == "python":
                steps.append(("py", block))
                continue
            for line in block.replace("\\\n", " ").splitlines():
                argv = shlex.split(line, comments=True)
                if argv[:1] == ["python"] and "--download" not in argv and "/path/to/" not in line:
                    steps.append(("sh", argv))
    return steps


def _scaled(argv):
    argv = list(argv)
    if "--export" in argv:
        return argv
    for flag, value in README_SCALE.get(argv[1], {}).items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


# Runs the README's steps in one fresh interpreter, each as its own `__main__` with its own argv,
# in the copy of the repository: torch is imported once instead of once per command.
_README_RUNNER = """
import contextlib, io, json, runpy, sys, traceback
reports = []
for kind, step in json.loads(sys.argv[1]):
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if kind == "sh":
                sys.argv = step[1:]
                runpy.run_path(step[1], run_name="__main__")
            else:
                exec(compile(step, "README.md", "exec"), {"__name__": "__main__"})
        except SystemExit as e:
            code = e.code
        except BaseException:
            traceback.print_exc()
            code = 1
    reports.append({"step": step, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(reports))
"""


@pytest.mark.slow
def test_readme_walkthrough_end_to_end(small_cifar, tmp_path):
    """End to end: the README's commands, scaled down, in order on a fresh copy of the repository
    whose ./data is CIFAR-10 as a user has it (an ImageFolder tree of real JPEGs, few of them).
    Every train.py command is run twice: the second time it must say the run is finished."""
    clone = tmp_path / "clone"
    shutil.copytree(HERE, clone, ignore=shutil.ignore_patterns(
        ".git", "runs", "data", "results", "__pycache__", ".pytest_cache", ".pytest_tmp", "*.pth"))
    os.symlink(small_cifar, clone / "data")
    steps = []
    for kind, step in _readme_steps():
        repeats = 2 if kind == "sh" and step[1] == "train.py" else 1
        steps += [(kind, _scaled(step) if kind == "sh" else step)] * repeats
    assert [step[1] for kind, step in steps if kind == "sh"] == [
        "train.py", "train.py", "linear_eval.py", "linear_eval.py", "linear_eval.py",
        "experiments/report.py", "linear_eval.py"]
    done = subprocess.run([sys.executable, "-c", _README_RUNNER, json.dumps(steps)], cwd=clone,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = json.loads(done.stdout.splitlines()[-1])
    for report in reports:
        assert report["code"] in (0, None) and "Traceback" not in report["stderr"], report
    outputs = [report["stdout"] for report in reports]
    assert ("runs/cpu_spcl is finished: runs/cpu_spcl/checkpoint.pth holds epoch 1 of 1, "
            "nothing to do" in outputs[1])
    with open(clone / "runs" / "cpu_spcl" / "linear_eval.jsonl") as f:
        results = [json.loads(line) for line in f]
    assert [r["mode"] for r in results] == ["cached", "augmented", "knn"]
    assert all(r["checkpoint_epoch"] == 1 and r["train_images"] == 320 for r in results)
    row = re.search(r"^\| cpu_spcl \| (\S+) \| (\S+) \|", outputs[5], re.M)
    assert row and float(row[2]) == pytest.approx(results[0]["top1"],
                                                  abs=0.005)     # the --cached result
    assert float(row[1]) == pytest.approx(_metrics(clone / "runs" / "cpu_spcl")[-1]["knn_top1"],
                                          abs=0.005)
    assert outputs[-1].strip() == "torch.Size([2, 128])"  # the export, loaded


# ---------------------------------------------------------------------------------------------
# data.py: the batched SimCLR augmentation against torchvision's per-image transforms
# ---------------------------------------------------------------------------------------------



@pytest.mark.parametrize("op,name,low,high", [
    (0, "adjust_brightness", 0.6, 1.4), (1, "adjust_contrast", 0.6, 1.4),
    (2, "adjust_saturation", 0.6, 1.4), (3, "adjust_hue", -0.1, 0.1)])
def test_colour_jitter_operations_match_torchvision(op, name, low, high):
    g = torch.Generator().manual_seed(op)
    x = torch.rand(6, 3, 9, 7, generator=g)
    factor = torch.empty(6).uniform_(low, high, generator=g)
    expected = torch.stack([getattr(TF, name)(x[i], float(factor[i])) for i in range(6)])
    assert torch.allclose(data.adjust(x.clone(), op, factor), expected, atol=1e-5)


def test_crop_resize_matches_torchvision_resized_crop():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    same = data.crop_resize(x, torch.tensor([[0.0, 0, 32, 32], [0, 0, 32, 32]]), 32)
    assert torch.allclose(same, x, atol=1e-6)                       # the whole image: untouched
    box = (5, 3, 16, 12)                                            # x1, y1, w, h: enlarged to 32
    got = data.crop_resize(x[:1], torch.tensor([[5.0, 3, 21, 15]]), 32)[0]
    expected = TF.resized_crop(x[0], top=3, left=5, height=12, width=16, size=[32, 32],
                               antialias=False)
    # Inside the crop both sample the same points; at its border roi_align may read the pixel
    # just outside the crop where torchvision clamps, so compare the interior.
    assert torch.allclose(got[:, 2:-2, 2:-2], expected[:, 2:-2, 2:-2], atol=1e-5), box


def test_crop_boxes_follow_torchvision_random_resized_crop():
    n, H, W = 4000, 32, 32
    boxes = data.BatchAugment(32, data.MEAN_STD["cifar10"]).crop_boxes(
        n, H, W, torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert ((boxes[:, :2] >= 0).all() and (boxes[:, 2] <= W).all() and (boxes[:, 3] <= H).all()
            and (w >= 1).all())
    torch.manual_seed(0)
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(3, H, W), [0.08, 1.0],
                                                       [3 / 4, 4 / 3])
                        for _ in range(n)], dtype=torch.float32)          # (top, left, h, w)
    for ours, theirs in [(w * h / (H * W), ref[:, 2] * ref[:, 3] / (H * W)),
                         (torch.log(w / h), torch.log(ref[:, 3] / ref[:, 2])),
                         (boxes[:, 0], ref[:, 1])]:
        assert abs(ours.mean() - theirs.mean()) < 4 * theirs.std() / math.sqrt(n) + 0.01
        assert abs(ours.std() - theirs.std()) < 0.1 * theirs.std()


def test_batch_augment_output():
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    augment = data.BatchAugment(24, data.MEAN_STD["cifar10"])
    a = augment(images, torch.Generator().manual_seed(1))
    b = augment(images, torch.Generator().manual_seed(1))
    assert (a.shape == (16, 3, 24, 24) and a.dtype == torch.float32
            and torch.equal(a, b))    # reproducible
    assert not torch.equal(a, augment(images, torch.Generator().manual_seed(2)))


def _shift_hue_before(x, shift):
    """data._shift_hue as it was before it dropped torch.where, max(1)'s indices and %."""
    r, g, b = x.unbind(1)
    maxc, argmax = x.max(1)
    minc = x.min(1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.stack([(g - b) / safe, 2 + (b - r) / safe, 4 + (r - g) / safe], 1).gather(
        1, argmax[:, None])[:, 0]
    hue = torch.where(delta > 0, hue / 6, torch.zeros_like(hue))
    hue = (hue + shift.view(-1, 1, 1)) % 1.0
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)),
                      torch.zeros_like(maxc))
    n = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)
    k = (n + 6 * hue[:, None]) % 6
    return maxc[:, None] - (maxc * sat)[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _batch_augment_before(images, generator, size, mean_std, strength):
    """BatchAugment.__call__ as it was before crop and colour were split and made faster (commit
    c9d87b2), with the parts that did not change (crop_boxes, crop_resize, _gray) called."""
    B, H, W, _ = images.shape
    augment = data.BatchAugment(size, mean_std, strength)
    x = data.crop_resize(images.permute(0, 3, 1, 2).float().div_(255),
                         augment.crop_boxes(B, H, W, generator), size)
    flip = torch.rand(B, generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    bri, con, sat, hue = augment.jitter
    apply = torch.rand(B, generator=generator) < 0.8
    factors = torch.stack([torch.empty(B).uniform_(1 - bri, 1 + bri, generator=generator),
                           torch.empty(B).uniform_(1 - con, 1 + con, generator=generator),
                           torch.empty(B).uniform_(1 - sat, 1 + sat, generator=generator),
                           torch.empty(B).uniform_(-hue, hue, generator=generator)], 1)
    order = torch.rand(B, 4, generator=generator).argsort(1)
    for step in range(4):
        for op in range(4):
            idx = torch.nonzero(apply & (order[:, step] == op))[:, 0]
            if len(idx) == 0:
                continue
            v, f = x[idx], factors[idx, op].view(-1, 1, 1, 1)
            if op == 0:
                v = v * f
            elif op == 1:
                v = f * v + (1 - f) * data._gray(v).mean((2, 3), keepdim=True)
            elif op == 2:
                v = f * v + (1 - f) * data._gray(v)
            else:
                v = _shift_hue_before(v, factors[idx, op])
            x[idx] = v.clamp_(0, 1)
    gray = (torch.rand(B, generator=generator) < 0.2).view(-1, 1, 1, 1)
    x = torch.where(gray, data._gray(x).expand_as(x), x)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in mean_std)
    return (x - mean) / std


def test_batch_augment_gives_the_views_it_gave_before_its_split():
    # The in-memory (CIFAR) views, bit for bit those of the code before BatchAugment was split
    # into crop and colour and its hue, jitter and grayscale made faster: directly, and through
    # Views with a key tuple (batch b from seeded_generator(*key, b)). Images of few levels tie
    # channels often, where the hue's sextant must come from the first maximal channel.
    g = torch.Generator().manual_seed(0)
    mean_std = data.MEAN_STD["cifar10"]
    for case, (B, H, size, strength) in enumerate([(1, 32, 32, 0.5), (16, 32, 32, 0.5),
                                                   (64, 24, 28, 1.0), (7, 40, 32, 0.25)]):
        images = torch.randint(0, 256, (B, H, H, 3), dtype=torch.uint8, generator=g)
        if case % 2:
            images = images // 64 * 85                                     # levels 0, 85, 170, 255
        stream = lambda: torch.Generator().manual_seed(case)
        assert torch.equal(data.BatchAugment(size, mean_std, strength)(images, stream()),
                           _batch_augment_before(images, stream(), size, mean_std, strength)), case
    x = torch.rand(6, 3, 9, 9, generator=g)
    x[:, :, :3] = (x[:, :, :3] * 2).round() / 2                            # ties, 0 and 1
    for shift in (torch.zeros(6), torch.linspace(-0.5, 0.5, 6)):
        assert torch.equal(data._shift_hue(x, shift), _shift_hue_before(x, shift))
    images = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8, generator=g)
    dataset = data.InMemoryImages(images, torch.zeros(40, dtype=torch.int64), ["a"], *mean_std)
    batches = [torch.randperm(40, generator=g)[:16] for _ in range(3)]
    views = data.Views(dataset, 32, mean_std, jitter=0.5)
    for b, ((x1, x2), _, idx) in enumerate(views.batches(batches, "simclr", key=(1, 0, 2, 0),
                                                         copies=2, start=5), 5):
        stream = data.seeded_generator(1, 0, 2, 0, b)
        for x in (x1, x2):
            assert torch.equal(x, _batch_augment_before(images[idx], stream, 32, mean_std, 0.5))
