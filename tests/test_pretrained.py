"""Tests of common.load_pretrained (issue 18): the paper's released DDPM models, as converted to the diffusers format
(google/ddpm-cifar10-32, -celebahq-256, -church-256, -bedroom-256, -cat-256), load into common.UNet and give the
same outputs as diffusers' UNet2DModel; ddim.py's sampler on the loaded network matches diffusers' DDIMScheduler.

diffusers is a test-only dependency (CI installs diffusers==0.42.1; the runtime stays torch, numpy, pillow): the
tests that need it skip, saying so, where it is not installed. The rest (configs, schedules, the safetensors reader,
bad files) run everywhere. Nothing is downloaded: the networks here have random weights, in the released configs.
"""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import common  # noqa: E402
import ddim  # noqa: E402
from common import PRESETS, DataError, load_pretrained  # noqa: E402

DIFFUSERS = "diffusers (a test-only dependency: pip install diffusers==0.42.1)"

# config.json of google/ddpm-cifar10-32 and of google/ddpm-celebahq-256 (-church-256, -bedroom-256, -cat-256 are the
# same), as on the Hugging Face hub; written there by diffusers 0.x, so some keys of today's UNet2DModel are absent.
CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.16.0.dev0", "act_fn": "silu", "add_attention": True,
    "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "class_embed_type": None, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "num_class_embeds": None,
    "out_channels": 3, "resnet_time_scale_shift": "default", "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
CONFIG_256 = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.12.1", "act_fn": "silu", "add_attention": True,
    "attention_head_dim": None, "block_out_channels": [128, 128, 256, 256, 512, 512], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3,
    "resnet_time_scale_shift": "default", "sample_size": 256, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"]}
# scheduler_config.json of google/ddpm-cifar10-32 (fixed_large) and of the 256x256 models (fixed_small).
SCHEDULER_CIFAR10 = {"_class_name": "DDPMScheduler", "_diffusers_version": "0.1.0", "beta_end": 0.02,
                     "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": True, "num_train_timesteps": 1000,
                     "trained_betas": None, "variance_type": "fixed_large"}
SCHEDULER_256 = {**SCHEDULER_CIFAR10, "_diffusers_version": "0.0.4", "timestep_values": None,
                 "variance_type": "fixed_small"}
# Shaped like the 256x256 models (six levels, attention at level 4 only, no dropout), narrow and small enough for a
# CPU test: at 32x32 its levels run at 32, 16, 8, 4, 2, 1 and its attention at 2x2 (and 1x1 in the middle).
SMALL_256_LIKE = {**CONFIG_256, "block_out_channels": [32, 32, 64, 64, 128, 128], "sample_size": 32}

MUTATIONS = [
    {"name": "common-downsample-symmetric-padding", "file": "common.py",
     "find": "return super().forward(F.pad(x, (0, 1, 0, 1)))",
     "replace": "return super().forward(F.pad(x, (1, 1, 1, 1)))",
     "tests": ["tests/test_common.py::test_downsample_pads_like_tf_same",
               "tests/test_pretrained.py::test_parity_256_shaped_float64"]},
    {"name": "common-groupnorm-eps-1e-5", "file": "common.py", "find": "ch, eps=1e-6)", "replace": "ch, eps=1e-5)",
     "tests": ["tests/test_pretrained.py::test_parity_256_shaped_float64"]},
    {"name": "common-qkv-order", "file": "common.py", "find": '(("q", "k", "v") if sub == "qkv"',
     "replace": '(("k", "q", "v") if sub == "qkv"',
     "tests": ["tests/test_pretrained.py::test_parity_256_shaped_float64"]},
    {"name": "common-embedding-cos-first", "file": "common.py",
     "find": "torch.cat([torch.sin(args), torch.cos(args)], dim=1)",
     "replace": "torch.cat([torch.cos(args), torch.sin(args)], dim=1)",
     "tests": ["tests/test_pretrained.py::test_parity_256_shaped_float64"]},
    {"name": "common-old-attention-names", "file": "common.py", "find": '"proj": ("to_out.0", "proj_attn")',
     "replace": '"proj": ("to_out.0",)',
     "tests": ["tests/test_pretrained.py::test_layouts_old_names_and_weight_file"]},
    {"name": "common-safetensors-bf16", "file": "common.py", "find": '"BF16": torch.bfloat16',
     "replace": '"BF16": torch.float16', "tests": ["tests/test_pretrained.py::test_safetensors_reader_by_hand"]},
    {"name": "common-safetensors-no-truncation-check", "file": "common.py", "find": "if start + end > len(buf):",
     "replace": "if False:", "tests": ["tests/test_pretrained.py::test_bad_weight_files_one_line"]},
    {"name": "common-fixed-large-as-beta-tilde", "file": "common.py", "find": '{"fixed_large": "beta",',
     "replace": '{"fixed_large": "beta_tilde",', "tests": ["tests/test_pretrained.py::test_schedules_read"]},
    {"name": "common-ddim-sigma-eq16", "file": "ddim.py",
     "find": "return eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)",
     "replace": "return eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t)",
     "tests": ["tests/test_pretrained.py::test_ddim_matches_diffusers_ddim_scheduler"]},
]


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and msg, msg
    return msg


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def diffusers_unet(config, seed=0):
    """diffusers' UNet2DModel of config with every parameter random (the zero-initialised ones too), in eval mode."""
    UNet2DModel = pytest.importorskip("diffusers", reason=f"{DIFFUSERS} is not installed").UNet2DModel
    net = UNet2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


def save(net, folder, fmt):
    net.save_pretrained(str(folder), safe_serialization=fmt == "safetensors")
    return folder


def write_safetensors(path, tensors, header_extra=None):
    """The format by hand (independent of the safetensors package): u64 header length, JSON header, raw bytes."""
    header, blobs, offset = dict(header_extra or {}), [], 0
    names = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def header_only(header):
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h


def make_folder(folder, config, scheduler=None, weights=b""):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    if scheduler is not None:
        with open(os.path.join(folder, "scheduler_config.json"), "w") as f:
            json.dump(scheduler, f)
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors"), "wb") as f:
        f.write(weights)
    return str(folder)


# ----------------------------------------------------------------------------- configs and schedules

def test_released_configs_are_our_presets():
    """The released configs give exactly our cifar10 and 256x256 presets (dropout is not in them: diffusers' default
    0.0, which only training would see; the paper trained CIFAR-10 with 0.1)."""
    cifar = common.unet_config(CIFAR10_CONFIG)
    assert cifar == {**PRESETS["cifar10"], "dropout": 0.0, "in_ch": 3, "out_ch": 3, "image_size": 32}
    big = common.unet_config(CONFIG_256)
    assert big == {**PRESETS["lsun256"], "in_ch": 3, "out_ch": 3, "image_size": 256}
    assert PRESETS["lsun256"] == PRESETS["celebahq256"]
    with torch.device("meta"):
        assert sum(p.numel() for p in common.UNet(**cifar).parameters()) == 35_746_307  # diffusers' count too
        assert sum(p.numel() for p in common.UNet(**big).parameters()) == 113_673_219   # App. B: "114 M"


def test_released_256_config_has_diffusers_parameter_count():
    """diffusers builds the same number of parameters from the 256x256 config (on the meta device: no memory)."""
    UNet2DModel = pytest.importorskip("diffusers", reason=f"{DIFFUSERS} is not installed").UNet2DModel
    with torch.device("meta"):
        theirs = UNet2DModel(**{k: v for k, v in CONFIG_256.items() if not k.startswith("_")})
        ours = common.UNet(**common.unet_config(CONFIG_256))
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())
    first = [part[0] for parts in common.diffusers_names(ours).values() for part in parts]
    assert sorted(first) == sorted(theirs.state_dict())  # the mapping names every diffusers parameter, once


@pytest.mark.parametrize("change, says", [
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]},
     "CrossAttnDownBlock2D"),
    ({"up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"]},
     "level 1 has AttnDownBlock2D / UpBlock2D"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"norm_eps": 1e-5}, "norm_eps"),
    ({"downsample_padding": 1}, "downsample_padding"),
    ({"attention_head_dim": 8}, "single-head"),
    ({"norm_num_groups": 16}, "norm_num_groups"),
    ({"flip_sin_to_cos": True}, "flip_sin_to_cos"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"block_out_channels": [128, 192, 256, 256]}, "block_out_channels"),
    ({"sample_size": 30}, "sample_size"),
    ({"_class_name": "UNet2DConditionModel"}, "_class_name"),
    ({"cross_attention_dim": 768}, "cross_attention_dim"),
    ({"block_out_channels": "wide"}, "not a UNet2DModel config"),
])
def test_configs_common_unet_cannot_express(tmp_path, change, says):
    """Each setting that common.UNet does not have is refused by load_pretrained, in one line naming it."""
    folder = make_folder(tmp_path / "m", {**CIFAR10_CONFIG, **change})
    with pytest.raises(DataError) as e:
        load_pretrained(folder)
    assert says in one_line(e)
    # diffusers' defaults count where a key is absent: its default downsample_padding (1) is not the paper's
    config = {k: v for k, v in CIFAR10_CONFIG.items() if k != "downsample_padding"}
    with pytest.raises(DataError, match="downsample_padding=1"):
        common.unet_config(config)


def test_schedules_read(tmp_path):
    """scheduler_config.json gives T, the beta range and kind, the variance (fixed_large = sigma^2 = beta, the official
    CIFAR-10 choice; fixed_small = beta-tilde, the 256x256 models') and clipping; without one, the paper's."""
    assert common.read_schedule(None) == ({"T": 1000, "beta_1": 1e-4, "beta_T": 0.02, "schedule": "linear"},
                                          "beta", True)
    for sched, variance in ((SCHEDULER_CIFAR10, "beta"), (SCHEDULER_256, "beta_tilde")):
        p = tmp_path / "s.json"
        p.write_text(json.dumps(sched))
        assert common.read_schedule(str(p)) == ({"T": 1000, "beta_1": 1e-4, "beta_T": 0.02, "schedule": "linear"},
                                                variance, True)
    p.write_text(json.dumps({"_class_name": "GaussianDDPMScheduler", "beta_end": 0.03, "beta_schedule": "linear",
                             "beta_start": 0.0002, "timesteps": 500, "variance_type": "fixed_small"}))  # 2022 keys
    assert common.read_schedule(str(p))[0] == {"T": 500, "beta_1": 2e-4, "beta_T": 0.03, "schedule": "linear"}
    p.write_text(json.dumps({"beta_schedule": "squaredcos_cap_v2", "clip_sample": False}))
    assert common.read_schedule(str(p))[0]["schedule"] == "cosine" and common.read_schedule(str(p))[2] is False
    for bad, says in (({"prediction_type": "v_prediction"}, "prediction_type"),
                      ({"beta_schedule": "scaled_linear"}, "scaled_linear"),
                      ({"variance_type": "learned_range"}, "learned_range")):
        p.write_text(json.dumps({**SCHEDULER_CIFAR10, **bad}))
        with pytest.raises(DataError) as e:
            common.read_schedule(str(p))
        assert says in one_line(e)


# ----------------------------------------------------------------------------- the safetensors reader

def test_safetensors_reader_by_hand(tmp_path):
    """Every supported dtype, written by hand in the published format, reads back bit for bit (with metadata,
    an empty tensor and a scalar)."""
    g = torch.Generator().manual_seed(0)
    tensors = {"f64": torch.randn(3, 2, dtype=torch.float64, generator=g),
               "f32": torch.randn(4, generator=g), "f16": torch.randn(2, 3, generator=g).half(),
               "bf16": torch.tensor([1.5, -2.25, 3e38, 1e-3]).bfloat16(), "i64": torch.tensor([-(2 ** 40), 7]),
               "i32": torch.tensor([-5, 2 ** 30], dtype=torch.int32), "i16": torch.tensor([-3], dtype=torch.int16),
               "i8": torch.tensor([-128, 127], dtype=torch.int8), "u8": torch.tensor([0, 255], dtype=torch.uint8),
               "bool": torch.tensor([True, False, True]), "empty": torch.zeros(0, 3), "scalar": torch.tensor(2.5)}
    write_safetensors(tmp_path / "a.safetensors", tensors, {"__metadata__": {"format": "pt"}})
    back = common.read_safetensors(str(tmp_path / "a.safetensors"))
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape and torch.equal(back[k], t), k
    raw = struct.pack("<Q", 72) + json.dumps({"x": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}).ljust(
        72).encode() + struct.pack("<2e", 1.5, -2.0)  # little-endian half floats, header padded with spaces
    (tmp_path / "b.safetensors").write_bytes(raw)
    assert common.read_safetensors(str(tmp_path / "b.safetensors"))["x"].tolist() == [1.5, -2.0]


def test_safetensors_reader_matches_the_safetensors_package(tmp_path):
    """Files written by the safetensors package itself (installed with diffusers) read back identically."""
    st = pytest.importorskip("safetensors.torch", reason=f"safetensors (installed with {DIFFUSERS}) is not installed")
    g = torch.Generator().manual_seed(1)
    tensors = {"a.weight": torch.randn(5, 3, 3, 3, generator=g), "b": torch.randn(7, generator=g).bfloat16(),
               "c": torch.randn(2, 2, generator=g).half(), "d": torch.randn(3, dtype=torch.float64, generator=g),
               "e": torch.arange(6).reshape(2, 3), "f": torch.tensor([True, False])}
    st.save_file(tensors, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    back = common.read_safetensors(str(tmp_path / "w.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k], t) and back[k].dtype == t.dtype
                                             for k, t in tensors.items())


def test_bad_weight_files_one_line(tmp_path):
    """Truncated or foreign weight files, missing / extra / misshapen tensors: one-line DataErrors."""
    sd = {n: torch.zeros(p) for n, p in ((n, p.shape) for n, p in
                                         common.UNet(**common.unet_config(SMALL_256_LIKE)).state_dict().items())}
    write_safetensors(tmp_path / "w.safetensors", {"a": torch.randn(100), "b": torch.randn(50)})
    full = (tmp_path / "w.safetensors").read_bytes()
    cases = [(full[:-10], "truncated safetensors file (tensor 'b'"), (full[:5], "truncated safetensors file"),
             (b"\xff" * 64, "not a safetensors file, or truncated"),
             (struct.pack("<Q", 4) + b"\x00abc", "header is not JSON"), (struct.pack("<Q", 2) + b"[]", "JSON object"),
             (header_only({"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}) + b"\0", "'F8_E4M3'"),
             (header_only({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}) + b"\0" * 8,
              "holds 8 bytes, its shape [3] needs 12"),
             (header_only({"a": {"dtype": "F32", "shape": "3"}}), "malformed safetensors header entry for 'a'")]
    for raw, says in cases:
        (tmp_path / "w.safetensors").write_bytes(raw)
        with pytest.raises(DataError) as e:
            common.read_safetensors(str(tmp_path / "w.safetensors"))
        assert says in one_line(e), (says, str(e.value))
    # through load_pretrained: a truncated file in a model folder
    folder = make_folder(tmp_path / "m", SMALL_256_LIKE, weights=full[: len(full) // 2])
    with pytest.raises(DataError) as e:
        load_pretrained(folder)
    assert "truncated" in one_line(e)
    # the right format, the wrong tensors (our names are not diffusers' names)
    write_safetensors(os.path.join(folder, "diffusion_pytorch_model.safetensors"), sd)
    with pytest.raises(DataError) as e:
        load_pretrained(folder)
    assert "no tensor time_embedding.linear_1.weight" in one_line(e)
    # a .bin that is a pickle of something else, or a checkpoint of this project
    os.remove(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    torch.save({"script": "ddpm", "config": {}}, os.path.join(folder, "diffusion_pytorch_model.bin"))
    with pytest.raises(DataError) as e:
        load_pretrained(folder)
    assert "a ddpm checkpoint of this project" in one_line(e)
    (tmp_path / "m" / "diffusion_pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError) as e:
        load_pretrained(folder)
    assert "not a readable PyTorch weight file" in one_line(e)
    for path, says in ((tmp_path / "nowhere", "no such file or folder"), (tmp_path, "no config.json"),
                       (tmp_path / "w.safetensors", "no config.json beside it")):
        with pytest.raises(DataError) as e:
            load_pretrained(str(path))
        assert says in one_line(e)


# ----------------------------------------------------------------------------- output parity with diffusers

@pytest.fixture(scope="module")
def cifar10_folders(tmp_path_factory):
    """diffusers' UNet2DModel in the google/ddpm-cifar10-32 config with random weights, saved both ways."""
    net = diffusers_unet(CIFAR10_CONFIG)
    root = tmp_path_factory.mktemp("cifar10")
    return net, {fmt: str(save(net, root / fmt, fmt)) for fmt in ("safetensors", "bin")}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_parity_cifar10_config(cifar10_folders, fmt, device):
    """The google/ddpm-cifar10-32 network: same outputs as diffusers within 1e-5 (relative, float32), from the
    .safetensors file (our reader) and the .bin file (torch.load, weights_only); t at both ends and inside."""
    theirs, folders = cifar10_folders
    net, info = load_pretrained(folders[fmt])
    assert info["files"][1].endswith("diffusion_pytorch_model." + fmt)
    assert info["config"] == {**PRESETS["cifar10"], "dropout": 0.0, "in_ch": 3, "out_ch": 3, "image_size": 32}
    assert info["schedule"] == {"T": 1000, "beta_1": 1e-4, "beta_T": 0.02, "schedule": "linear"}  # none saved: paper's
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 3, 32, 32, generator=g).to(device), torch.tensor([0, 437, 999], device=device)
    with torch.no_grad():
        want = theirs.to(device)(x, t).sample
        got = net.to(device)(x, t)
    assert rel_err(got, want) <= 1e-5, rel_err(got, want)


def test_parity_256_shaped_float64(tmp_path, device, f64):
    """A network shaped like the 256x256 models (six levels, attention only at level 4; narrower, at 32x32), in
    float64: ours equals diffusers' to 1e-10 (relative), so that even GroupNorm's eps (1e-6 vs 1e-5: ~1e-5 here)
    or TF-"SAME" vs symmetric padding would show. Also float32 within 1e-5."""
    theirs = diffusers_unet(SMALL_256_LIKE, seed=1)
    net, info = load_pretrained(str(save(theirs, tmp_path / "m", "safetensors")))
    assert info["config"]["attn_res"] == (2,) and info["config"]["ch_mult"] == (1, 1, 2, 2, 4, 4)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([1, 998])
    with torch.no_grad():
        for dtype, tol in ((f64, 1e-10 if f64 == torch.float64 else 1e-5), (torch.float32, 1e-5)):
            want = theirs.to(device, dtype)(x.to(device, dtype), t.to(device)).sample
            got = net.to(device, dtype)(x.to(device, dtype), t.to(device))
            assert got.dtype == dtype and rel_err(got, want) <= tol, (dtype, rel_err(got, want))


def test_layouts_old_names_and_weight_file(tmp_path):
    """The folder layouts: a saved pipeline (unet/ + scheduler/), a weight file named directly, and a .bin with the
    attention names of diffusers < 0.15 (query, key, value, proj_attn: the released google/ddpm-* files) all load
    the same network; the scheduler config found beside it is read."""
    config = {**SMALL_256_LIKE, "block_out_channels": [32, 32, 32, 32, 64, 64], "layers_per_block": 1}
    theirs = diffusers_unet(config, seed=3)
    save(theirs, tmp_path / "pipe" / "unet", "safetensors")
    os.makedirs(tmp_path / "pipe" / "scheduler")
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_256))
    old = {}
    for k, v in theirs.state_dict().items():
        for new, was in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{was}.")
        old[k] = v
    assert any(".proj_attn." in k for k in old)
    os.makedirs(tmp_path / "old")
    torch.save(old, tmp_path / "old" / "diffusion_pytorch_model.bin")
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    (tmp_path / "old" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CIFAR10))
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([500])
    with torch.no_grad():
        want = theirs(x, t).sample
        for path, variance in ((tmp_path / "pipe", "beta_tilde"), (tmp_path / "pipe" / "unet", "beta_tilde"),
                               (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors", "beta_tilde"),
                               (tmp_path / "old", "beta"), (tmp_path / "old" / "diffusion_pytorch_model.bin", "beta")):
            net, info = load_pretrained(str(path))
            assert info["variance"] == variance and len(info["files"]) == 3, path
            assert rel_err(net(x, t), want) <= 1e-5, path
    old["extra.weight"] = torch.zeros(1)
    torch.save(old, tmp_path / "old" / "diffusion_pytorch_model.bin")
    with pytest.raises(DataError, match="1 tensors that the network of config.json lacks, e.g. extra.weight"):
        load_pretrained(str(tmp_path / "old"))
    del old["extra.weight"]
    old["conv_in.weight"] = old["conv_in.weight"][:16]
    torch.save(old, tmp_path / "old" / "diffusion_pytorch_model.bin")
    with pytest.raises(DataError, match=r"conv_in.weight has shape \(16, 3, 3, 3\), common.UNet needs \(32, 3, 3, 3\)"):
        load_pretrained(str(tmp_path / "old"))


# ----------------------------------------------------------------------------- DDIM sampling parity

@pytest.fixture(scope="module")
def ddim_nets(tmp_path_factory):
    """A small random network in the CIFAR-10 config's style (16x16, attention at 8x8): diffusers' and ours loaded."""
    config = {**CIFAR10_CONFIG, "block_out_channels": [32, 64, 64], "sample_size": 16, "layers_per_block": 1,
              "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
    theirs = diffusers_unet(config, seed=4)
    return theirs, *load_pretrained(str(save(theirs, tmp_path_factory.mktemp("ddim"), "safetensors")))


@pytest.mark.parametrize("eta, clip, grid", [(0.0, False, "leading"), (1.0, True, "leading"),
                                             (1.0, False, "trailing")])
def test_ddim_matches_diffusers_ddim_scheduler(ddim_nets, device, f64, eta, clip, grid):
    """ddim.py's sampler (Eq. 12 along its (t, t_prev) pairs) on the loaded network equals diffusers' DDIMScheduler
    loop on diffusers' own network, from the same x_T and, for eta = 1, the same noise z at every step.

    Conventions set to match ours: timestep_spacing "leading" with steps_offset 0 is our uniform/leading grid
    (t = 0, T/S, ..., official range(0, T, T/S)); "trailing" is our trailing grid; set_alpha_to_one=True is our
    alpha_0 := 1 after the last step (diffusers' default when from a DDPM config: final_alpha_cumprod = 1).
    clip_sample with use_clipped_model_output=True is our clip=True (x0_hat clamped, eps re-derived from it).
    diffusers keeps alpha-bar in float32; the loop is compared with our float64 alpha-bar put into the scheduler
    (its own float32 table is checked against ours separately), so the step arithmetic agrees to 1e-9.
    Noise: both draw z ~ N(0, I) from one generator per sampler, one draw per step (ours also at the last step,
    where sigma = 0), so equal seeds give equal z.
    """
    DDIMScheduler = pytest.importorskip("diffusers", reason=f"{DIFFUSERS} is not installed").DDIMScheduler
    theirs, net, info = ddim_nets
    theirs, net = theirs.to(device, f64), net.to(device, f64)
    S, T = 10, info["schedule"]["T"]
    ours = ddim.DDIM(T, info["schedule"]["schedule"], info["schedule"]["beta_1"], info["schedule"]["beta_T"])
    sched = DDIMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          clip_sample=clip, set_alpha_to_one=True, steps_offset=0, timestep_spacing=grid)
    assert torch.allclose(sched.alphas_cumprod.double(), ours.alpha_bar, rtol=1e-4, atol=0)  # the same schedule
    sched.alphas_cumprod, sched.final_alpha_cumprod = ours.alpha_bar.to(f64), torch.tensor(1.0, dtype=f64)
    sched.set_timesteps(S)
    pairs = ours.timesteps(S, "uniform", grid)
    assert [t for t, _ in pairs] == sched.timesteps.tolist()  # the same grid
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=f64).to(device)
    with torch.no_grad():
        got = ours.run(net, x_T, pairs, eta=eta, generator=torch.Generator(device=device).manual_seed(6), clip=clip)
        g, x = torch.Generator(device=device).manual_seed(6), x_T
        for t in sched.timesteps.tolist():
            eps = theirs(x, t).sample
            z = torch.randn(x.shape, generator=g, dtype=x.dtype, device=x.device) if eta > 0 else None
            x = sched.step(eps, t, x, eta=eta, use_clipped_model_output=clip, variance_noise=z).prev_sample
    tol = 1e-9 if f64 == torch.float64 else 1e-4
    assert rel_err(got, x) <= tol, rel_err(got, x)
    assert not torch.allclose(got, x_T)


# ----------------------------------------------------------------------------- the scripts on a released-model folder

def run_cli(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """A small random diffusers model folder with a 50-step scheduler config (so the scripts must read it)."""
    config = {**CIFAR10_CONFIG, "block_out_channels": [32, 64], "sample_size": 8, "layers_per_block": 1,
              "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}
    folder = save(diffusers_unet(config, seed=5), tmp_path_factory.mktemp("released"), "safetensors")
    with open(os.path.join(folder, "scheduler_config.json"), "w") as f:
        json.dump({**SCHEDULER_CIFAR10, "num_train_timesteps": 50}, f)
    return str(folder)


@pytest.mark.parametrize("script, extra", [("ddim.py", ["--S", "5"]), ("ddpm.py", [])])
def test_cli_samples_a_released_model_folder(small_folder, tmp_path, device, script, extra):
    """`--sample --ckpt <folder>` loads a diffusers folder through common.load_pretrained and writes N samples of
    its shape; the schedule is the folder's (T = 50: DDIM refuses 60 steps, naming T = 50)."""
    out = str(tmp_path / "out")
    r = run_cli(script, "--sample", "--ckpt", small_folder, "--n-samples", "3", "--out", out,
                "--device", device.type, *extra)
    assert r.returncode == 0, r.stderr
    with np.load(os.path.join(out, "samples.npz")) as f:
        assert f["arr_0"].shape == (3, 8, 8, 3) and f["arr_0"].dtype == np.uint8
    if script == "ddim.py":
        r = run_cli(script, "--sample", "--ckpt", small_folder, "--S", "60", "--out", out, "--device", device.type)
        assert r.returncode == 2 and "T=50" in r.stderr and "Traceback" not in r.stderr, r.stderr
