"""pytest options shared by every test file: the device the suite runs on.

    python -m pytest -q tests                  # CPU (what CI runs)
    python -m pytest -q tests --device cuda    # the same suite on a GPU (also: mps, auto)

Tests take the `device` fixture (a torch.device) and make their tensors and CLI runs there. A test that can
only run on the CPU is marked `@pytest.mark.cpu_only("reason")` and is skipped elsewhere with that reason.
"""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=("cpu", "cuda", "mps", "auto"),
                     help="device to run the tests on (default cpu; auto = cuda, else mps, else cpu)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only(reason): runs only with --device cpu; the reason says why")


def chosen_device(config):
    name = config.getoption("--device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: this torch build sees no CUDA device")
    if name == "mps" and not torch.backends.mps.is_available():
        raise pytest.UsageError("--device mps: MPS is not available here")
    return torch.device(name)


def pytest_collection_modifyitems(config, items):
    device = chosen_device(config)
    if device.type == "cpu":
        return
    for item in items:
        mark = item.get_closest_marker("cpu_only")
        if mark is not None:
            why = mark.args[0] if mark.args else "CPU-only test"
            item.add_marker(pytest.mark.skip(reason=f"cpu_only on --device {device.type}: {why}"))


@pytest.fixture(scope="session")
def device(request):
    """The torch.device chosen with --device (default cpu)."""
    return chosen_device(request.config)


@pytest.fixture(scope="session")
def f64(device):
    """The widest float the device has: float64, except on MPS (no float64 there) float32."""
    return torch.float32 if device.type == "mps" else torch.float64
