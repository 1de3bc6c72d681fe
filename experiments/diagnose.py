"""Diagnostics of train.py checkpoints: how precise prototypes can be at this encoder's quality,
and what the prototype terms do to the encoder (the questions behind the forked rows of
results/README.md).

    python experiments/diagnose.py --data ../shared/data/cifar10 --out results/diagnostics \
        trunk_s0_e10=results/cifar10_fork/trunk_s0/checkpoint.pth

For each NAME=CHECKPOINT, on the whole training set, in eval mode unless said otherwise:
- clustering: for k-means of h (the encoder's features) and of z (the projection's), at each
  --pca-dims and --ks, the pair precision (the share of same-prototype pairs of one class: the
  positives Eq. 3 pulls together, monitor.same_class_pairs) and the NMI with the classes;
- the ceiling: the share of images whose r-th nearest neighbour (cosine, r = 1..50) is of their
  class, in h and in z: a sampler of same-prototype pairs cannot be much more precise than the
  neighbours the features give it;
- the similarity probe of Fig. 2b (TP / FN / TN) on z and on h;
- the cached linear probe on h as linear_eval.py --cached runs it, and on h standardised per
  dimension (a direction of small variance counts as much as one of large);
- gradients: over --grad-steps pair batches of the checkpoint's prototypes (or, for a SimCLR
  checkpoint, of a k-means with the first of --ks), the norm of each term of Eq. 5 (weighted) on
  the encoder's weights and its cosine with NT-Xent's, whole and per layer: LARS steps each layer
  by its own gradient's direction, so a term turns the encoder's step when it turns these. The
  encoder stays at the checkpoint's weights (train mode, as in training) while the prototype
  heads train on their own SGD as in train.py; a checkpoint without heads starts them as a fork
  does (a fresh metric head, prototype heads N(0, 0.01)). Loss flags: the checkpoint's, or for a
  SimCLR checkpoint SPCL's defaults at --w-con.
Writes OUT/NAME.json and prints a summary table.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cluster   # noqa: E402
import data      # noqa: E402
import monitor   # noqa: E402
from losses import spcl_loss                 # noqa: E402
from models import SPCLModel                 # noqa: E402
from sampler import PrototypePairSampler     # noqa: E402


def load_model(path):
    """(SPCLModel with the checkpoint's weights and heads, the checkpoint)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    config = ckpt["config"]
    model = SPCLModel(config["arch"], config["image_size"] <= 64,
                      num_prototypes=config["num_prototypes"] if config["w_proto"] else (),
                      heads_on=config.get("heads_on", "h"))
    if not config["w_metric"]:
        model.metric_head = None
    model.load_state_dict(ckpt["model"])
    return model, ckpt


@torch.no_grad()
def features(model, views, n, batch=1024):
    """h [n, F] and z [n, D] (float32) of the evaluation view, in index order."""
    hs, zs = [], []
    for x, _, _ in views.batches(torch.arange(n).split(batch), "eval"):
        h, z = model(x)
        hs.append(h.float())
        zs.append(z.float())
    return torch.cat(hs), torch.cat(zs)


@torch.no_grad()
def neighbour_rates(x, targets, k=50, chunk=2048):
    """[k]: the share of images whose r-th nearest neighbour (cosine, itself left out) shares
    their class, r = 1..k."""
    x = nn.functional.normalize(x, dim=1)
    same = torch.zeros(k, dtype=torch.float64)
    for start in range(0, len(x), chunk):
        sim = x[start:start + chunk] @ x.T                                    # c x N
        rows = torch.arange(len(sim))
        sim[rows, rows + start] = -math.inf
        idx = sim.topk(k, dim=1).indices                                      # c x k
        same += (targets[idx] == targets[start:start + chunk, None]).sum(0).double()
    return (same / len(x)).tolist()


def clustering(x, targets, ks, pca_dims, seed):
    """{f"pca{d}_k{K}": {pair_precision, nmi, seconds}} of k-means of x [N, D]."""
    out = {}
    for d in pca_dims:
        for k, (assignments, _, stats) in zip(ks, cluster.run_kmeans_multi(
                x, ks, seed=seed, pca_dim=d)):
            out[f"pca{d}_k{k}"] = {
                "pair_precision": monitor.same_class_pairs(assignments, targets),
                "nmi": monitor.nmi(assignments, targets), "pca_dim": stats["pca_dim"],
                "seconds": stats["seconds"] + stats["preprocess_seconds"]}
    return out


def probes(h, targets, test_h, test_targets, epochs, seed):
    """Top-1 of the cached linear probe on h, raw and standardised with the train statistics."""
    mean, std = h.mean(0), h.std(0).clamp_min(1e-6)
    out = {}
    for name, (train_x, test_x) in (("raw", (h, test_h)),
                                    ("standardised", ((h - mean) / std, (test_h - mean) / std))):
        out[name] = monitor.cached_probe(train_x, targets, test_x, test_targets,
                                         num_classes=int(targets.max()) + 1, epochs=epochs,
                                         seed=seed)[0]
    return out


def gradients(model, ckpt, views, targets, args):
    """Per step and term, the encoder gradient's norm and cosines with NT-Xent's (see the
    module docstring); returns the per-step rows and their means."""
    config = ckpt["config"]
    has_heads = bool(config["w_metric"] or config["w_proto"]) and (
        ckpt["epoch"] > config["proto_start_epoch"])          # its prototypes had started
    settings = dict(w_con=config["w_con"], w_metric=config["w_metric"], w_proto=config["w_proto"],
                    contrast=config["contrast"], temperature=config["temperature"],
                    proto_loss=config["proto_loss"])
    if has_heads:
        assignments = ckpt["assignments"]
    else:                                       # a SimCLR checkpoint: what a fork starts with
        settings.update(w_con=args.w_con, w_metric=1.0, w_proto=1.0, contrast="per-side")
        h, _ = features(model.eval(), views, len(targets))
        assignments = torch.from_numpy(cluster.run_kmeans(
            h, args.ks[0], seed=args.seed, pca_dim=min(256, h.shape[1] // 2))[0])[:, None]
        torch.manual_seed(args.seed)
        fresh = SPCLModel(config["arch"], config["image_size"] <= 64, [args.ks[0]],
                          heads_on=model.heads_on)
        fresh.load_state_dict({k: v for k, v in model.state_dict().items()
                               if not k.startswith("metric_head.")}, strict=False)
        fresh.reset_proto_heads(data.seeded_generator(args.seed, data.PROTO_HEADS, 0))
        model = fresh
    model.train()
    heads = torch.optim.SGD(model.proto_heads.parameters(),
                            lr=config["head_lr"] * config["batch_size"] / 256,
                            weight_decay=config["weight_decay"])
    sampler = PrototypePairSampler(assignments[:, 0], args.batch_size, seed=args.seed)
    weights = [(n, p) for n, p in model.encoder.named_parameters() if p.ndim > 1]
    terms = [t for t, w in (("con", "w_con"), ("metric", "w_metric"), ("proto", "w_proto"))
             if settings[w]]
    batches = views.batches(([t[0] for t in b] + [t[1] for t in b] for b in sampler), "simclr",
                            key=(args.seed, data.TRAIN_VIEWS, 0, 0), copies=2)
    rows = []
    for step, ((v1, v2), _, idx) in enumerate(batches):
        if step == args.grad_steps:
            break
        P = len(idx) // 2
        batch_assignments = assignments[idx]
        same = (batch_assignments[:P, 0] == batch_assignments[P:, 0]).long()
        h, z = model(torch.cat([v1, v2]))
        h1, h2 = h.float().chunk(2)
        z1, z2 = z.float().chunk(2)
        if model.heads_on == "z":
            h1, h2 = z1, z2
        grads, losses = {}, {}
        for term in terms:
            only = {w: (settings[w] if w == f"w_{term}" else 0.0)
                    for w in ("w_con", "w_metric", "w_proto")}
            loss, _ = spcl_loss(z1, z2, h1, h2, same=same, assignments=batch_assignments,
                                metric_head=model.metric_head, proto_heads=model.proto_heads,
                                temperature=settings["temperature"],
                                contrast=settings["contrast"], proto_loss=settings["proto_loss"],
                                **only)
            losses[term] = loss
            grads[term] = torch.autograd.grad(loss, [p for _, p in weights], retain_graph=True)
        if "proto" in terms:
            heads.zero_grad(set_to_none=True)
            losses["proto"].backward(inputs=list(model.proto_heads.parameters()))
            heads.step()
        total = [sum(g[i] for g in grads.values()) for i in range(len(weights))]
        row = {"step": step + 1}
        flat = {t: torch.cat([g.flatten() for g in grads[t]]) for t in terms}
        flat["total"] = torch.cat([g.flatten() for g in total])
        for t, g in flat.items():
            row[f"norm_{t}"] = float(g.norm())
            if t != "con" and "con" in flat:
                row[f"cos_{t}_con"] = float(nn.functional.cosine_similarity(g, flat["con"], 0))
                per_layer = [float(nn.functional.cosine_similarity(
                    (total if t == "total" else grads[t])[i].flatten(), grads["con"][i].flatten(),
                    0)) for i in range(len(weights))]
                row[f"layer_cos_{t}_con"] = float(np.mean(per_layer))
        row.update({f"loss_{t}": v.item() for t, v in losses.items()})
        rows.append(row)
    keys = [k for k in rows[0] if k != "step"]
    last = rows[-max(1, len(rows) // 5):]
    return {"settings": settings, "heads": "checkpoint's" if has_heads else "fresh",
            "steps": rows, "mean": {k: float(np.mean([r[k] for r in rows])) for k in keys},
            "mean_last": {k: float(np.mean([r[k] for r in last])) for k in keys}}


def diagnose(name, path, args):
    start = time.time()
    model, ckpt = load_model(path)
    model.eval()
    config = ckpt["config"]
    mean_std = data.MEAN_STD[config["dataset"]]
    train_set = data.load_dataset(config["dataset"], args.data, train=True)
    test_set = data.load_dataset(config["dataset"], args.data, train=False)
    views = data.Views(train_set, config["image_size"], mean_std, config["jitter"])
    test_views = data.Views(test_set, config["image_size"], mean_std)
    targets = torch.as_tensor(train_set.targets)
    test_targets = torch.as_tensor(test_set.targets)
    h, z = features(model, views, len(targets))
    test_h, _ = features(model, test_views, len(test_targets))
    result = {"name": name, "checkpoint": path, "epoch": ckpt["epoch"],
              "config": {k: config.get(k) for k in ("w_con", "w_metric", "w_proto", "contrast",
                                                     "heads_on", "prototypes", "num_prototypes",
                                                     "proto_start_epoch", "seed")}}
    result["neighbours"] = {"h": neighbour_rates(h, targets), "z": neighbour_rates(z, targets)}
    print(f"{name}: neighbours {time.time() - start:.0f} s", flush=True)
    result["clustering"] = {space: clustering(x, targets.numpy(), args.ks, args.pca_dims,
                                              args.seed) for space, x in (("h", h), ("z", z))}
    print(f"{name}: clustering {time.time() - start:.0f} s", flush=True)
    result["similarity"] = monitor.similarity_probe(model, views, targets, torch.device("cpu"))
    result["linear_probe"] = probes(h, targets, test_h, test_targets, args.probe_epochs,
                                    args.seed)
    print(f"{name}: probes {time.time() - start:.0f} s", flush=True)
    if args.grad_steps:
        result["gradients"] = gradients(model, ckpt, views, targets, args)
    result["seconds"] = time.time() - start
    return result


def summary(results):
    """The markdown tables of results: one row per checkpoint."""
    lines = ["| checkpoint | epoch | NN rate r=1 / 10 / 50 (h) | same (z) | best pair precision "
             "(h) | at | linear raw / std | TP / FN sim z | TP / FN sim h | grad norm con / "
             "metric / proto | cos(total, con) whole / per layer |", "|---" * 11 + "|"]
    for r in results:
        nn_h, nn_z = r["neighbours"]["h"], r["neighbours"]["z"]
        best = max(r["clustering"]["h"].items(), key=lambda kv: kv[1]["pair_precision"])
        s, g = r["similarity"], r.get("gradients", {}).get("mean", {})
        fmt = lambda v: "-" if v is None else f"{v:.3f}"
        lines.append(
            f"| {r['name']} | {r['epoch']} | {nn_h[0]:.3f} / {nn_h[9]:.3f} / {nn_h[49]:.3f} | "
            f"{nn_z[0]:.3f} / {nn_z[9]:.3f} / {nn_z[49]:.3f} | {best[1]['pair_precision']:.3f} | "
            f"{best[0]} | {r['linear_probe']['raw']:.2f} / {r['linear_probe']['standardised']:.2f}"
            f" | {fmt(s['sim_tp'])} / {fmt(s['sim_fn'])} | {fmt(s['sim_tp_h'])} / "
            f"{fmt(s['sim_fn_h'])} | {fmt(g.get('norm_con'))} / {fmt(g.get('norm_metric'))} / "
            f"{fmt(g.get('norm_proto'))} | {fmt(g.get('cos_total_con'))} / "
            f"{fmt(g.get('layer_cos_total_con'))} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="NAME=CHECKPOINT")
    p.add_argument("--data", required=True, help="the --data the runs trained on")
    p.add_argument("--out", help="folder for NAME.json")
    p.add_argument("--ks", default="512,2000,5000")
    p.add_argument("--pca-dims", default="0,32,64,128")
    p.add_argument("--grad-steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--w-con", type=float, default=2.0,
                   help="NT-Xent's weight for a SimCLR checkpoint's gradients")
    p.add_argument("--probe-epochs", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",")]
    args.pca_dims = [int(d) for d in args.pca_dims.split(",")]
    results = []
    for item in args.checkpoints:
        name, sep, path = item.partition("=")
        if not sep:
            p.error(f"{item!r}: give NAME=CHECKPOINT")
        result = diagnose(name, path, args)
        results.append(result)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"{name}.json"), "w") as f:
                json.dump(result, f, indent=1)
    print(summary(results))
    return results


if __name__ == "__main__":
    main()
