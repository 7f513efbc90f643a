"""Benchmark of common.UNet's training step on this machine (not collected by pytest).

    python tests/bench_unet.py [--repeats 10] [--channels-last]

For the CPU default (tiny preset, 8x8 digits, batch 128) and the paper's CIFAR-10 preset (3x32x32), it
prints parameters, FLOPs of one train step (forward + backward, counted by torch.utils.flop_counter),
the median step time, images/s and achieved GFLOP/s, next to the fp32 matmul peak measured in the same
run (the fastest of large square matmuls), so the last column says how close the
network's step comes to that peak.
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import PRESETS, UNet  # noqa: E402


def matmul_peak(sizes=(1024, 2048, 4096), repeats=5):
    """fp32 GFLOP/s of the fastest n x n matmul (best of `repeats` runs at each size): the BLAS's peak here."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def bench(name, preset, shape, batch, repeats, channels_last):
    torch.manual_seed(0)
    C, H, W = shape
    net = UNet(in_ch=C, image_size=H, **PRESETS[preset])
    opt = torch.optim.Adam(net.parameters(), 2e-4)
    x, t = torch.randn(batch, C, H, W), torch.randint(0, 1000, (batch,))
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def step():
        loss = (net(x, t) - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    params = sum(p.numel() for p in net.parameters())
    return dict(name=name, params=params, gflop=flops / 1e9, ms=med * 1e3, ips=batch / med, gflops=flops / med / 1e9)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args()
    peak = matmul_peak()
    rows = [bench("tiny, 1x8x8 digits, batch 128", "tiny", (1, 8, 8), 128, args.repeats, args.channels_last),
            bench("cifar10 (35.7 M), 3x32x32, batch 8", "cifar10", (3, 32, 32), 8, max(3, args.repeats // 3),
                  args.channels_last)]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; fp32 matmul peak (best of 1024^2..4096^2): {peak:.1f} GFLOP/s")
    print("| model | params | train-step GFLOP | median step (ms) | images/s | GFLOP/s | % of peak |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['params'] / 1e6:.2f} M | {r['gflop']:.2f} | {r['ms']:.0f} | {r['ips']:.0f} | "
              f"{r['gflops']:.1f} | {100 * r['gflops'] / peak:.0f} % |")


if __name__ == "__main__":
    main()
