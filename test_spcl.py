"""Tests for the SPCL reference implementation: `python -m pytest -q test_spcl.py`.

Every check compares against an independent computation: a naive loop written from the equation
in ../shared/SPEC.md, a hand-computed case, or a second code path (world size 1 against 2).
Tests that need the real CIFAR-10 images in ../shared/data/cifar10 skip without them.
"""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torchvision

from lars import LARS
from losses import (nt_xent, prototype_ce, siamese_metric_loss, siamese_pairs, spcl_loss,
                    symmetric_ce)

HERE = os.path.dirname(os.path.abspath(__file__))
CIFAR10 = os.path.join(HERE, "..", "shared", "data", "cifar10")


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
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
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
    loss = nt_xent(ddp(x1[mine]), ddp(x2[mine]), temperature=0.3)
    loss.backward()
    torch.save({"loss": loss.detach(), "grads": [p.grad for p in model.parameters()]},
               os.path.join(out_dir, f"rank{rank}.pt"))


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
    assert torch.allclose(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(ref, logits)[0], atol=1e-6)
    for alpha, beta, log_zero in [(0.1, 1.0, math.log(1e-4)), (0.7, 0.3, -2.0)]:
        loss = symmetric_ce(logits, targets, alpha, beta, log_zero)
        ref = _naive_sce(logits, targets, alpha, beta, log_zero)
        assert torch.allclose(loss.double(), ref, atol=1e-6, rtol=0)
        assert torch.allclose(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(ref, logits)[0], atol=1e-6)


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


def _spcl_inputs(P=4, F=6, D=3, heads=(5, 3)):
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(2 * P, D, generator=g), torch.randn(2 * P, D, generator=g)
    h1, h2 = torch.randn(2 * P, F, generator=g), torch.randn(2 * P, F, generator=g)
    same = torch.randint(0, 2, (P,), generator=g)
    protos = torch.stack([torch.randint(0, k, (2 * P,), generator=g) for k in heads], dim=1)
    return z1, z2, h1, h2, same, protos, nn.Linear(F, 1), [nn.Linear(F, k) for k in heads]


def test_spcl_loss_is_the_weighted_sum_of_the_terms():
    z1, z2, h1, h2, same, protos, metric_head, proto_heads = _spcl_inputs()
    total, terms = spcl_loss(z1, z2, h1, h2, same, protos, metric_head, proto_heads,
                             w_con=0.5, w_metric=0.1, w_proto=2.0, temperature=0.2, proto_loss="sce")
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
    total, terms = spcl_loss(z1, z2, h1, h2, same, protos, _MustNotRun(), [_MustNotRun()],
                             w_metric=0, w_proto=0)
    assert set(terms) == {"con"}
    assert torch.allclose(total, nt_xent(z1, z2))


@pytest.mark.parametrize("call,message", [
    (lambda: nt_xent(torch.randn(4, 3), torch.randn(4, 2)), "must both be"),
    (lambda: nt_xent(torch.randn(1, 3), torch.randn(1, 3)), "at least 2"),
    (lambda: nt_xent(torch.tensor([[1.0, float("nan")], [0, 1]]), torch.randn(2, 2)), "NaN or Inf"),
    (lambda: nt_xent(torch.randn(4, 3), torch.randn(4, 3), temperature=0), "temperature"),
    (lambda: siamese_metric_loss(nn.Linear(3, 1), torch.randn(4, 3), torch.randn(5, 3), torch.ones(4)), "must both be"),
    (lambda: siamese_metric_loss(nn.Linear(3, 1), torch.randn(4, 3), torch.randn(4, 3), torch.ones(3)), "same must be"),
    (lambda: siamese_metric_loss(nn.Linear(3, 1), torch.randn(4, 3), torch.randn(4, 3), torch.full((4,), 2)), "only 0 and 1"),
    (lambda: siamese_metric_loss(nn.Linear(3, 1), torch.full((4, 3), float("inf")), torch.randn(4, 3), torch.ones(4)), "NaN or Inf"),
    (lambda: prototype_ce(torch.randn(4, 3), torch.tensor([0, 1, 2, 3])), r"\[0, 3\)"),
    (lambda: prototype_ce(torch.randn(4, 3), torch.tensor([0, 1, 2])), "targets must be"),
    (lambda: prototype_ce(torch.randn(0, 3), torch.zeros(0, dtype=torch.long)), "at least 1"),
    (lambda: symmetric_ce(torch.full((2, 3), float("nan")), torch.tensor([0, 1])), "NaN or Inf"),
    (lambda: symmetric_ce(torch.randn(2, 3), torch.tensor([0.0, 1.0])), "integer"),
    (lambda: spcl_loss(*_spcl_inputs()[:7], [nn.Linear(6, 5)]), r"prototypes must be \[2P, H\]"),
    (lambda: spcl_loss(*_spcl_inputs(), proto_loss="focal"), "proto_loss"),
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


def test_lars_rejects_negative_hyper_parameters():
    with pytest.raises(ValueError, match="lr"):
        LARS(nn.Linear(2, 2).parameters(), lr=-1)
