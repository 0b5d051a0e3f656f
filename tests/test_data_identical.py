"""The data package yields bit-identical batches to the single data.py it replaced, for every old source.

The digests below were computed with `data.py` of commit a296ee2 (`git show a296ee2:data.py`), imported
in place of the package, running `batch_digest` exactly as written here on the same inputs (CIFAR: the
small archives of tests/test_data.py's `make_fake_cifar`, served from a file:// URL).
"""

import hashlib

import pytest
import torch
from test_data import make_fake_cifar

import data

CPU = torch.device("cpu")
A296EE2 = {
    "synthetic": {"zeros": "3ff67dfb046b338a", "reflect": "0383c34d7bbd37ba"},
    "npz": {"zeros": "7fd3d5ac275b5466", "reflect": "60908ac1d1c3e40a"},
    "cifar10": {"zeros": "66c11a89d18619f8", "reflect": "3cbe043cec925609"},
    "cifar100": {"zeros": "1a501b522395f52c", "reflect": "6f4af82bb9e9db34"},
}


def batch_digest(ds: data.DeviceDataset, pad_mode: str, channels_last: bool = False, batches: int = 3) -> str:
    """sha256 of the class count, statistics, shapes, and the first batches of an epoch and of the test set."""
    h = hashlib.sha256(repr((ds.num_classes, ds.mean, ds.std, tuple(ds.x_train.shape),
                             tuple(ds.x_test.shape))).encode())
    generator = torch.Generator().manual_seed(0)
    for i, (x, y, index) in enumerate(data.train_batches(ds, 64, generator, channels_last, pad_mode)):
        if i == batches:
            break
        for t in (x.contiguous(), y, index):
            h.update(t.numpy().tobytes())
    for i, (x, y) in enumerate(data.test_batches(ds, 64, channels_last)):
        if i == batches:
            break
        for t in (x.contiguous(), y):
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def test_synthetic_batches_unchanged():
    ds = data.load_dataset("synthetic", "unused", CPU)
    assert {mode: batch_digest(ds, mode) for mode in data.PAD_MODES} == A296EE2["synthetic"]
    assert batch_digest(ds, "zeros", channels_last=True) == A296EE2["synthetic"]["zeros"]


def test_npz_batches_unchanged(tmp_path):
    data.save_npz(tmp_path / "d.npz", *data.make_synthetic(200, 70, seed=3))
    ds = data.load_dataset(str(tmp_path / "d.npz"), "unused", CPU)
    assert {mode: batch_digest(ds, mode) for mode in data.PAD_MODES} == A296EE2["npz"]


@pytest.mark.parametrize("spec", ["cifar10", "cifar100"])
def test_cifar_batches_unchanged(tmp_path, spec):
    source, _ = make_fake_cifar(tmp_path / spec, spec)
    ds = data.load_dataset(spec, tmp_path / spec / "data", CPU, source=source)
    assert {mode: batch_digest(ds, mode) for mode in data.PAD_MODES} == A296EE2[spec]
