"""Tests of common.py: the U-Net, the MLP, every loader (on fixtures written in the real formats, and on
the real Fashion-MNIST where Debian's package put it), the data-range contract, and the savers."""
import gzip
import hashlib
import io
import os
import pickle
import struct
import sys
import tarfile
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import common  # noqa: E402
from common import MLP, PRESETS, DataError, UNet, load_data  # noqa: E402

FASHION = "/usr/share/datasets/fashion-mnist"

MUTATIONS = [
    {"name": "stream-sampler-holds-the-stream", "file": "common.py",
     "find": "self.batches, self.step = iter(loader), step",
     "replace": "self.batches, self.step = iter(loader), step; loader.batch_sampler.stream = self",
     "tests": ["tests/test_common.py::test_a_dropped_stream_frees_its_workers_at_once"]},
    {"name": "machinery-help-missing", "file": "score_sde.py",
     "find": "# seeds the data generator (indices, flips, t, noise), the weights, sampling\n",
     "replace": "\n",
     "tests": ["tests/test_common.py::test_every_config_field_is_a_flag_with_help[score_sde]"]},
    {"name": "machinery-help-continuation", "file": "ddpm.py",
     "find": "elif name and not code.strip() and start == column:",
     "replace": "elif name and not code.strip() and start == 0:",
     "tests": ["tests/test_common.py::test_every_config_field_is_a_flag_with_help[ddpm]"]},
    {"name": "recipe-flags-lose", "file": "ncsn.py",
     "find": "chosen = {k: v for k, v in values.items() if k not in cfg.fixed}",
     "replace": "chosen = dict(values)",
     "tests": ["tests/test_common.py::test_defaults_follow_the_data[ncsn]"]},
    {"name": "recipe-overrides-an-empty-preset", "file": "ncsn.py",
     "find": "cfg.fixed = {f.name for f in dataclasses.fields(config)} if named else set(given)",
     "replace": "cfg.fixed = {*preset, *given}",
     "tests": ["tests/test_common.py::test_defaults_follow_the_data[ncsn]"]},
    {"name": "recipe-mps-as-gpu", "file": "ddim.py",
     "find": 'kind = "cuda" if device.type == "cuda" else "cpu"',
     "replace": 'kind = "cpu" if device.type == "cpu" else "cuda"',
     "tests": ["tests/test_common.py::test_defaults_follow_the_data[ddim]"]},
    {"name": "recipe-not-applied-in-train", "file": "score_sde.py",
     "find": "    if recipe := follow_data(cfg, DATA_RECIPES, data.u.shape[1:], device):\n",
     "replace": "    if recipe := {}:\n",
     "tests": ["tests/test_common.py::test_train_on_28px_images_takes_the_recipe[score_sde]"]},
    {"name": "recipe-mini-without-attention", "file": "common.py",
     "find": 'num_res_blocks=1, attn_res=(7, 8), dropout=0.0)',
     "replace": 'num_res_blocks=1, attn_res=(8,), dropout=0.0)',
     "tests": ["tests/test_common.py::test_unet_64_and_presets_parameter_counts"]},
    {"name": "stream-same-batch-every-step", "file": "common.py",
     "find": "np.random.default_rng([seed, step])", "replace": "np.random.default_rng([seed, 0])",
     "tests": ["tests/test_common.py::test_stream_reads_what_memory_holds_and_resumes"]},
    {"name": "stream-workers-start-at-zero", "file": "common.py",
     "find": "_StepBatches(self.seed, len(self), self.B, self.part, step)",
     "replace": "_StepBatches(self.seed, len(self), self.B, self.part, 0)",
     "tests": ["tests/test_common.py::test_stream_reads_what_memory_holds_and_resumes"]},
    {"name": "stream-loader-draws-global-rng", "file": "common.py",
     "find": "generator=torch.Generator().manual_seed(self.seed))", "replace": ")",
     "tests": ["tests/test_common.py::test_train_streams_a_large_folder_and_resumes_exactly"]},
    {"name": "stream-never", "file": "common.py",
     "find": "if len(paths) * ch * size * size > stream_gb * 1e9:", "replace": "if False:",
     "tests": ["tests/test_common.py::test_stream_reads_what_memory_holds_and_resumes"]},
    {"name": "second-order-fused-attention", "file": "common.py",  # (the CPU picks math for our strided q anyway;
     "find": "return sdpa_kernel(SDPBackend.MATH)",                 # this shows the losses run inside the context)
     "replace": "return sdpa_kernel(SDPBackend.FLASH_ATTENTION)",
     "tests": ["tests/test_common.py::test_second_order_losses_through_the_unet"]},
    {"name": "adam-beta2-not-passed", "file": "ncsn.py",
     "find": "lr=cfg.lr, betas=(0.9, cfg.adam_beta2))", "replace": "lr=cfg.lr)",
     "tests": ["tests/test_common.py::test_adam_beta2_reaches_the_optimiser_and_a_resume[ncsn]"]},
    {"name": "adam-beta2-resume-keeps-the-checkpoint-s", "file": "score_sde.py",
     "find": '            g["betas"] = (0.9, cfg.adam_beta2)\n', "replace": "            pass\n",
     "tests": ["tests/test_common.py::test_adam_beta2_reaches_the_optimiser_and_a_resume[score_sde]"]},
    {"name": "adam-beta2-required-of-old-checkpoints", "file": "ddpm.py",
     "find": 'LATER = ("adam_beta2",)', "replace": "LATER = ()",
     "tests": ["tests/test_common.py::test_adam_beta2_reaches_the_optimiser_and_a_resume[ddpm]"]},
    {"name": "resume-foreign-rng-traceback", "file": "ncsn.py",
     "find": "    except (KeyError, TypeError, RuntimeError):\n        raise DataError(f\"{path}: its random",
     "replace": "    except KeyError:\n        raise DataError(f\"{path}: its random",
     "tests": ["tests/test_common.py::test_resume_with_a_foreign_rng_state_is_one_line[ncsn]"]},
]


# ----------------------------------------------------------------------------- networks

@pytest.mark.parametrize("size", [8, 16, 28, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_unet_shapes_integer_and_float_t(size, channels):
    torch.manual_seed(0)
    net = UNet(in_ch=channels, image_size=size, ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_res=(8,))
    x = torch.randn(2, channels, size, size)
    for t in (torch.tensor([0, 999]), torch.tensor([0.01, 0.7])):  # DDPM index / continuous value
        assert net(x, t).shape == x.shape


def test_unet_64_and_presets_parameter_counts():
    """The docstring's counts: the paper's CIFAR-10 model has 35.7 M parameters (Ho et al. 2020, App. B)."""
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert round(count(UNet(in_ch=3, image_size=32, **PRESETS["cifar10"])) / 1e6, 1) == 35.7
    assert round(count(UNet(in_ch=1, image_size=8, **PRESETS["tiny"])) / 1e6, 2) == 0.70
    assert count(UNet(in_ch=1, image_size=28, **PRESETS["mini"])) == 1_112_801  # levels 28, 14, 7; attention at 7
    assert count(UNet(in_ch=3, image_size=32, **PRESETS["mini"])) == 1_113_955  # levels 32, 16, 8; attention at 8
    with torch.device("meta"):  # the 256x256 models: "114 M" (App. B); no memory used
        assert count(UNet(in_ch=3, image_size=256, **PRESETS["lsun256"])) == 113_673_219
    net = UNet(in_ch=3, image_size=64, **PRESETS["tiny"])
    assert net(torch.randn(1, 3, 64, 64), torch.tensor([3])).shape == (1, 3, 64, 64)


def test_unet_time_changes_output_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = UNet(in_ch=1, image_size=8, **PRESETS["tiny"])
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x = torch.randn(4, 1, 8, 8)
    for _ in range(3):  # zero-initialised layers (as in the official code) pass gradient on after 2 steps
        opt.zero_grad()
        (net(x, torch.tensor([1, 2, 3, 4])) - x).pow(2).mean().backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    net.eval()
    assert not torch.allclose(net(x[:1], torch.tensor([10])), net(x[:1], torch.tensor([900])))


def test_downsample_pads_like_tf_same():
    """The stride-2 downsampling conv pads as the official TF model ("SAME"): nothing at the top/left, one zero
    row/column at the bottom/right. A kernel with a single 1 at tap (r, c) then reads input pixel (2i + r, 2j + c)."""
    x = torch.randn(1, 1, 8, 8)
    down = common.Downsample(1)
    assert isinstance(down, torch.nn.Conv2d) and set(dict(down.named_parameters())) == {"weight", "bias"}
    with torch.no_grad():
        down.bias.zero_()
        for r, c in ((0, 0), (2, 2), (1, 0)):
            down.weight.zero_()
            down.weight[0, 0, r, c] = 1
            want = torch.tensor([[x[0, 0, 2 * i + r, 2 * j + c] if max(2 * i + r, 2 * j + c) < 8 else 0.0
                                  for j in range(4)] for i in range(4)])  # zero beyond the bottom/right edge
            assert torch.equal(down(x)[0, 0], want), (r, c)
    net = UNet(in_ch=1, image_size=8, **PRESETS["tiny"])
    assert [type(m) for m in net.down if not isinstance(m, torch.nn.ModuleList)] == [common.Downsample]
    assert all(m.eps == 1e-6 for m in net.modules() if isinstance(m, torch.nn.GroupNorm))  # as the official code


def test_unet_28_pads_to_32_and_crops():
    """28x28 runs at 32x32 inside (zero padding right/bottom); the output is cropped back."""
    net = UNet(in_ch=1, image_size=28, ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, attn_res=(16,))
    assert net.factor == 8
    assert any(isinstance(m, common.Attention) for m in net.down.modules())  # 16x16 exists after padding
    assert net(torch.randn(2, 1, 28, 28), torch.tensor([5, 6])).shape == (2, 1, 28, 28)


def test_mlp_signature_and_gradients():
    net = MLP()
    x = torch.randn(5, 2)
    out = net(x, torch.rand(5))
    assert out.shape == (5, 2)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert net(x, torch.arange(5)).shape == (5, 2)  # integer t as well


# ----------------------------------------------------------------------------- data-range contract

@pytest.mark.parametrize("K", [17, 256])
def test_levels_round_trip_and_range(K):
    u = np.arange(K, dtype=np.uint8)
    x = common.levels_to_unit(u, K)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert np.array_equal(common.unit_to_levels(x, K), u)
    # out-of-range values clamp to the end levels; values round to the nearest level
    assert common.unit_to_levels(torch.tensor([-3.0, 5.0]), K).tolist() == [0, K - 1]
    assert common.unit_to_levels(x + 0.4 * 2 / (K - 1), K).tolist() == u.tolist()


def test_digits_default_dataset():
    train, test = load_data("digits"), load_data("digits", train=False)
    assert train.x.shape == (1500, 1, 8, 8) and test.x.shape == (297, 1, 8, 8)
    assert train.levels == 17 and not train.flip
    assert train.x.min() == -1 and train.x.max() == 1
    assert sorted(torch.unique(train.y).tolist()) == list(range(10))
    # every value is one of the 17 levels
    assert torch.allclose(train.x, common.levels_to_unit(common.unit_to_levels(train.x, 17), 17))
    big = load_data("digits", image_size=16)
    assert big.x.shape == (1500, 1, 16, 16)
    assert torch.allclose(big.x, common.levels_to_unit(common.unit_to_levels(big.x, 17), 17))


def test_toys_deterministic_per_seed():
    for name in common.TOYS:
        a, b, c = common.make_toy(name, 500, 1), common.make_toy(name, 500, 1), common.make_toy(name, 500, 2)
        assert a.shape == (500, 2) and torch.equal(a, b) and not torch.equal(a, c)
        assert a.abs().max() < 5
    d = load_data("moons", n_toy=300)
    assert d.x.shape == (300, 2) and d.y is None and d.levels is None


# ----------------------------------------------------------------------------- fixtures in the real formats

def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_mnist_dir(root, name="mnist", n=12):
    d = root / name
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 10
    for pre in ("train", "t10k"):
        write_idx(d / f"{pre}-images-idx3-ubyte.gz", images)
        write_idx(d / f"{pre}-labels-idx1-ubyte.gz", labels)
    return images, labels


def test_idx_loader_reads_real_format(tmp_path):
    images, labels = make_mnist_dir(tmp_path)
    data = load_data("mnist", data_dir=str(tmp_path))
    assert data.x.shape == (12, 1, 28, 28) and data.levels == 256
    assert np.array_equal(common.unit_to_levels(data.x, 256)[:, 0], images)
    assert data.y.tolist() == labels.tolist()


def test_cifar10_loader_reads_pickle_tarball(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "cifar10"
    d.mkdir()
    batches = {}
    with tarfile.open(d / "cifar-10-python.tar.gz", "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [1, 2, 3]}
            batches[name] = batch
            raw = pickle.dumps(batch)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    train = load_data("cifar10", data_dir=str(tmp_path))
    assert train.x.shape == (15, 3, 32, 32) and train.flip and train.levels == 256
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32)  # CIFAR stores R plane, G plane, B plane
    assert np.array_equal(common.unit_to_levels(train.x[0], 256), first)
    test = load_data("cifar10", train=False, data_dir=str(tmp_path))
    assert test.x.shape == (3, 3, 32, 32) and test.y.tolist() == [1, 2, 3]


@pytest.mark.skipif(not os.path.isdir(FASHION), reason=f"real Fashion-MNIST not installed at {FASHION} "
                    "(apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_from_debian_package(tmp_path):
    test = load_data("fashion_mnist", train=False, data_dir=str(tmp_path))  # empty data_dir: the system copy
    assert test.x.shape == (10000, 1, 28, 28) and test.levels == 256
    assert np.bincount(test.y.numpy()).tolist() == [1000] * 10
    assert -1 <= test.x.min() < -0.99 and test.x.max() == 1
    assert 0.2 < (test.x.mean() + 1) / 2 < 0.4  # mean pixel of Fashion-MNIST is ~0.286


def test_folder_loader_grey_and_rgb(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):  # non-square images: centre-cropped, then resized
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "x.jpg")
    rgb = load_data(str(tmp_path), image_size=8)
    assert rgb.x.shape == (4, 3, 8, 8) and rgb.levels == 256 and rgb.y is None
    grey = load_data(str(tmp_path), image_size=16, channels=1)
    assert grey.x.shape == (4, 1, 16, 16)
    assert -1 <= grey.x.min() and grey.x.max() <= 1


# ----------------------------------------------------------------------------- bad input

def test_unknown_dataset_lists_choices():
    with pytest.raises(DataError, match="choose from digits, mnist"):
        load_data("imagenet")


def no_network(*args, **kwargs):
    raise urllib.error.URLError("network unreachable")


def test_missing_files_without_network_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setattr(common.urllib.request, "urlopen", no_network)
    with pytest.raises(DataError, match=r"cannot download .*put the file at .*mnist/train-images-idx3-ubyte.gz"):
        load_data("mnist", data_dir=str(tmp_path))
    assert not any(p.suffix == ".part" for p in tmp_path.rglob("*"))  # no partial download left behind


def test_download_verifies_checksum_and_keeps_nothing_bad(tmp_path, monkeypatch):
    payload = b"not the real file"
    monkeypatch.setattr(common.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    target = tmp_path / "f.gz"
    with pytest.raises(DataError, match="checksum mismatch"):
        common.download("http://example.invalid/f.gz", str(target), "0" * 32)
    assert list(tmp_path.iterdir()) == []
    common.download("http://example.invalid/f.gz", str(target), hashlib.md5(payload).hexdigest())
    assert target.read_bytes() == payload


def test_corrupt_idx_files(tmp_path):
    make_mnist_dir(tmp_path)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:  # bad magic
        f.write(b"\x08\x03\x00\x00" + b"\0" * 100)
    with pytest.raises(DataError, match="bad idx magic"):
        load_data("mnist", data_dir=str(tmp_path))
    write_idx(path, np.zeros((12, 28, 28)))
    raw = path.read_bytes()
    with gzip.open(path, "wb") as f:  # header says 12 images, data holds fewer
        f.write(gzip.decompress(raw)[:-100])
    with pytest.raises(DataError, match="truncated idx"):
        load_data("mnist", data_dir=str(tmp_path))
    path.write_bytes(raw[: len(raw) // 2])  # a cut-off gzip stream
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_data("mnist", data_dir=str(tmp_path))


def test_cifar_tarball_with_path_traversal_is_refused(tmp_path):
    """The tarball is read in place (never extracted); a member named ../x or /x still marks it as bad."""
    (tmp_path / "cifar10").mkdir()
    for evil in ("../data_batch_1", "/etc/data_batch_1"):
        with tarfile.open(tmp_path / "cifar10" / "cifar-10-python.tar.gz", "w:gz") as tar:
            info = tarfile.TarInfo(evil)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
        with pytest.raises(DataError, match="points outside the archive"):
            load_data("cifar10", data_dir=str(tmp_path))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cifar-10-python.tar.gz", "cifar10"]


def test_corrupt_cifar_and_unreadable_image_and_empty_folder(tmp_path):
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "cifar-10-python.tar.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="corrupt CIFAR-10 archive"):
        load_data("cifar10", data_dir=str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no PNG or JPEG"):
        load_data(str(empty))
    (empty / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png: unreadable image"):
        load_data(str(empty))


# ----------------------------------------------------------------------------- data out

def test_grid_scatter_and_npz(tmp_path):
    x = load_data("digits").x[:10]
    common.save_grid(x, str(tmp_path / "g.png"), nrow=5)
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode == "L" and im.width > im.height > 0
    common.save_grid(torch.rand(4, 3, 16, 16) * 2 - 1, str(tmp_path / "c.png"))
    with Image.open(tmp_path / "c.png") as im:
        assert im.mode == "RGB"
    common.save_scatter(common.make_toy("moons", 200), str(tmp_path / "s.png"), data=common.make_toy("moons", 200, 1))
    with Image.open(tmp_path / "s.png") as im:
        assert np.asarray(im).min() < 255  # something was drawn
    common.save_npz(x, str(tmp_path / "s.npz"))
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (10, 8, 8, 1)
    assert np.array_equal(arr[..., 0], common.unit_to_levels(x, 256)[:, 0])


# ----------------------------------------------------------------------------- the shared block

def test_running_it_blocks_are_identical_and_after_the_paper():
    """The fenced "Running it" machinery is byte-identical in all four scripts; it comes after the paper's part (the
    first function after Config is the paper's), its functions are defined nowhere else in the script, and the
    script's own training loop and command line (train, main) follow it."""
    import ast
    root = os.path.join(os.path.dirname(__file__), "..")
    begin, end = "# ==== Running it (not in the paper", "# ==== end of Running it"
    blocks = {}
    for name in ("ddpm", "ddim", "ncsn", "score_sde"):
        text = open(os.path.join(root, f"{name}.py")).read()
        assert text.count(begin) == 1 and text.count(end) == 1, name
        blocks[name] = text[text.index(begin):text.index(end)]
        first, last = text[:text.index(begin)].count("\n") + 1, text[:text.index(end)].count("\n") + 1
        defs = [n for n in ast.parse(text).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        inside = {n.name for n in defs if first < n.lineno < last}
        assert not [n.name for n in defs if n.name in inside and not first < n.lineno < last], name
        after_config = [n for n in defs if n.lineno > next(d.lineno for d in defs if d.name == "Config")]
        assert after_config[0].lineno < first, (name, after_config[0].name)
        assert all(next(n.lineno for n in defs if n.name == f) > last for f in ("train", "main")), name
    assert len(set(blocks.values())) == 1, {k: len(v) for k, v in blocks.items()}


@pytest.mark.parametrize("script", ["ddpm", "ddim", "ncsn", "score_sde"])
def test_every_config_field_is_a_flag_with_help(script):
    """--help is the configuration reference: every Config field has a flag whose help is its inline comment
    (read by the shared config_help)."""
    import dataclasses
    import importlib
    m = importlib.import_module(script)
    helps = m.config_help(m.Config)
    fields = dataclasses.fields(m.Config)
    assert [f.name for f in fields if len(helps.get(f.name, "")) < 8] == [], script
    if script == "ddpm":  # a comment's continuation lines (text in the same column) belong to its field
        assert helps["schedule"].endswith('"linear_snr" (VDM\'s fixed gamma) or "learned" (VDM App. H)'), helps
    text = m.make_parser(m.Config, m.MODES, m.CHOICES, getattr(m, "PRESET_CONFIGS", {}), m.DATA_RECIPES).format_help()
    assert all("--" + f.name.rstrip("_").replace("_", "-") + " " in text for f in fields), script
    assert "images up to 32 px, cpu: --model mini --steps 2000 --batch-size 64" in text, script  # the recipes


@pytest.mark.parametrize("script", ["ddpm", "ddim", "ncsn", "score_sde"])
def test_defaults_follow_the_data(script):
    """follow_data: the first recipe that fits the largest image side and the device sets its values, except what
    the command line or --preset set; a Config made in Python and 2-D toy data are left alone; every recipe's
    fields are Config fields of the right type and its model a preset."""
    import dataclasses
    import importlib
    m = importlib.import_module(script)
    types = {f.name: type(f.default) for f in dataclasses.fields(m.Config)}
    assert [side for side, _, _ in m.DATA_RECIPES] == sorted(side for side, _, _ in m.DATA_RECIPES)
    for _, kind, values in m.DATA_RECIPES:
        assert kind in ("any", "cpu", "cuda") and values.get("model", "tiny") in PRESETS, (script, values)
        assert all(isinstance(v, types[k]) for k, v in values.items()), (script, values)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def follow(shape, device, fixed=()):
        cfg = m.Config()
        cfg.fixed = set(fixed)
        return m.follow_data(cfg, m.DATA_RECIPES, shape, device), cfg

    assert follow((1, 8, 8), cpu)[0] == {} and follow((1, 16, 16), cuda)[0] == {}  # the digits' defaults
    chosen, cfg = follow((1, 28, 28), cpu)
    assert chosen["model"] == cfg.model == "mini" and (cfg.steps, cfg.batch_size) == (2000, 64)
    assert follow((3, 32, 32), torch.device("mps"))[1].model == "mini"  # MPS takes the CPU line
    assert follow((3, 32, 32), cuda)[1].model == "small" and follow((3, 64, 64), cuda)[1].model == "cifar10"
    assert follow((3, 64, 64), cpu)[0] == {}  # no CPU line beyond 32 px
    chosen, cfg = follow((1, 28, 28), cpu, fixed={"model", "batch_size"})  # flags given win
    assert "model" not in chosen and (cfg.model, cfg.batch_size, cfg.steps) == ("tiny", 128, 2000)
    assert follow((2,), cpu)[0] == {}  # 2-D toys
    plain = m.Config()
    assert m.follow_data(plain, m.DATA_RECIPES, (1, 28, 28), cpu) == {} and plain == m.Config()
    # from the command line: the flags given are fixed; a preset named fixes every field, the empty one included
    presets = getattr(m, "PRESET_CONFIGS", {})
    p = m.make_parser(m.Config, m.MODES, m.CHOICES, presets, m.DATA_RECIPES)
    cfg = m.parse_config(p, ["--train", "--batch-size", "8"], m.Config, m.MODES, presets)[2]
    assert cfg.fixed == {"batch_size"} and m.follow_data(cfg, m.DATA_RECIPES, (1, 28, 28), cpu)["model"] == "mini"
    for name in presets:
        cfg = m.parse_config(p, ["--train", "--preset", name], m.Config, m.MODES, presets)[2]
        assert m.follow_data(cfg, m.DATA_RECIPES, (1, 28, 28), cpu) == {}, (script, name)
        assert cfg == m.Config(**presets[name]), (script, name)


FAST = {"ddpm": ["--T", "10"], "ddim": ["--T", "10", "--S", "2"], "ncsn": ["--L", "2", "--n-steps-each", "1"],
        "score_sde": ["--n-steps", "22", "--n-samples", "4"]}


@pytest.mark.parametrize("script", ["ddpm", "ddim", "ncsn", "score_sde"])
def test_train_on_28px_images_takes_the_recipe(script, tmp_path, capsys, device):
    """--train on a folder of 28x28 images: the checkpoint's config holds the recipe's model, batch and EMA for
    this device, and the --steps given (a flag wins); the line it prints says so."""
    import importlib
    m = importlib.import_module(script)
    folder, out = tmp_path / "img", str(tmp_path / "run")
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    m.main(["--train", "--dataset", str(folder), "--image-size", "28", "--steps", "1", "--out", out,
            "--device", device.type, *FAST[script]])
    kind = "cuda" if device.type == "cuda" else "cpu"
    recipe = next(v for side, k, v in m.DATA_RECIPES if 28 <= side and k in ("any", kind))
    config = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]
    assert config["model"] == recipe["model"] and config["steps"] == 1, config
    assert config["batch_size"] == recipe.get("batch_size", m.Config.batch_size), config
    assert config["ema_decay"] == recipe.get("ema_decay", m.Config.ema_decay), config
    assert config["adam_beta2"] == recipe.get("adam_beta2", m.Config.adam_beta2), config
    assert f"for 3x28x28 images on {device.type}: " in capsys.readouterr().out


# ----------------------------------------------------------------------------- a folder streamed from disk

def image_folder(folder, n, size=8, seed=0):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return str(folder)


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_reads_what_memory_holds_and_resumes(tmp_path, device, workers):
    """A folder over stream_gb stays on disk (DiskImages); a Stream's batches are exactly the in-memory images of
    the indices of each step, a pure function of (seed, step), so a stream started at step 3 (a resume) reads
    what a straight one reads there; this rank's part only; asking out of order is refused."""
    folder = image_folder(tmp_path / "img", 12)
    mem, disk = load_data(folder, image_size=8), load_data(folder, image_size=8, stream_gb=0)
    assert isinstance(mem.u, torch.Tensor) and isinstance(disk.u, common.DiskImages)
    assert disk.u.shape == mem.u.shape and torch.equal(disk.x, mem.x)  # 12 <= PREVIEW: the whole set, in order
    B, part = 6, slice(2, 5)
    assert isinstance(common.training_images(disk, device, B, part, seed=7), common.Stream)
    assert isinstance(common.training_images(mem, device, B, part, seed=7), torch.Tensor)
    straight, late = (common.Stream(disk.u, B, part, 7, device, workers) for _ in range(2))
    seen = []
    for step in range(6):
        idx = common.draw_indices(straight, B, device, None, step)
        seen.append(idx)
        u = straight[idx[part]]
        assert u.device.type == device.type and u.dtype == torch.uint8 and u.shape == (3, 3, 8, 8)
        assert torch.equal(u.cpu(), mem.u[idx[part]])
        if step >= 3:
            assert torch.equal(late[common.draw_indices(late, B, device, None, step)[part]].cpu(), u.cpu())
    assert len({tuple(i.tolist()) for i in seen}) == 6  # a new draw each step
    assert not torch.equal(common.Stream(disk.u, B, part, 8, device).indices(0), seen[0])  # the seed matters
    with pytest.raises(RuntimeError, match="out of order"):
        straight[seen[0][part]]  # step 6 is next, not step 0


@pytest.mark.parametrize("workers", [0, 1])
def test_stream_names_an_unreadable_image_in_one_line(tmp_path, workers):
    """A corrupt file in a streamed folder: the DataError a worker raises comes back as one line naming the file
    (not the worker's traceback)."""
    folder = image_folder(tmp_path / "img", 3)
    (tmp_path / "img" / "004.png").write_bytes(b"not a png")
    s = common.Stream(load_data(folder, image_size=8, stream_gb=0).u, 16, slice(0, 16), 0, "cpu", workers)
    with pytest.raises(DataError) as e:
        s[common.draw_indices(s, 16, "cpu", None, 0)]  # 16 draws from 4 files: the bad one is among them
    assert len(str(e.value).splitlines()) == 1 and "004.png: unreadable image" in str(e.value), str(e.value)


def test_a_dropped_stream_frees_its_workers_at_once(tmp_path):
    """A Stream and its DataLoader form no reference cycle: dropping the Stream (at the end of a run) or seeking
    elsewhere (a resume) frees the old loader at once, so its workers are told to stop while its queues are still
    open. Through the garbage collector, DataLoader's shutdown waited out its 5-s timeout instead (seen: 5.2 s per
    run). Caught: a sampler that holds the Stream."""
    import gc
    import weakref
    folder = image_folder(tmp_path / "img", 4)
    s = common.Stream(load_data(folder, image_size=8, stream_gb=0).u, 4, slice(0, 4), 0, "cpu", 1)
    gc.disable()
    try:
        s[common.draw_indices(s, 4, "cpu", None, 0)]
        first = weakref.ref(s.batches)
        s.seek(5)  # a resume elsewhere: a new loader
        assert first() is None
        second = weakref.ref(s.batches)
        del s
        assert second() is None
    finally:
        gc.enable()


def test_disk_preview_is_a_fixed_subset(tmp_path, monkeypatch):
    """Data.x of a set kept on disk is a fixed random subset of PREVIEW images in folder order (statistics such as
    Technique 1 and held-out checks use it), the same on every call."""
    folder = image_folder(tmp_path / "img", 10)
    monkeypatch.setattr(common.DiskImages, "PREVIEW", 4)
    mem, disk = load_data(folder, image_size=8), load_data(folder, image_size=8, stream_gb=0)
    x = disk.x
    assert x.shape == (4, 3, 8, 8) and torch.equal(x, load_data(folder, image_size=8, stream_gb=0).x)
    rows = [next(i for i in range(10) if torch.equal(mem.x[i], xi)) for xi in x]
    assert rows == sorted(rows) and len(set(rows)) == 4


STREAM_FAST = {**FAST, "score_sde": ["--n-steps", "22", "--n-samples", "4", "--sde", "vp"]}


@pytest.mark.parametrize("script", ["ddpm", "ddim", "ncsn", "score_sde"])
def test_train_streams_a_large_folder_and_resumes_exactly(script, tmp_path, monkeypatch, device):
    """--train with a folder over --stream-gb reads it through a Stream (DataLoader workers), and 2 steps + resume
    to 4 equal 4 straight: bitwise on the CPU and on CUDA with --deterministic, to float tolerance on MPS."""
    import importlib
    m = importlib.import_module(script)
    folder = image_folder(tmp_path / "img", 10)
    seeks = []
    real_seek = common.Stream.seek
    monkeypatch.setattr(common.Stream, "seek", lambda self, step: (seeks.append(step), real_seek(self, step))[1])
    det = ["--deterministic"] if device.type == "cuda" else []

    def train(name, steps, *extra):
        m.main(["--train", "--dataset", folder, "--image-size", "8", "--stream-gb", "0", "--steps", str(steps),
                "--batch-size", "4", "--sample-every", "1000", "--ckpt-every", "2", "--out", str(tmp_path / name),
                "--device", device.type, *det, *STREAM_FAST[script], *extra])
        return torch.load(tmp_path / name / "ckpt.pt", weights_only=True)

    try:
        straight = train("straight", 4)
        assert seeks[:4] == [0, 1, 2, 3], seeks
        train("split", 2)
        seeks.clear()
        split = train("split", 4, "--resume")
        assert seeks == [2, 3], seeks  # the resumed run starts the stream at step 2
    finally:
        torch.use_deterministic_algorithms(False)
    assert straight["step"] == split["step"] == 4
    for k, v in straight["model"].items():
        if device.type == "mps":
            torch.testing.assert_close(split["model"][k], v)
        else:
            assert torch.equal(split["model"][k], v), k


@pytest.mark.parametrize("script", ["ddpm", "ddim", "ncsn", "score_sde"])
def test_resume_with_a_foreign_rng_state_is_one_line(script, tmp_path, capsys):
    """A checkpoint whose data-generator state does not fit this device's generator (as a CUDA run's does not fit
    the CPU's) is refused on --resume in one line, exit code 2, no traceback; so is one with no such state.
    In-process (main's one-line errors are main's own: the subprocess tests of each script check the exit path)."""
    import importlib
    import signal
    m = importlib.import_module(script)
    out = tmp_path / "run"
    args = ["--train", "--dataset", "moons", "--batch-size", "8", "--sample-every", "1000", "--out", str(out),
            "--device", "cpu", *FAST[script]]

    def main(*extra):
        try:
            m.main([*args, *extra])
            return 0
        except SystemExit as e:
            return e.code
        finally:  # undo StopFlag's signal handlers
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    assert main("--steps", "1") == 0, capsys.readouterr().err
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    for bad in (torch.zeros(16, dtype=torch.uint8), None):  # the wrong size, or missing
        if bad is None:
            del ckpt["rng"]["data"]
        else:
            ckpt["rng"]["data"] = bad
        torch.save(ckpt, out / "ckpt.pt")
        capsys.readouterr()
        code, err = main("--steps", "2", "--resume"), capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1 and "ckpt.pt" in err, err


@pytest.mark.parametrize("script", ["ddpm", "ddim", "ncsn", "score_sde"])
def test_adam_beta2_reaches_the_optimiser_and_a_resume(script, tmp_path, capsys, device):
    """--adam-beta2 is Adam's beta2 (stored in the checkpoint's config and optimiser state; at step 2 the weights
    differ from the default 0.999's); a --resume runs with its own beta2 on the checkpoint's moments; a checkpoint
    written before the field existed resumes with the default."""
    import importlib
    import signal
    m = importlib.import_module(script)
    args = ["--train", "--dataset", "moons", "--batch-size", "8", "--sample-every", "1000", "--device",
            device.type, *FAST[script]]

    def train(name, steps, *extra):
        try:
            m.main([*args, "--out", str(tmp_path / name), "--steps", str(steps), *extra])
        finally:  # undo StopFlag's signal handlers
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        ckpt = torch.load(tmp_path / name / "ckpt.pt", weights_only=True)
        return ckpt, [tuple(g["betas"]) for g in ckpt["optimizer"]["param_groups"]]

    default, betas = train("default", 2)
    assert betas == [(0.9, 0.999)] and default["config"]["adam_beta2"] == 0.999
    low, betas = train("low", 2, "--adam-beta2", "0.5")
    assert betas == [(0.9, 0.5)] and low["config"]["adam_beta2"] == 0.5
    assert any(not torch.equal(v, low["model"][k]) for k, v in default["model"].items())
    resumed, betas = train("default", 3, "--resume", "--adam-beta2", "0.5")
    assert betas == [(0.9, 0.5)] and resumed["config"]["adam_beta2"] == 0.5 and resumed["step"] == 3
    del resumed["config"]["adam_beta2"]  # as written before the field existed
    torch.save(resumed, tmp_path / "default" / "ckpt.pt")
    old, betas = train("default", 4, "--resume")
    assert betas == [(0.9, 0.999)] and old["step"] == 4, capsys.readouterr().err


@pytest.mark.parametrize("loss", ["ssm", "ism"])
def test_second_order_losses_through_the_unet(loss, device):
    """NCSN's sliced and implicit score matching differentiate the U-Net's output and then backpropagate through
    that derivative: attention's second derivative, which the fused SDPA kernels lack (common.second_order picks
    the plain formula). A step's loss and every gradient are finite, on the device."""
    import ncsn
    net = UNet(in_ch=1, image_size=4, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_res=(4, 2)).to(device)
    x = torch.rand(3, 1, 4, 4, device=device) * 2 - 1
    levels = ncsn.NCSN(1.0, 0.01, 3)
    loss = {"ssm": levels.ssm_loss, "ism": levels.ism_loss}[loss](ncsn.ScoreNet(net, "both"), x)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)
