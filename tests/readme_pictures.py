"""Regenerate the README's pictures and its table of default runs (not collected by pytest).

    python tests/readme_pictures.py                 # all four scripts' default runs (about 20 minutes on 2 cores)
    python tests/readme_pictures.py ddpm ncsn       # only these

For each script it runs the README's default command (`python <script>.py --train` on the shipped digits) in a
scratch folder, times it (wall and user CPU, with the load average during the run), copies the final sample grid
to data/readme/<script>.png, and prints a markdown row. ddpm.py also gets `--eval-nll` (all 297 held-out digits),
score_sde.py `--sample --sampler pc` (the README's second command; its grid is the last training grid, checked)
and `--eval-nll` on 64 digits.
"""
import glob
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PICTURES = os.path.join(ROOT, "data", "readme")


def run(args, cwd):
    """(seconds of wall time, seconds of children's user CPU, load average at the end, the result line: the first
    stdout line with bits/dim, else the last)."""
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime, time.time()
    r = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"readme_pictures.py: {' '.join(args)} failed: {r.stderr.strip().splitlines()[-1:]}")
    wall, user = time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - before
    lines = r.stdout.strip().splitlines()
    return wall, user, os.getloadavg()[0], next((x for x in lines if "bits/dim" in x), lines[-1])  # the result


def main(names):
    os.makedirs(PICTURES, exist_ok=True)
    print("| command | wall | user CPU | load average (1 min, at the end) | result |\n|---|---|---|---|---|")
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "run")
            script = os.path.join(ROOT, f"{name}.py")
            wall, user, load, last = run([script, "--train", "--out", out], tmp)
            print(f"| `python {name}.py --train` | {wall / 60:.1f} min | {user / 60:.1f} min | {load:.1f} | "
                  f"{last} |", flush=True)
            grids = sorted(glob.glob(os.path.join(out, "grid_*.png")) + glob.glob(os.path.join(out, "train_*.png")))
            shutil.copy(grids[-1], os.path.join(PICTURES, f"{name}.png"))  # the last progress grid
            ckpt = os.path.join(out, "ckpt.pt")
            if name == "ddpm":
                wall, user, load, last = run([script, "--eval-nll", "--ckpt", ckpt, "--out", out], tmp)
                print(f"| `python ddpm.py --eval-nll` | {wall:.0f} s | | {load:.1f} | {last} |", flush=True)
            if name == "score_sde":
                wall, user, load, last = run([script, "--sample", "--sampler", "pc", "--ckpt", ckpt, "--out", out],
                                             tmp)
                print(f"| `python score_sde.py --sample --sampler pc` | {wall:.0f} s | | {load:.1f} | {last} |")
                same = open(os.path.join(out, "samples.png"), "rb").read() == open(grids[-1], "rb").read()
                print(f"(its samples.png is {'the same file as' if same else 'NOT the same as'} the last training grid:"
                      " the same sampler, EMA weights and noise seed)", flush=True)
                wall, user, load, last = run([script, "--eval-nll", "--ckpt", ckpt, "--n-eval", "64", "--out", out],
                                             tmp)
                print(f"| `python score_sde.py --eval-nll --n-eval 64` | {wall:.0f} s | | {load:.1f} | {last} |",
                      flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["ddpm", "ddim", "ncsn", "score_sde"])
