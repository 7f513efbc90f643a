"""GPU benchmark (issue 14; not collected by pytest). Prints markdown tables for the README.

    python tests/bench_gpu.py                    # on a CUDA GPU: the whole ladder (about 5 minutes on an H200)
    python tests/bench_gpu.py --device cpu --quick   # a smoke run of the same code on the CPU (small, no compile)

1. The bare train step (forward + backward + Adam) of our U-Net at the paper's CIFAR-10 size (35.7 M) next to
   diffusers' UNet2DModel with the google/ddpm-cifar10-32 config (the same network, the same 35,746,307
   parameters), batch 128, at each precision: strict fp32, TF32, bf16 autocast, bf16 autocast + torch.compile.
   diffusers is optional: without it only our column is printed.
2. End to end: images/s of `ddpm.py --train --preset cifar10 --precision bf16 --compile` from its own progress
   line (the rate between two log lines, after warm-up), and it/s of the tiny CPU default on the GPU.
3. Sampling at batch 1000: the time of one DDPM step (Algorithm 2) and one DDIM step (Eq. 12) next to the
   network's forward pass alone, bf16.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import ddim  # noqa: E402
import ddpm  # noqa: E402
from common import PRESETS, UNet  # noqa: E402

DIFFUSERS_CIFAR10 = dict(  # config.json of google/ddpm-cifar10-32
    block_out_channels=(128, 256, 256, 256), layers_per_block=2, down_block_types=(
        "DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, dropout=0.1, sample_size=32)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats, warmup=3):
    """Median seconds of fn() over repeats calls, after warm-up (compilation happens there)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def set_precision(precision):
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32


def train_step_time(net, batch, device, precision, compile_, repeats):
    """Seconds per bare train step: L_simple-shaped loss, backward, Adam."""
    set_precision(precision)
    net = net.to(device).train()
    fn = torch.compile(net) if compile_ else net
    opt = torch.optim.Adam(net.parameters(), 2e-4)
    x, t = torch.randn(batch, 3, 32, 32, device=device), torch.randint(0, 1000, (batch,), device=device)
    diffusers_out = not isinstance(net, UNet)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16")):
            out = fn(x, t)
            out = out.sample if diffusers_out else out
        loss = (out.float() - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return timed(step, device, repeats)


def ladder(device, batch, repeats, quick):
    try:
        from diffusers import UNet2DModel
    except ImportError:
        UNet2DModel = None
    rows = [("strict fp32", "fp32", False), ("TF32 matmul + conv", "tf32", False), ("bf16 autocast", "bf16", False)]
    if not quick:
        rows.append(("bf16 + torch.compile", "bf16", True))
    print(f"\n| precision (batch {batch}) | ours ms/step (img/s) | diffusers ms/step (img/s) |\n|---|---|---|")
    for label, precision, compile_ in rows:
        torch.manual_seed(0)
        ours = train_step_time(UNet(in_ch=3, image_size=32, **PRESETS["cifar10"]), batch, device, precision,
                               compile_, repeats)
        cell = "—"
        if UNet2DModel is not None:
            theirs = train_step_time(UNet2DModel(**DIFFUSERS_CIFAR10), batch, device, precision, compile_, repeats)
            cell = f"{theirs * 1e3:.0f} ({batch / theirs:,.0f})"
        print(f"| {label} | {ours * 1e3:.0f} ({batch / ours:,.0f}) | {cell} |", flush=True)


def progress_rate(args, timeout):
    """Steady it/s of a ddpm.py --train run: steps between its last two progress lines over the time between their
    arrival here (the first log interval, with start-up and compilation, is left out)."""
    with tempfile.TemporaryDirectory() as out:
        p = subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, "ddpm.py"), "--train", "--out", out, *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen, t_end = [], time.time() + timeout
        for line in p.stdout:
            m = re.match(r"step (\d+)/", line)
            if m:
                seen.append((int(m.group(1)), time.perf_counter()))
            if time.time() > t_end:
                p.kill()
                break
        err = p.stderr.read()
        p.wait()
    if p.returncode != 0 or len(seen) < 2:
        return None, (err.strip().splitlines() or ["fewer than two progress lines"])[-1]
    (s0, t0), (s1, t1) = seen[-2:]
    return (s1 - s0) / (t1 - t0), f"steps {s0}-{s1}"


def end_to_end(device, quick):
    dev = ["--device", device.type]
    if quick:
        runs = [("tiny default, 8x8 digits, batch 128", ["--steps", "40", "--log-every", "20", "--sample-every",
                                                         "1000000"], 128)]
    else:
        runs = [("cifar10 preset, bf16 + compile, batch 128",
                 ["--preset", "cifar10", "--precision", "bf16", "--compile", "--steps", "600", "--log-every", "200",
                  "--sample-every", "1000000", "--ckpt-every", "1000000"], 128),
                ("tiny default, 8x8 digits, batch 128", ["--steps", "3000", "--log-every", "1000", "--sample-every",
                                                         "1000000"], 128)]
    print("\n| `ddpm.py --train` run | it/s | images/s | note |\n|---|---|---|---|")
    for label, args, batch in runs:
        rate, note = progress_rate(args + dev, timeout=900)
        if rate is None:
            print(f"| {label} | failed | | {note} |", flush=True)
        else:
            print(f"| {label} | {rate:.1f} | {rate * batch:,.0f} | {note} |", flush=True)


@torch.no_grad()
def sampling(device, batch, repeats):
    """One DDPM and one DDIM step at batch `batch` vs the network's forward alone (bf16 autocast)."""
    set_precision("bf16")
    net = UNet(in_ch=3, image_size=32, **PRESETS["cifar10"]).to(device).eval()

    def fn(x, t):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return net(x, t).float()
    x = torch.randn(batch, 3, 32, 32, device=device)
    i = torch.full((batch,), 500, device=device, dtype=torch.long)  # the network's own time input
    g = torch.Generator(device=device).manual_seed(0)
    d, s = ddpm.DDPM(), ddim.DDIM()
    forward = timed(lambda: fn(x, i), device, repeats)
    ddpm_step = timed(lambda: d.p_sample(fn, x, 500, generator=g), device, repeats)
    ddim_step = timed(lambda: s.run(fn, x, [(500, 480)]), device, repeats)
    print(f"\n| batch {batch}, bf16 | ms | image-NFE/s | vs forward |\n|---|---|---|---|")
    for label, sec in (("network forward", forward), ("DDPM step (Alg. 2)", ddpm_step), ("DDIM step (Eq. 12)",
                                                                                        ddim_step)):
        print(f"| {label} | {sec * 1e3:.1f} | {batch / sec:,.0f} | {sec / forward:.2f}x |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small sizes, no compile: a smoke run on any device")
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"# bench_gpu.py on {name}, torch {torch.__version__}")
    ladder(device, 8 if args.quick else 128, 2 if args.quick else 10, args.quick)
    end_to_end(device, args.quick)
    sampling(device, 16 if args.quick else 1000, 2 if args.quick else 10)


if __name__ == "__main__":
    main()
