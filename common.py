"""
common.py -- the only module the four algorithm scripts import.

It holds three things and nothing else:
  1. UNet: the DDPM U-Net (Ho et al. 2020, App. B; a PixelCNN++ / Wide-ResNet backbone),
     and MLP: a tiny network with the same call signature for 2-D toy data.
  2. Data in: load_data(name, ...) returns tensors in [-1, 1] (+ labels) for every dataset.
  3. Data out: save_grid (PNG grid), save_scatter (2-D scatter PNG), save_npz (ADM-style .npz).

The data-range contract (stated once, owned by two functions):
  a dataset stores K discrete grey levels u in {0, ..., K-1} (K = 256 for 8-bit images,
  K = 17 for the embedded digits); models see x = 2u/(K-1) - 1 in [-1, 1], mapped before any
  noise is added (levels_to_unit); results go back with clamp to [-1, 1] and rounding
  (unit_to_levels). Every loader and saver below goes through this pair.

Time input: both networks take net(x, t) with t a tensor of shape (B,). Integer timesteps
(DDPM/DDIM: t = 0 ... T-1) are passed as they are; continuous inputs are passed as floats.
The sinusoidal embedding has wavelengths from 2*pi to 2*pi*10^4, so it resolves values that
change by ~0.01-1 across their range: callers pass a continuous t in (0, 1] as 999*t
(score_sde, as the official code does) and a noise level sigma as e.g. log(sigma) times a
constant (ncsn). Each script states the scaling it uses.
"""
import gzip
import hashlib
import math
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

HERE = os.path.dirname(os.path.abspath(__file__))


class DataError(Exception):
    """A problem with the user's data or files: scripts print its message as one line and exit 2."""


# -----------------------------------------------------------------------------
# U-Net (Ho et al. 2020, App. B), built bottom-up

def timestep_embedding(t, dim):
    """Transformer sinusoidal embedding (Vaswani et al. 2017, Sec. 3.5) of integer or real t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def group_norm(ch):
    return nn.GroupNorm(math.gcd(32, ch), ch)  # 32 groups as in the paper; fewer for narrow CPU presets


class ResBlock(nn.Module):
    """Wide-ResNet block: GroupNorm, SiLU, conv; time embedding added; GroupNorm, SiLU, dropout, conv; skip."""

    def __init__(self, in_ch, out_ch, emb_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2, self.drop = group_norm(out_ch), nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # the block starts as the identity (official code: init_scale=0)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]  # add the time embedding per channel
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, ch):
        super().__init__()
        self.norm, self.qkv, self.proj = group_norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2).unbind(1)  # 3 x (B, HW, C)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class UNet(nn.Module):
    """The DDPM U-Net: net(x, t) -> tensor shaped like x (the noise eps, or a score); out_ch channels if given
    (ddpm.py's VDM Fourier features widen the input only).

    Levels: len(ch_mult) resolutions, each with num_res_blocks ResBlocks on the way down and
    num_res_blocks + 1 on the way up (these also take the skip connections); attention after the
    blocks at the resolutions in attn_res; a middle ResBlock-Attention-ResBlock.
    Any image size works: the input is zero-padded (right and bottom) up to a multiple of 2^(levels-1)
    and the output cropped back, so MNIST needs no resizing: 28x28 runs at 32x32 inside with four levels
    (32, 16, 8, 4) and as it is with three (28, 14, 7). attn_res refers to the padded sizes.

    Presets (PRESETS below), with parameter counts:
      cifar10: ch 128, mult (1,2,2,2), 2 blocks, attention at 16, dropout 0.1 -- 35.7 M at 3x32x32, the paper's model
      small:   ch 64,  mult (1,2,2),   2 blocks, attention at 8,  dropout 0.1 -- 6.5 M at 3x32x32 (6.1 M at 1x28x28: no 8x8 level)
      tiny:    ch 32,  mult (1,2),     1 block,  attention at 4,  dropout 0.1 -- 0.70 M at 1x8x8, the CPU default
                                                                                  for the embedded digits
    """

    def __init__(self, in_ch=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16,),
                 dropout=0.1, image_size=32, out_ch=None):
        super().__init__()
        self.factor = 2 ** (len(ch_mult) - 1)
        emb_dim = 4 * ch
        self.ch = ch
        self.emb = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        res = image_size + (-image_size) % self.factor  # size after padding
        # Downsampling half: remember every output channel count for the skip connections.
        self.down, skips, cur = nn.ModuleList(), [ch], ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(nn.ModuleList([ResBlock(cur, ch * mult, emb_dim, dropout),
                                                Attention(ch * mult) if res in attn_res else nn.Identity()]))
                cur = ch * mult
                skips.append(cur)
            if level != len(ch_mult) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))  # downsample by 2
                skips.append(cur)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, dropout), Attention(cur),
                                  ResBlock(cur, cur, emb_dim, dropout)])
        # Upsampling half: each ResBlock takes one skip connection.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(nn.ModuleList([ResBlock(cur + skips.pop(), ch * mult, emb_dim, dropout),
                                              Attention(ch * mult) if res in attn_res else nn.Identity()]))
                cur = ch * mult
            if level != 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(cur, cur, 3, padding=1)))
                res *= 2
        self.out = nn.Sequential(group_norm(cur), nn.SiLU(), nn.Conv2d(cur, out_ch or in_ch, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # the official code scales this layer's init by 1e-10

    def forward(self, x, t):
        H, W = x.shape[-2:]
        x = F.pad(x, (0, (-W) % self.factor, 0, (-H) % self.factor))  # pad right/bottom to a multiple
        emb = self.emb(timestep_embedding(t, self.ch))  # (B, 4*ch)
        hs = [self.conv_in(x)]
        for layer in self.down:
            hs.append(layer[1](layer[0](hs[-1], emb)) if isinstance(layer, nn.ModuleList) else layer(hs[-1]))
        h = self.mid[2](self.mid[1](self.mid[0](hs[-1], emb)), emb)
        for layer in self.up:
            if isinstance(layer, nn.ModuleList):
                h = layer[1](layer[0](torch.cat([h, hs.pop()], dim=1), emb))
            else:
                h = layer(h)
        return self.out(h)[..., :H, :W]


PRESETS = {
    "cifar10": dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16,), dropout=0.1),
    "small": dict(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_res=(8,), dropout=0.1),
    "tiny": dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_res=(4,), dropout=0.1),
}


class MLP(nn.Module):
    """A small MLP for 2-D toy data with the U-Net's signature: net(x, t), x (B, 2), t (B,)."""

    def __init__(self, dim=2, hidden=128, depth=3, emb_dim=32):
        super().__init__()
        self.emb_dim = emb_dim
        layers, cur = [], dim + emb_dim
        for _ in range(depth):
            layers += [nn.Linear(cur, hidden), nn.SiLU()]
            cur = hidden
        self.net = nn.Sequential(*layers, nn.Linear(cur, dim))

    def forward(self, x, t):
        return self.net(torch.cat([x, timestep_embedding(t, self.emb_dim)], dim=1))


# -----------------------------------------------------------------------------
# The data-range contract: K discrete levels <-> [-1, 1]

def levels_to_unit(u, K):
    """Levels u in {0..K-1} (any int/uint8 array or tensor) -> float32 tensor in [-1, 1]."""
    return torch.as_tensor(np.asarray(u, dtype=np.float32)) * (2.0 / (K - 1)) - 1.0


def unit_to_levels(x, K):
    """Tensor in [-1, 1] (clamped first) -> nearest level in {0..K-1}, as a uint8 numpy array."""
    x = x.detach().float().cpu().clamp(-1, 1)
    return torch.round((x + 1) * (K - 1) / 2).to(torch.uint8).numpy()


# -----------------------------------------------------------------------------
# Data in

@dataclass
class Data:
    x: torch.Tensor        # (N, C, H, W) or (N, 2), float32; images in [-1, 1]
    y: torch.Tensor        # (N,) int64 labels, or None
    levels: int            # K, the number of grey levels per pixel (None for continuous 2-D toys)
    flip: bool = False     # random horizontal flips while training (CIFAR-10, as in the paper)


DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "moons", "swissroll", "8gaussians", "checkerboard")
TOYS = DATASETS[4:]
URLS = {  # (base url, {file: md5 of the published file})
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}),
    "fashion_mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/", {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}),
}
SYSTEM_DIRS = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}  # Debian's dataset-fashion-mnist


def download(url, path, md5):
    """Fetch url to path via a temporary file; keep it only if its md5 matches (never a partial file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
            digest = hashlib.md5()
            for chunk in iter(lambda: r.read(1 << 20), b""):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != md5:
            raise DataError(f"{url}: checksum mismatch (md5 {digest.hexdigest()}, expected {md5}); nothing kept")
        os.replace(tmp, path)
    except OSError as e:
        raise DataError(f"cannot download {url} ({e}); put the file at {path} by hand") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def find_files(name, data_dir, files):
    """Directory holding every file of a named dataset: data_dir/name, the system copy, else a download."""
    for d in (os.path.join(data_dir, name), SYSTEM_DIRS.get(name)):
        if d and all(os.path.exists(os.path.join(d, f)) for f in files):
            return d
    base, md5s = URLS[name]
    d = os.path.join(data_dir, name)
    for f in files:
        if not os.path.exists(os.path.join(d, f)):
            download(base + f, os.path.join(d, f), md5s[f])
    return d


def read_idx(path):
    """Read an idx file (the MNIST format, gzipped): magic 0x0000 08 ndim, big-endian sizes, uint8 data."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable gzip file ({e})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 8:
        raise DataError(f"{path}: bad idx magic number (expected unsigned-byte idx data)")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(shape):
        raise DataError(f"{path}: truncated idx file ({data.size} bytes of data, header says {math.prod(shape)})")
    return data.reshape(shape)


def read_cifar10(path, train):
    """Read the CIFAR-10 python pickle tarball without extracting it (so no member can escape a folder)."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    xs, ys = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for m in tar.getmembers():  # nothing is extracted, but a member path leaving the folder means a bad file
                if m.name.startswith("/") or ".." in m.name.split("/"):
                    raise DataError(f"{path}: member {m.name!r} points outside the archive; refused")
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            for n in names:
                if n not in members:
                    raise DataError(f"{path}: member {n} missing; not the CIFAR-10 python tarball")
                d = pickle.load(tar.extractfile(members[n]), encoding="bytes")  # the official format is a pickle
                xs.append(np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(d[b"labels"]))
    except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError) as e:
        raise DataError(f"{path}: corrupt CIFAR-10 archive ({e})") from None
    return np.concatenate(xs), np.concatenate(ys)


def read_folder(folder, image_size, channels):
    """Every PNG/JPEG under folder, centre-cropped to a square and resized to image_size."""
    paths = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs
                   if f.lower().endswith((".png", ".jpg", ".jpeg")))
    if not paths:
        raise DataError(f"{folder}: no PNG or JPEG images found")
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                s = min(im.size)
                left, top = (im.width - s) // 2, (im.height - s) // 2
                im = im.crop((left, top, left + s, top + s)).resize((image_size, image_size), Image.BICUBIC)
                out.append(np.asarray(im, np.uint8).reshape(image_size, image_size, channels))
        except OSError as e:
            raise DataError(f"{p}: unreadable image ({e})") from None
    return np.stack(out).transpose(0, 3, 1, 2)


def make_toy(name, n, seed=0):
    """n points of a 2-D toy distribution, deterministic per seed; roughly within [-4, 4]^2."""
    g = np.random.default_rng(seed)
    if name == "moons":
        a = g.uniform(0, np.pi, n)
        upper = g.random(n) < 0.5
        x = np.where(upper[:, None], np.stack([np.cos(a), np.sin(a)], 1), np.stack([1 - np.cos(a), 0.5 - np.sin(a)], 1))
        x = (x - [0.5, 0.25]) * 2 + 0.1 * g.standard_normal((n, 2))
    elif name == "swissroll":
        a = 1.5 * np.pi * (1 + 2 * g.random(n))
        x = np.stack([a * np.cos(a), a * np.sin(a)], 1) / 5 + 0.1 * g.standard_normal((n, 2))
    elif name == "8gaussians":
        angles = 2 * np.pi * g.integers(0, 8, n) / 8
        x = 2.5 * np.stack([np.cos(angles), np.sin(angles)], 1) + 0.2 * g.standard_normal((n, 2))
    elif name == "checkerboard":
        x1 = g.uniform(-2, 2, n)
        x2 = g.uniform(0, 1, n) + g.integers(0, 2, n) * 2 - 2 + (np.floor(x1) % 2)
        x = np.stack([x1, x2], 1) * 1.5
    else:
        raise DataError(f"unknown toy {name!r}; choose from {', '.join(TOYS)}")
    return torch.as_tensor(x, dtype=torch.float32)


def load_data(name="digits", train=True, data_dir="data", image_size=None, channels=None, n_toy=20000, seed=0):
    """Load a dataset as a Data with x in [-1, 1]; name is one of DATASETS or a folder of images.

    digits: the UCI digits shipped in data/digits.npz (1,797 8x8 images, 17 levels); the first 1,500
    are the training split and the last 297 the held-out split. image_size resizes images (bilinear)
    and snaps them back onto the dataset's K levels, so the data stay discrete.
    """
    if name in TOYS:
        return Data(make_toy(name, n_toy, seed if train else seed + 1), None, None)
    y = None
    if name == "digits":
        path = os.path.join(HERE, "data", "digits.npz")
        try:
            with np.load(path) as f:
                u, y = f["images"][:, None], f["labels"]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{path}: unreadable ({e})") from None
        u, y, K = (u[:1500], y[:1500], 17) if train else (u[1500:], y[1500:], 17)
    elif name in ("mnist", "fashion_mnist"):
        pre = "train" if train else "t10k"
        files = [f"{pre}-images-idx3-ubyte.gz", f"{pre}-labels-idx1-ubyte.gz"]
        d = find_files(name, data_dir, files)
        u, y, K = read_idx(os.path.join(d, files[0]))[:, None], read_idx(os.path.join(d, files[1])), 256
        if len(u) != len(y):
            raise DataError(f"{d}: {len(u)} images but {len(y)} labels")
    elif name == "cifar10":
        d = find_files(name, data_dir, ["cifar-10-python.tar.gz"])
        (u, y), K = read_cifar10(os.path.join(d, "cifar-10-python.tar.gz"), train), 256
    elif os.path.isdir(name):
        u, K = read_folder(name, image_size or 32, channels or 3), 256
    else:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)} or give a folder of images")
    x = levels_to_unit(u, K)
    if image_size and x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        x = levels_to_unit(unit_to_levels(x, K), K)  # back onto the K-level grid
    y = None if y is None else torch.as_tensor(np.array(y, dtype=np.int64))
    return Data(x, y, K, flip=(name == "cifar10"))


# -----------------------------------------------------------------------------
# Data out

def save_grid(x, path, nrow=None, pad=1, scale=None):
    """Save images x (N, C, H, W) in [-1, 1] as one PNG grid (8-bit), each image upscaled for viewing."""
    u = unit_to_levels(x, 256)  # (N, C, H, W) uint8
    N, C, H, W = u.shape
    nrow = nrow or math.ceil(math.sqrt(N))
    ncol = math.ceil(N / nrow)
    grid = np.full((C, ncol * (H + pad) + pad, nrow * (W + pad) + pad), 255, np.uint8)
    for i in range(N):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = u[i]
    im = Image.fromarray(grid[0] if C == 1 else grid.transpose(1, 2, 0))
    scale = scale or max(1, 256 // max(H, W) // 2)  # small images (8x8 digits) are enlarged to be seen
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    im.save(path)


def save_scatter(samples, path, data=None, size=512, lim=4.5):
    """Scatter-plot 2-D samples (red) over the data (grey) in [-lim, lim]^2, drawn with pillow."""
    im = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(im)
    for pts, colour in ((data, (170, 170, 170)), (samples, (200, 30, 30))):
        if pts is None:
            continue
        p = ((torch.as_tensor(pts).detach().cpu().float().numpy() + lim) / (2 * lim) * size).round()
        for px, py in p[np.isfinite(p).all(1)][:5000]:
            draw.point((px, size - 1 - py), fill=colour)  # y axis points up
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    im.save(path)


def save_npz(x, path):
    """Save images x (N, C, H, W) in [-1, 1] as arr_0, uint8 (N, H, W, C): the ADM evaluation-suite format."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    np.savez(path, arr_0=unit_to_levels(x, 256).transpose(0, 2, 3, 1))
