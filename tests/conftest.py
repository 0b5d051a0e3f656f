"""Shared fixtures: tiny datasets as npz files, and a way to run the CLIs as a user would."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from data import make_synthetic, save_npz

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory) -> Path:
    """A small slice of the built-in synthetic dataset, as a user's npz: fast enough for many CPU runs."""
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    save_npz(path, *make_synthetic(256, 128, seed=0))
    return path


@pytest.fixture(scope="session")
def micro_npz(tmp_path_factory) -> Path:
    """64 training and 32 test images of the synthetic set: one batch an epoch, for tests of what runs do around
    training (checks, files, resumption) rather than of training itself."""
    path = tmp_path_factory.mktemp("data") / "micro.npz"
    save_npz(path, *make_synthetic(64, 32, seed=0))
    return path


@pytest.fixture(scope="session")
def res8_teacher(micro_npz, tmp_path_factory) -> Path:
    """A res8 teacher trained for one epoch on `micro_npz`: for tests that need some trained teacher file."""
    import train_teacher

    out = tmp_path_factory.mktemp("res8_teacher")
    train_teacher.main(["--model", "res8", "--dataset", str(micro_npz), "--epochs", "1", "--out_dir", str(out),
                        "--gpu_id", "cpu"])
    return out / "teacher.pt"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class CountingHandler(QuietHandler):
    """Counts the downloads of each path, and answers each request after `delay` seconds, so that clients
    started together are all waiting on the first download.

    torchvision's downloader first probes for redirects with a GET that carries a `Method: HEAD` header and
    reads nothing: not a download, not counted, and its closed connection is no error.
    """

    def __init__(self, *args, counts: Counter, lock: threading.Lock, delay: float, **kwargs):
        self.counts, self.counts_lock, self.delay = counts, lock, delay
        super().__init__(*args, **kwargs)

    def do_GET(self):
        if self.headers.get("Method") != "HEAD":
            with self.counts_lock:
                self.counts[self.path] += 1
        time.sleep(self.delay)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            super().do_GET()


@pytest.fixture
def counting_http_server(tmp_path):
    """Serve tmp_path/serve on 127.0.0.1 slowly (0.2 s a request); yields the base URL and the GET counts by path."""
    counts: Counter = Counter()
    handler = partial(CountingHandler, counts=counts, lock=threading.Lock(), delay=0.2)
    with serving(tmp_path / "serve", handler) as (url, _):
        yield url, counts


@pytest.fixture
def http_server(tmp_path):
    """Serve tmp_path/serve on 127.0.0.1; yields the base URL and a function that stops the server."""
    with serving(tmp_path / "serve", QuietHandler) as served:
        yield served


@contextlib.contextmanager
def serving(folder: Path, handler):
    """An HTTP server of `folder` on a free loopback port, in a thread: (base URL, a function that stops it)."""
    folder.mkdir(exist_ok=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stopped = []

    def stop():
        if not stopped:
            server.shutdown()
            server.server_close()
            stopped.append(True)

    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", stop
    finally:
        stop()


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: int = 300, threads: int = 2,
               preexec_fn: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """Run one of the stage scripts in a fresh interpreter, as from the shell (`preexec_fn`: e.g. a resource limit)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn,
    )


def kill_after_epochs(argv: list[str], out: Path, epochs: int = 1, env: dict[str, str] | None = None) -> None:
    """Start `python argv`, SIGKILL it once `epochs` epochs are on disk in `out`, and check it was cut short.

    The default environment is a bare one on 2 threads, as the CPU tests want; CUDA tests pass their own.
    """
    env = env or {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= epochs:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / "last.pt").exists() and not (out / "summary.json").exists(), "the run was not interrupted"


def metrics_lines(out: Path) -> list[str]:
    """A run's metrics.jsonl, line by line, as written."""
    return (out / "metrics.jsonl").read_text().splitlines()


def assert_resumed(out: Path, before: list[str], output: str) -> None:
    """Proof that a resumed run did not train again what was done before it was killed: it says it resumes after
    epoch N (N at least the rows on disk at the kill), trains epochs N+1 on only, and keeps the rows it found byte
    for byte, their measured `seconds` included, which a run started over would have measured anew.

    `before` is metrics.jsonl's lines at the kill; `output` what the resumed run printed.
    """
    resumed = re.search(rf"^resuming {re.escape(str(out))} after epoch (\d+)$", output, re.M)
    assert resumed, output
    done = int(resumed.group(1))
    assert done >= len(before) >= 1, (done, before)
    trained = [int(epoch) for epoch in re.findall(r"^epoch +(\d+)/", output, re.M)]
    assert trained == list(range(done + 1, done + 1 + len(trained))) and trained, output
    assert metrics_lines(out)[: len(before)] == before


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A bad input: non-zero exit, one line on stderr that says what is wrong, no traceback."""
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def make_learnable(n_train: int, n_test: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Images whose class is their mean colour (plus strong noise): any method that trains its student at all
    is far above chance on it within a few steps, so a method can be checked to learn in seconds."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (10, 3))

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 10
        x = palette[y][:, None, None, :] + rng.normal(0, 40, (n, 32, 32, 3))
        return np.clip(x, 0, 255).astype(np.uint8), y

    return (*split(n_train), *split(n_test))


@pytest.fixture(scope="session")
def learnable_npz(tmp_path_factory) -> Path:
    """160 training and 100 test images of `make_learnable`, as a user's npz."""
    path = tmp_path_factory.mktemp("data") / "learnable.npz"
    save_npz(path, *make_learnable(160, 100))
    return path


class Interrupted(Exception):
    """Raised by `stop_after_first_epoch`: a run stopped in-process after its first epoch, as if killed."""


def stop_after_first_epoch(line: str) -> None:
    """A log function for engine.fit that interrupts the run once its first epoch is logged (and saved)."""
    if line.startswith("epoch"):
        raise Interrupted
