"""The data package yields bit-identical batches to the single data.py it replaced, for every old source.

The digests below were computed with `data.py` of commit a296ee2 (`git show a296ee2:data.py`), imported
in place of the package, running `batch_digest` exactly as written here on the same inputs (CIFAR: the
small archives of tests/test_data.py's `make_fake_cifar`, served from a file:// URL).

The digest covers what must be identical on every machine: the normalisation constants, the labels, the
sample indices and each augmented pixel as the uint8 value it came from (recovered from the normalised batch
in float64 and rounded). The normalised floats themselves are not hashed: their last bit depends on whether
the CPU's kernel fuses the multiply-add (it differs between AVX-512 machines), so they are checked against
the float64 formula instead.
"""

import hashlib

import pytest
import torch
from helpers import make_fake_cifar

import data

CPU = torch.device("cpu")
A296EE2 = {
    "synthetic": {"zeros": "95b51e67c1386aed", "reflect": "7ad58e5b9ce994d4"},
    "npz": {"zeros": "78ce47480474aff7", "reflect": "5cef11229ae74290"},
    "cifar10": {"zeros": "d8638e197b79b25b", "reflect": "c7bd22818d7d849e"},
    "cifar100": {"zeros": "0d272b0ebd15df8b", "reflect": "2d40817a4be43cca"},
}


def batch_digest(ds: data.DeviceDataset, pad_mode: str, channels_last: bool = False, batches: int = 3) -> str:
    """sha256 of the class count, statistics, shapes, and the first batches of an epoch and of the test set."""
    h = hashlib.sha256(repr((ds.num_classes, ds.mean, ds.std, tuple(ds.x_train.shape),
                             tuple(ds.x_test.shape))).encode())
    generator = torch.Generator().manual_seed(0)
    for i, (x, y, index) in enumerate(data.train_batches(ds, 64, generator, channels_last, pad_mode)):
        if i == batches:
            break
        for t in (pixels(ds, x), y, index):
            h.update(t.numpy().tobytes())
    for i, (x, y) in enumerate(data.test_batches(ds, 64, channels_last)):
        if i == batches:
            break
        for t in (pixels(ds, x), y):
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def pixels(ds: data.DeviceDataset, x: torch.Tensor) -> torch.Tensor:
    """The uint8 pixels a normalised batch was made from; checks the normalisation against float64 on the way."""
    mean = torch.tensor(ds.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(ds.std, dtype=torch.float64).view(1, 3, 1, 1)
    raw = (x.double() * std + mean) * 255.0
    rounded = raw.round()
    assert (raw - rounded).abs().max() < 1e-3 and rounded.min() >= 0 and rounded.max() <= 255
    expected = (rounded / 255.0 - mean) / std
    assert (x.double() - expected).abs().max() < 1e-5
    return rounded.to(torch.uint8).contiguous()


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
