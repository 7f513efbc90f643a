"""How fast a folder streams from disk (common.Stream), next to holding it in memory. Not collected by pytest.

    python tests/bench_stream.py                    # 256 JPEGs of 512x512, read at 256x256, batch 64
    python tests/bench_stream.py --side 1024 --size 256 --n 128

It writes n synthetic JPEGs (smooth colour fields plus pixel noise, quality 90; the bytes per file are printed)
into a temporary folder, then measures, on this machine:
  - memory: the images/s of common.load_data reading the whole folder at start (one process), and the bytes
    the uint8 set then takes;
  - stream, w workers: the images/s of a training loop's reads through common.Stream (DataLoader, w worker
    processes, prefetch 4), for w = 0 (the main process decodes) up to min(8, cores - 1), after one warm-up batch.
A GPU step that takes longer than batch / (stream images/s) never waits for data. Print a markdown table.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def write_images(folder, n, side, seed=0):
    """n JPEGs side x side: a smooth random colour field (bilinear from 8x8) plus pixel noise."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        field = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((side, side), Image.BILINEAR)
        x = np.asarray(field, np.int16) + rng.integers(-12, 13, (side, side, 3))
        Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=256, help="images in the folder")
    p.add_argument("--side", type=int, default=512, help="the files' side in pixels")
    p.add_argument("--size", type=int, default=256, help="--image-size: the side they are resized to")
    p.add_argument("--batch", type=int, default=64, help="training batch")
    p.add_argument("--batches", type=int, default=8, help="timed batches per row (after one warm-up batch)")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as folder:
        write_images(folder, args.n, args.side)
        mb = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 1e6
        print(f"{args.n} JPEGs of {args.side}x{args.side} ({mb / args.n:.2f} MB each) read at {args.size}x{args.size},"
              f" batch {args.batch}; {cores} cores, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
        print("| how | workers | images/s | ms per batch |\n|---|---|---|---|")
        t0 = time.time()
        data = common.load_data(folder, image_size=args.size)
        rate = args.n / (time.time() - t0)
        print(f"| memory: load_data reads all at start ({data.u.numel() / 1e6:.0f} MB as uint8) | 0 | {rate:.0f} | "
              f"{1000 * args.batch / rate:.0f} |", flush=True)
        disk = common.load_data(folder, image_size=args.size, stream_gb=0).u
        for w in sorted({0, 1, min(8, cores - 1)}):
            s = common.Stream(disk, args.batch, slice(0, args.batch), 0, "cpu", workers=w)
            s[common.draw_indices(s, args.batch, "cpu", None, 0)]  # warm-up: workers start, prefetch begins
            t0 = time.time()
            for step in range(1, args.batches + 1):
                u = s[common.draw_indices(s, args.batch, "cpu", None, step)]
            rate = args.batches * args.batch / (time.time() - t0)
            assert u.shape == (args.batch, 3, args.size, args.size)
            print(f"| stream (common.Stream) | {w} | {rate:.0f} | {1000 * args.batch / rate:.0f} |", flush=True)
            del s


if __name__ == "__main__":
    main()
