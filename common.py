"""
common.py -- the only module the four algorithm scripts import.

It holds four things and nothing else:
  1. UNet: the DDPM U-Net (Ho et al. 2020, App. B; a PixelCNN++ / Wide-ResNet backbone),
     and MLP: a tiny network with the same call signature for 2-D toy data.
  2. Pretrained weights: load_pretrained(path) reads the paper's released models as converted to the
     diffusers format (google/ddpm-cifar10-32, -celebahq-256, -church-256, -bedroom-256, -cat-256).
  3. Data in: load_data(name, ...) returns tensors in [-1, 1] (+ labels) for every dataset; a folder too large
     for memory stays on disk and streams through DataLoader workers while training (Stream).
  4. Data out: save_grid (PNG grid), save_scatter (2-D scatter PNG), save_npz (ADM-style .npz).

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
import contextlib
import gzip
import hashlib
import json
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
    """32 groups as in the paper (fewer for narrow CPU presets); eps 1e-6 as the official TF code's group_norm."""
    return nn.GroupNorm(math.gcd(32, ch), ch, eps=1e-6)


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


def second_order():
    """A context in which attention runs by its plain formula (SDPA's math backend): for a loss that differentiates
    the network's output with create_graph=True (NCSN's implicit and sliced score matching), whose backward then needs
    attention's second derivative, which the fused CPU / CUDA kernels do not implement."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # torch >= 2.3
    except ImportError:
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


class Downsample(nn.Conv2d):
    """Stride-2 3x3 convolution padded as TensorFlow's "SAME" pads it (the official model's, and diffusers'
    downsample_padding=0): one zero row at the bottom and one zero column at the right, none at the top/left.
    A subclass of Conv2d, so its parameters keep the names of a plain convolution."""

    def __init__(self, ch):
        super().__init__(ch, ch, 3, stride=2)

    def forward(self, x):
        return super().forward(F.pad(x, (0, 1, 0, 1)))  # (B, C, H, W) -> (B, C, H/2, W/2) for even H, W


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
      lsun256, celebahq256: ch 128, mult (1,1,2,2,4,4), 2 blocks, attention at 16, dropout 0 -- 113.7 M at 3x256x256,
               the paper's CelebA-HQ and LSUN church / bedroom / cat models ("114 M", App. B)
      small:   ch 64,  mult (1,2,2),   2 blocks, attention at 8,  dropout 0.1 -- 6.5 M at 3x32x32 (6.1 M at 1x28x28:
               no 8x8 level); the CUDA recipe for 17..32-px images
      tiny:    ch 32,  mult (1,2),     1 block,  attention at 4,  dropout 0.1 -- 0.70 M at 1x8x8, the CPU default
                                                                                  for the embedded digits
      mini:    ch 32,  mult (1,2,2),   1 block,  attention at 7 and 8, dropout 0 -- 1.11 M at 1x28x28 (levels 28, 14,
               7) and 3x32x32 (32, 16, 8): the CPU recipe for 17..32-px images (each script's DATA_RECIPES)

    The same network as the official TensorFlow model (hojonathanho/diffusion, diffusion_tf/models/unet.py) at
    every preset, so that the released weights load (load_pretrained) and our own training uses the paper's
    architecture: GroupNorm with eps 1e-6; stride-2 downsampling convolutions padded as TF "SAME" pads them,
    one extra zero row/column at the bottom/right (Downsample; diffusers: downsample_padding=0); nearest-neighbour
    upsampling then a 3x3 convolution; single-head attention scaled by C^-1/2; the sinusoidal embedding with
    sin first and frequencies 10000^(-k/(half-1)) (diffusers: flip_sin_to_cos=False, freq_shift=1); skip
    connections concatenated after the current features. Outputs match diffusers' UNet2DModel with the
    google/ddpm-* configs to float32 rounding (tests/test_pretrained.py).
    Initialisation differs from the official code, and only it: the official code draws every weight from
    the fan-average uniform ("variance scaling", = xavier_uniform) with zero biases and scales the last conv of
    each ResBlock, the attention output and the output conv by 1e-10; here those three are zero and every other
    layer keeps PyTorch's default (kaiming-uniform weights with a = sqrt(5), uniform biases).
    """

    def __init__(self, in_ch=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16,),
                 dropout=0.1, image_size=32, out_ch=None):
        super().__init__()
        self.factor = 2 ** (len(ch_mult) - 1)
        emb_dim = 4 * ch
        self.ch, self.ch_mult, self.num_res_blocks = ch, tuple(ch_mult), num_res_blocks
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
                self.down.append(Downsample(cur))  # downsample by 2
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
        emb = self.emb(timestep_embedding(t, self.ch).to(x.dtype))  # (B, 4*ch)
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
    # The 256x256 models (App. B; official scripts/run_celebahq.py and run_lsun.py: "unet2d16b2c112244", dropout
    # 0.0); the config.json of google/ddpm-celebahq-256, -church-256, -bedroom-256 and -cat-256 is this network:
    # block_out_channels [128, 128, 256, 256, 512, 512], layers_per_block 2, AttnDownBlock2D at level 4 (16x16).
    "lsun256": dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_res=(16,), dropout=0.0),
    "celebahq256": dict(ch=128, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, attn_res=(16,), dropout=0.0),
    "small": dict(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_res=(8,), dropout=0.1),
    "mini": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_res=(7, 8), dropout=0.0),
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
# Pretrained weights: the paper's released models in the diffusers format (config.json + weights)

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """Read a .safetensors file into {name: tensor} (CPU), without the safetensors package.

    The format: 8 bytes, the header length N as a little-endian uint64; N bytes of JSON
    {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}};
    then the tensors' raw little-endian bytes, offsets counted from the end of the header.
    """
    try:
        with open(path, "rb") as f:
            buf = bytearray(f.read())
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(buf) < 8:
        raise DataError(f"{path}: truncated safetensors file ({len(buf)} bytes, no header)")
    n = struct.unpack("<Q", buf[:8])[0]
    if n > len(buf) - 8:
        raise DataError(f"{path}: not a safetensors file, or truncated (header of {n} bytes, file of {len(buf)})")
    try:
        header = json.loads(buf[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise DataError(f"{path}: not a safetensors file (its header is not a JSON object)")
    start, out = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
            numel = math.prod(int(s) for s in shape)
        except (TypeError, KeyError, ValueError):
            raise DataError(f"{path}: malformed safetensors header entry for {name!r}") from None
        if dtype is None:
            raise DataError(f"{path}: tensor {name!r} has dtype {info['dtype']!r}, which this reader does not "
                            f"support ({', '.join(SAFETENSORS_DTYPES)})")
        size = numel * torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end or end - begin != size:
            raise DataError(f"{path}: tensor {name!r} holds {end - begin} bytes, its shape {shape} needs {size}")
        if start + end > len(buf):
            raise DataError(f"{path}: truncated safetensors file (tensor {name!r} ends at byte {start + end}, "
                            f"the file has {len(buf)})")
        if numel == 0:
            out[name] = torch.zeros(shape, dtype=dtype)
            continue
        t = torch.frombuffer(buf, dtype=dtype, count=numel, offset=start + begin)
        out[name] = t.reshape(shape).clone()  # a copy: aligned, and independent of the file buffer
    return out


def read_weights(path):
    """{name: tensor} from a diffusers weight file: .safetensors (read_safetensors) or .bin (a torch pickle,
    read with weights_only=True so that no code in the file runs)."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or a pickle that is not plain data
        raise DataError(f"{path}: not a readable PyTorch weight file ({type(e).__name__})") from None
    if isinstance(sd, dict) and "script" in sd:
        raise DataError(f"{path}: a {sd['script']} checkpoint of this project, not a diffusers weight file")
    if not (isinstance(sd, dict) and all(isinstance(v, torch.Tensor) for v in sd.values())):
        raise DataError(f"{path}: not a diffusers weight file (expected a dict of tensors)")
    return sd


# diffusers' UNet2DModel settings that common.UNet is built with: (key, the value it must have, what ours does).
# Keys missing from a config.json take diffusers' default, which is the same for every key not listed here with
# a default (see unet_config).
UNET_FIXED = (
    ("_class_name", "UNet2DModel", "a diffusers UNet2DModel"),
    ("time_embedding_type", "positional", "a sinusoidal time embedding"),
    ("flip_sin_to_cos", False, "sin first in the time embedding (the official code)"),
    ("freq_shift", 1, "frequencies 10000^(-k/(half-1)) (the official code)"),
    ("downsample_padding", 0, 'TF "SAME" padding of the downsampling convs (the official code)'),
    ("downsample_type", "conv", "a strided conv to downsample"),
    ("upsample_type", "conv", "nearest-neighbour upsampling then a conv"),
    ("resnet_time_scale_shift", "default", "the time embedding added to the features (no scale-shift)"),
    ("act_fn", "silu", "SiLU activations"),
    ("norm_num_groups", 32, "GroupNorm with 32 groups"),
    ("mid_block_type", "UNetMidBlock2D", "a ResBlock-attention-ResBlock middle"),
    ("mid_block_scale_factor", 1, "unscaled residuals in the middle"),
    ("add_attention", True, "attention in the middle"),
    ("attention_head_dim", None, "single-head attention"),
    ("attn_norm_num_groups", None, "GroupNorm with 32 groups before attention"),
    ("center_input_sample", False, "inputs already in [-1, 1]"),
    ("class_embed_type", None, "no class conditioning"),
    ("num_class_embeds", None, "no class conditioning"),
    ("time_embedding_dim", None, "a time embedding of 4 x block_out_channels[0]"),
)
UNET_DEFAULTS = {  # UNet2DModel's other settings and their defaults where these differ from UNET_FIXED's values
    "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "attention_head_dim": 8,
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2, "dropout": 0.0, "in_channels": 3,
    "out_channels": 3, "sample_size": None, "num_train_timesteps": None,  # (used by a "learned" time embedding only)
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")}


def unet_config(config, where="config.json"):
    """common.UNet keyword arguments for a diffusers UNet2DModel config.json, or DataError naming the first setting
    that common.UNet cannot express."""
    fixed = {k: v for k, v, _ in UNET_FIXED}
    unknown = [k for k, v in config.items()
               if not k.startswith("_") and v not in (None, False) and k not in fixed and k not in UNET_DEFAULTS]
    if unknown:
        raise DataError(f"{where}: setting {unknown[0]}={json.dumps(config[unknown[0]])} is unknown to common.UNet")
    get = lambda key: config.get(key, UNET_DEFAULTS.get(key, fixed.get(key)))  # noqa: E731 (diffusers' defaults)
    try:
        channels, down, up = list(get("block_out_channels")), list(get("down_block_types")), list(get("up_block_types"))
        ch, size = int(channels[0]), get("sample_size")
        for key, value, ours in UNET_FIXED:
            v = get(key)
            if v != value and not (key == "time_embedding_dim" and v == 4 * ch):
                raise DataError(f"{where}: {key}={json.dumps(v)}; common.UNet has {ours} ({key}={json.dumps(value)})")
        if abs(float(get("norm_eps")) - 1e-6) > 1e-12:
            raise DataError(f"{where}: norm_eps={get('norm_eps')}; common.UNet's GroupNorm has eps 1e-6 (as official)")
        if len(down) != len(channels) or len(up) != len(channels):
            raise DataError(f"{where}: {len(channels)} block_out_channels, {len(down)} down and {len(up)} up blocks")
        if any(c % ch or c % 32 for c in channels):
            raise DataError(f"{where}: block_out_channels {channels}; common.UNet needs multiples of the first "
                            f"and of 32 (its GroupNorm groups)")
        for level, (d, u) in enumerate(zip(down, reversed(up))):
            if d not in ("DownBlock2D", "AttnDownBlock2D") or u != d.replace("Down", "Up"):
                raise DataError(f"{where}: level {level} has {d} / {u}; common.UNet builds DownBlock2D / UpBlock2D, "
                                f"or AttnDownBlock2D / AttnUpBlock2D (single-head attention) at the same level")
        size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
        if not isinstance(size, int) or size % 2 ** (len(channels) - 1):
            raise DataError(f"{where}: sample_size={json.dumps(get('sample_size'))}; common.UNet needs one size, "
                            f"a multiple of 2^{len(channels) - 1}")
        return dict(in_ch=int(get("in_channels")), ch=ch, ch_mult=tuple(c // ch for c in channels),
                    num_res_blocks=int(get("layers_per_block")),
                    attn_res=tuple(size >> level for level, d in enumerate(down) if d == "AttnDownBlock2D"),
                    dropout=float(get("dropout")), image_size=size, out_ch=int(get("out_channels")))
    except (TypeError, ValueError, IndexError, ZeroDivisionError) as e:
        raise DataError(f"{where}: not a UNet2DModel config ({type(e).__name__}: {e})") from None


ATTENTION_NAMES = {"norm": ("group_norm",), "proj": ("to_out.0", "proj_attn"),  # ours -> diffusers (and
                   "q": ("to_q", "query"), "k": ("to_k", "key"), "v": ("to_v", "value")}  # diffusers < 0.15)
RESBLOCK_NAMES = {"norm1": ("norm1",), "conv1": ("conv1",), "emb": ("time_emb_proj",), "norm2": ("norm2",),
                  "conv2": ("conv2",), "skip": ("conv_shortcut",)}


def diffusers_names(net):
    """The one mapping from diffusers' UNet2DModel parameter names to common.UNet's, for the network net.

    Returns {our parameter name: [part, ...]}, each part a tuple of diffusers names for the same tensor (the current
    name first, then that of diffusers < 0.15, which the released google/ddpm-* files use: query, key, value,
    proj_attn). Our attention's qkv has three parts (to_q, to_k, to_v, stacked in that order); every other
    parameter has one.
    """
    modules = {"emb.0": "time_embedding.linear_1", "emb.2": "time_embedding.linear_2", "conv_in": "conv_in",
               "mid.0": "mid_block.resnets.0", "mid.1": "mid_block.attentions.0", "mid.2": "mid_block.resnets.1",
               "out.0": "conv_norm_out", "out.2": "conv_out"}
    levels, k = len(net.ch_mult), 0
    for level in range(levels):  # down_blocks.level: num_res_blocks (ResBlock, attention) pairs, then a Downsample
        for j in range(net.num_res_blocks):
            modules[f"down.{k}.0"] = f"down_blocks.{level}.resnets.{j}"
            modules[f"down.{k}.1"] = f"down_blocks.{level}.attentions.{j}"
            k += 1
        if level != levels - 1:
            modules[f"down.{k}"] = f"down_blocks.{level}.downsamplers.0.conv"
            k += 1
    k = 0
    for i in range(levels):  # up_blocks.i from the coarsest level: num_res_blocks + 1 pairs, then upsample + conv
        for j in range(net.num_res_blocks + 1):
            modules[f"up.{k}.0"] = f"up_blocks.{i}.resnets.{j}"
            modules[f"up.{k}.1"] = f"up_blocks.{i}.attentions.{j}"
            k += 1
        if i != levels - 1:
            modules[f"up.{k}.1"] = f"up_blocks.{i}.upsamplers.0.conv"
            k += 1
    inner = {**RESBLOCK_NAMES, **ATTENTION_NAMES, "": ("",)}
    names = {}
    for name in net.state_dict():
        module, _, param = name.rpartition(".")  # e.g. "down.0.0.conv1", "weight"
        outer = max((m for m in modules if module == m or module.startswith(m + ".")), key=len)
        sub = module[len(outer) + 1:]  # "" for a plain layer, else a ResBlock or Attention part
        names[name] = [tuple(".".join(filter(None, (modules[outer], alt, param))) for alt in inner[part])
                       for part in (("q", "k", "v") if sub == "qkv" else (sub,))]
    return names


def from_diffusers(sd, net, where="weights"):
    """A state dict for net from diffusers' UNet2DModel weights sd (names by diffusers_names); DataError on a missing,
    extra or misshapen tensor. diffusers keeps attention projections as Linear (C, C) weights and q, k, v apart;
    ours are 1x1 convs (C, C, 1, 1), q, k, v stacked in one (3C, C, 1, 1) conv."""
    used, out, shapes = set(), {}, {name: p.shape for name, p in net.state_dict().items()}
    for name, parts in diffusers_names(net).items():
        ts = []
        for alts in parts:
            key = next((n for n in alts if n in sd), None)
            if key is None:
                raise DataError(f"{where}: no tensor {alts[0]} (the network of config.json has one)")
            used.add(key)
            ts.append(sd[key])
        t, shape = torch.cat(ts), shapes[name]
        if t.numel() != shape.numel() or (t.dim() == len(shape) and t.shape != shape):
            raise DataError(f"{where}: {parts[0][0]} has shape {tuple(t.shape)}, common.UNet needs {tuple(shape)}")
        out[name] = t.reshape(shape)
    extra = sorted(set(sd) - used)
    if extra:
        raise DataError(f"{where}: {len(extra)} tensors that the network of config.json lacks, e.g. {extra[0]}")
    return out


def read_json(path):
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable JSON file ({type(e).__name__})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a JSON object")
    return d


def pretrained_files(path):
    """(weights, config.json, scheduler_config.json or None) for a diffusers model folder (the google/ddpm-* repos:
    config.json, the weights and scheduler_config.json side by side), a saved pipeline (unet/ and scheduler/
    subfolders), or a weight file beside its config.json."""
    if os.path.isdir(path):
        folder = path if os.path.isfile(os.path.join(path, "config.json")) else os.path.join(path, "unet")
        weights = [os.path.join(folder, "diffusion_pytorch_model" + e) for e in (".safetensors", ".bin")]
        weights = next((w for w in weights if os.path.isfile(w)), None)
        if weights is None or not os.path.isfile(os.path.join(folder, "config.json")):
            raise DataError(f"{path}: no config.json with diffusion_pytorch_model.safetensors or .bin here or in unet/")
    elif os.path.isfile(path):
        if not path.endswith((".safetensors", ".bin")):
            raise DataError(f"{path}: expected a diffusers model folder, or its .safetensors / .bin weight file")
        weights, folder = path, os.path.dirname(os.path.abspath(path))
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise DataError(f"{path}: no config.json beside it (the network's settings)")
    else:
        raise DataError(f"{path}: no such file or folder")
    parent = os.path.dirname(os.path.abspath(folder))
    scheduler = [os.path.join(folder, "scheduler_config.json"),  # flat (google/ddpm-*), pipeline, path = .../unet
                 os.path.join(folder, "scheduler", "scheduler_config.json"),
                 os.path.join(parent, "scheduler", "scheduler_config.json")]
    return weights, os.path.join(folder, "config.json"), next((s for s in scheduler if os.path.isfile(s)), None)


def read_schedule(path):
    """(schedule, variance, clip_denoised) from a diffusers scheduler_config.json; without one (path None) the paper's
    linear 1e-4 -> 0.02 schedule with T = 1000, sigma_t^2 = beta_t and clipping (Sec. 4; the official sampler)."""
    schedule = {"T": 1000, "beta_1": 1e-4, "beta_T": 0.02, "schedule": "linear"}
    if path is None:
        return schedule, "beta", True
    c = read_json(path)
    kinds = {"linear": "linear", "squaredcos_cap_v2": "cosine"}  # diffusers' name -> ours (Nichol & Dhariwal's cosine)
    variances = {"fixed_large": "beta", "fixed_small": "beta_tilde", "fixed_small_log": "beta_tilde"}
    if c.get("beta_schedule", "linear") not in kinds or c.get("trained_betas") is not None:
        raise DataError(f"{path}: beta_schedule={json.dumps(c.get('beta_schedule'))}"
                        f"{' with trained_betas' if c.get('trained_betas') is not None else ''}; "
                        f"the scripts have linear and squaredcos_cap_v2 (cosine)")
    if c.get("prediction_type", "epsilon") != "epsilon":
        raise DataError(f"{path}: prediction_type={json.dumps(c['prediction_type'])}; the scripts' nets predict eps")
    if c.get("variance_type", "fixed_small") not in variances:
        raise DataError(f"{path}: variance_type={json.dumps(c['variance_type'])}; the scripts have fixed_large "
                        f"(sigma^2 = beta) and fixed_small (beta-tilde)")
    if c.get("thresholding") or c.get("rescale_betas_zero_snr"):
        raise DataError(f"{path}: thresholding / rescale_betas_zero_snr is on; the scripts have neither")
    try:  # "timesteps": the key of the first (2022) diffusers scheduler configs
        schedule = {"T": int(c.get("num_train_timesteps", c.get("timesteps", 1000))),
                    "beta_1": float(c.get("beta_start", 1e-4)), "beta_T": float(c.get("beta_end", 0.02)),
                    "schedule": kinds[c.get("beta_schedule", "linear")]}
    except (TypeError, ValueError):
        raise DataError(f"{path}: num_train_timesteps / beta_start / beta_end are not numbers") from None
    return schedule, variances[c.get("variance_type", "fixed_small")], bool(c.get("clip_sample", True))


def load_pretrained(path):
    """A released DDPM model from diffusers files -> (common.UNet with its weights, in eval mode, what was read).

    path: a model folder (config.json + diffusion_pytorch_model.safetensors or .bin, and scheduler_config.json in
    the google/ddpm-* repos), a saved pipeline folder with unet/ and scheduler/, or the weight file itself.
    Nothing is downloaded: users fetch such folders themselves.
    The dict: "config" (common.UNet's keyword arguments), "data_shape" [C, H, W], "schedule" {"T", "beta_1",
    "beta_T", "schedule"} from scheduler_config.json (else the paper's: T = 1000, linear 1e-4 -> 0.02),
    "variance" ("beta" for diffusers' fixed_large, "beta_tilde" for fixed_small; "beta" without a scheduler
    config), "clip_denoised" (clip_sample; True without one), "files" (the paths read).
    """
    weights, config_path, scheduler_path = pretrained_files(path)
    kwargs = unet_config(read_json(config_path), config_path)
    net = UNet(**kwargs)
    net.load_state_dict(from_diffusers(read_weights(weights), net, weights))
    schedule, variance, clip = read_schedule(scheduler_path)
    return net.eval(), {"config": kwargs, "data_shape": [kwargs["in_ch"], kwargs["image_size"], kwargs["image_size"]],
                        "schedule": schedule, "variance": variance, "clip_denoised": clip,
                        "files": [f for f in (config_path, weights, scheduler_path) if f]}


# -----------------------------------------------------------------------------
# The data-range contract: K discrete levels <-> [-1, 1]

def levels_to_unit(u, K):
    """Levels u in {0..K-1} (an int/uint8 array, or a tensor on any device) -> float32 tensor in [-1, 1] there.
    K None (continuous 2-D toy data): u is already the data, returned as it is."""
    return u if K is None else torch.as_tensor(u).float() * (2.0 / (K - 1)) - 1.0


def unit_to_levels(x, K):
    """Tensor in [-1, 1] (clamped first) -> nearest level in {0..K-1}, as a uint8 numpy array."""
    x = x.detach().float().cpu().clamp(-1, 1)
    return torch.round((x + 1) * (K - 1) / 2).to(torch.uint8).numpy()


# -----------------------------------------------------------------------------
# Data in

@dataclass
class Data:
    u: torch.Tensor        # images: (N, C, H, W) uint8 levels 0..K-1 (a quarter of float32's memory; training loops
    #                        convert each minibatch on the device with levels_to_unit), or a DiskImages for a folder
    #                        streamed from disk; 2-D toys: (N, 2) float32
    y: torch.Tensor        # (N,) int64 labels, or None
    levels: int            # K, the number of grey levels per pixel (None for continuous 2-D toys)
    flip: bool = False     # random horizontal flips while training (CIFAR-10, as in the paper)

    @property
    def x(self):
        """The whole set in [-1, 1], float32 (made on each call: for held-out sets and statistics); a set kept on
        disk gives its preview (see DiskImages)."""
        return levels_to_unit(self.u.preview() if isinstance(self.u, DiskImages) else self.u, self.levels)


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


IMAGE_FILES = (".png", ".jpg", ".jpeg")


def image_paths(folder):
    """Every PNG/JPEG under folder, sorted (the order of the dataset's indices)."""
    paths = sorted(os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs if f.lower().endswith(IMAGE_FILES))
    if not paths:
        raise DataError(f"{folder}: no PNG or JPEG images found")
    return paths


def read_image(path, image_size, channels):
    """One image file -> (C, H, W) uint8, centre-cropped to a square and resized (bicubic) to image_size."""
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((image_size, image_size), Image.BICUBIC)
            hwc = np.asarray(im, np.uint8).reshape(image_size, image_size, channels)
            return np.ascontiguousarray(hwc.transpose(2, 0, 1))  # a writable (C, H, W) copy
    except OSError as e:
        raise DataError(f"{path}: unreadable image ({e})") from None


class DiskImages(torch.utils.data.Dataset):
    """A folder's images as a uint8 (N, C, H, W) set that stays on disk: image i is read when it is asked for.

    load_data returns one for a folder larger than stream_gb; training reads it through a Stream. Data.x of such a
    set is its preview: every image if there are at most PREVIEW, else a fixed random PREVIEW of them (seed 0).
    """
    PREVIEW = 1000

    def __init__(self, paths, image_size, channels):
        self.paths, self.image_size, self.channels = paths, image_size, channels
        self.shape, self.dtype = torch.Size((len(paths), channels, image_size, image_size)), torch.uint8
        self._preview = None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return torch.from_numpy(read_image(self.paths[i], self.image_size, self.channels))

    def dim(self):
        return 4

    def preview(self):
        """The PREVIEW images (uint8, read once)."""
        if self._preview is None:
            n = len(self)
            idx = range(n) if n <= self.PREVIEW else \
                sorted(torch.randperm(n, generator=torch.Generator().manual_seed(0))[:self.PREVIEW].tolist())
            self._preview = torch.stack([self[i] for i in idx])
        return self._preview


class Stream:
    """The training minibatches of a DiskImages set, read ahead of the training loop by DataLoader workers.

    Step s takes B examples i.i.d. uniformly, drawn by numpy's generator seeded with (seed, s): a function of the
    step alone, not of the run's data generator (whose coming draws cannot be known ahead), so the workers read
    the next steps while the device trains, and a resume at step s continues the same order exactly. Every rank
    under torchrun draws the same B indices and reads only its part. The loop asks with draw_indices(..., s) and
    then indexes the stream with its part of them (x_data[idx[part]]); that returns those images, uint8, on the
    device. Asking out of step order is an error; asking for another step than the next (a resume) restarts the
    workers there.
    """

    def __init__(self, images, B, part, seed, device, workers=None):
        self.images, self.B, self.part, self.seed, self.device = images, B, part, seed, torch.device(device)
        self.shape, self.step, self.batches = images.shape, None, None
        self.workers = min(8, (os.cpu_count() or 2) - 1) if workers is None else workers

    def __len__(self):
        return len(self.images)

    def indices(self, step):
        """The B training-set indices of step (int64, on the CPU)."""
        return _step_indices(self.seed, len(self.images), self.B, step)

    def seek(self, step):
        """Make step the next one read: (re)starts the workers there unless it already is (a resume starts late)."""
        if step != self.step:
            # The loader's own generator: seeding its workers must not draw from the global RNG (dropout's, which a
            # resume restores).
            batches = _StepBatches(self.seed, len(self), self.B, self.part, step)
            loader = torch.utils.data.DataLoader(self.images, batch_sampler=batches,
                                                 num_workers=self.workers, pin_memory=self.device.type == "cuda",
                                                 prefetch_factor=4 if self.workers else None,
                                                 generator=torch.Generator().manual_seed(self.seed))
            self.batches, self.step = iter(loader), step

    def __getitem__(self, idx):
        if self.step is None or not torch.equal(idx.cpu(), self.indices(self.step)[self.part]):
            raise RuntimeError(f"Stream asked out of order: the indices are not those of step {self.step}")
        self.step += 1
        try:
            u = next(self.batches)
        except DataError as e:  # from a worker, its message carries the worker's traceback: keep the last line
            raise DataError(str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
        return u.to(self.device, non_blocking=self.device.type == "cuda")  # async from pinned memory on CUDA only


def _step_indices(seed, n, B, step):
    """Step's B indices into n examples, from numpy's generator seeded with (seed, step)."""
    return torch.from_numpy(np.random.default_rng([seed, step]).integers(0, n, B))


class _StepBatches(torch.utils.data.Sampler):
    """The DataLoader's batches: this rank's part of each step's indices, from a step on, without end. It holds
    numbers, not the Stream: a Stream -> loader -> sampler -> Stream cycle would leave a dropped loader to the
    garbage collector, whose shutdown of the workers then waits out DataLoader's 5-s timeout."""

    def __init__(self, seed, n, B, part, step):
        self.seed, self.n, self.B, self.part, self.step = seed, n, B, part, step

    def __iter__(self):
        step = self.step
        while True:
            yield _step_indices(self.seed, self.n, self.B, step)[self.part].tolist()
            step += 1


def draw_indices(x_data, B, device, generator, step):
    """A training step's B example indices: i.i.d. uniform from the run's data generator, on the device (the same
    draw for every rank), or, for a Stream, the stream's own indices of that step."""
    if isinstance(x_data, Stream):
        x_data.seek(step)
        return x_data.indices(step)
    return torch.randint(len(x_data), (B,), device=device, generator=generator)


def training_images(data, device, B, part, seed):
    """The training set as the loop reads it: the uint8 levels moved to the device, or a Stream for a set kept on
    disk (see load_data's stream_gb)."""
    if isinstance(data.u, DiskImages):
        return Stream(data.u, B, part, seed, device)
    return data.u.to(device)


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


def load_data(name="digits", train=True, data_dir="data", image_size=None, channels=None, n_toy=20000, seed=0,
              stream_gb=4.0):
    """Load a dataset as a Data with x in [-1, 1]; name is one of DATASETS or a folder of images.

    A folder whose images take more than stream_gb GB as uint8 (N C H W bytes) is not read here: its Data holds a
    DiskImages, and training streams it from disk (training_images). Everything else is held in memory as uint8.

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
        paths, size, ch = image_paths(name), image_size or 32, channels or 3
        if len(paths) * ch * size * size > stream_gb * 1e9:
            return Data(DiskImages(paths, size, ch), None, 256)
        u, K = np.stack([read_image(p, size, ch) for p in paths]), 256
    else:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)} or give a folder of images")
    u = torch.as_tensor(np.array(u, dtype=np.uint8))  # a writable copy
    if image_size and u.shape[-1] != image_size:
        x = F.interpolate(levels_to_unit(u, K), size=(image_size, image_size), mode="bilinear", antialias=True,
                          align_corners=False)
        u = torch.as_tensor(unit_to_levels(x, K))  # back onto the K-level grid
    y = None if y is None else torch.as_tensor(np.array(y, dtype=np.int64))
    return Data(u, y, K, flip=(name == "cifar10"))


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
