"""Performance benchmark: every number is a ratio against a baseline measured in the same run,
because shared machines are noisy. Runs on the CPU or, when present, one GPU.

    python bench.py                      # every section
    python bench.py --only nt_xent,lars  # some of them

Sections and their targets:
    nt_xent   losses.nt_xent forward+backward against a minimal NT-Xent (normalise, one matmul,
              mask the diagonal, cross_entropy): time and peak memory <= 1.1x; time ~4x per
              doubling of 2B (quadratic, not cubic).
    lars      one LARS step against one torch.optim.SGD(momentum=0.9) step on resnet50: <= 1.5x.
"""
import argparse
import ctypes
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

from lars import LARS
from losses import nt_xent


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
    """Median seconds of each function, run in turns so that drifting machine load hits all alike."""
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
    print(f"{'2B':>6} {'ref ms':>9} {'ours ms':>9} {'time x':>7} {'ref MiB':>9} {'ours MiB':>9} {'mem x':>6} {'growth':>7}")
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
    print("== lars: one optimiser step on resnet50's parameters, LARS / SGD(momentum=0.9) (target <= 1.50)")
    params = [torch.nn.Parameter(p.detach().to(device)) for p in torchvision.models.resnet50().parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    sgd = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-6)
    lars = LARS(params, lr=0.1, weight_decay=1e-6)
    t_sgd, t_lars = interleaved([sgd.step, lars.step], device, repeat)
    print(f"{len(params)} tensors, {sum(p.numel() for p in params) / 1e6:.1f}M parameters: "
          f"SGD {t_sgd * 1e3:.1f} ms, LARS {t_lars * 1e3:.1f} ms, ratio {t_lars / t_sgd:.2f}")


SECTIONS = {"nt_xent": bench_nt_xent, "lars": bench_lars}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma list of sections: " + ", ".join(SECTIONS))
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per measurement (median)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not _track_cpu_memory():
        parser.error("measuring CPU memory needs Linux with glibc (/proc/self/clear_refs, mallopt)")
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {list(SECTIONS)}")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.only.split(","):
        SECTIONS[name](device, args.repeat)


if __name__ == "__main__":
    main()
