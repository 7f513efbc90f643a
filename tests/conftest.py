"""pytest options shared by every test file: the device the suite runs on.

    python -m pytest -q -n 2 tests                  # CPU, two pytest-xdist workers (what CI runs)
    python -m pytest -q -n 2 tests --device cuda    # the same suite on a GPU (also: mps, auto)

Without -n the suite runs in one process, as before; with it every worker runs torch (and the scripts it starts)
on one thread.

Tests take the `device` fixture (a torch.device) and make their tensors and CLI runs there. A test that can
only run on the CPU is marked `@pytest.mark.cpu_only("reason")` and is skipped elsewhere with that reason.
"""
import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", choices=("cpu", "cuda", "mps", "auto"),
                     help="device to run the tests on (default cpu; auto = cuda, else mps, else cpu)")


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_only(reason): runs only with --device cpu; the reason says why")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n 2`: two workers share the cores; one thread each (and for the
        torch.set_num_threads(1)               # scripts they start), since oversubscribed threads run many times
        os.environ["OMP_NUM_THREADS"] = "1"    # slower (README, "On a busy CPU")


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


@pytest.fixture
def one_process():
    """call(main, *args): a script's main(args) in this process on one thread, as the tests' subprocess runs do in
    a fresh one (OMP_NUM_THREADS=1, the threads of each torchrun rank) -> a CompletedProcess with its exit code
    and printed output. The 1-process references of the torchrun tests use it: each saves a Python start-up
    (~4 s on the CI machine). It undoes the StopFlag's signal handlers and restores the thread count."""
    import contextlib
    import io
    import signal
    import subprocess

    def call(main, *args):
        out, err, code, threads = io.StringIO(), io.StringIO(), 0, torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                main(list(args))
        except SystemExit as e:
            code = e.code
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            torch.set_num_threads(threads)
        return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    return call


def two_ranks(script, args, cwd, timeout=300):
    """What `torchrun --nproc_per_node=2 script args` starts, without torchrun's own process: the two ranks with
    the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), one
    thread each -> a CompletedProcess with both ranks' output (rank 0's first) and the first non-zero exit code.
    The tests that compare 2 processes with 1 use it: it saves torchrun's own Python start-up (~4 s on the CI
    machine) per run. Signals and torchrun's failure summary are tested through torchrun itself."""
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, files = [], []
    for rank in range(2):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # files, not pipes: no full pipe
        files.append((out, err))                                                # can stall a rank in a collective
        procs.append(subprocess.Popen([sys.executable, script, *args], cwd=cwd, env=env, stdout=out, stderr=err,
                                      text=True))
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs):
        if time.time() > deadline or any(p.poll() for p in procs):  # a rank failed: the other may wait for it
            time.sleep(1)
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.05)
    codes = [p.wait() for p in procs]
    text = []
    for out, err in files:
        out.seek(0), err.seek(0)
        text.append((out.read(), err.read()))
        out.close(), err.close()
    code = next((c for c in codes if c), 0)
    return subprocess.CompletedProcess(args, code, "".join(o for o, _ in text), "".join(e for _, e in text))
