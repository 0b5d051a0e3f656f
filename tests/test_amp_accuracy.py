"""bf16 autocast learns as well as fp32 on real images: scikit-learn's handwritten digits through the npz path.

`save_digits` also makes the data set of the bf16-against-fp32 table in docs/BENCHMARKS.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import train_teacher
from data import save_npz

sklearn_datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn is in requirements-dev.txt")


def save_digits(path: str | Path, test_fraction: float = 0.2) -> Path:
    """The 1,797 8x8 grey digits (values 0-16, bundled with scikit-learn: no download) as 32x32 RGB uint8, each
    pixel repeated 4x4, split by a fixed stratified shuffle: an npz for --dataset."""
    digits = sklearn_datasets.load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8).repeat(4, axis=1).repeat(4, axis=2)
    images = np.repeat(images[..., None], 3, axis=3)
    rng = np.random.default_rng(0)
    test = np.zeros(len(images), dtype=bool)
    for label in range(10):
        members = rng.permutation(np.flatnonzero(digits.target == label))
        test[members[: round(test_fraction * len(members))]] = True
    labels = digits.target.astype(np.int64)
    save_npz(path, images[~test], labels[~test], images[test], labels[test])
    return Path(path)


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory) -> Path:
    return save_digits(tmp_path_factory.mktemp("digits") / "digits.npz")


def test_digits_fixture_is_a_stratified_32x32_rgb_split(digits_npz):
    with np.load(digits_npz) as data:
        assert data["x_train"].shape == (1438, 32, 32, 3) and data["x_test"].shape == (359, 32, 32, 3)
        assert data["x_train"].dtype == np.uint8 and data["x_train"].max() == 255
        assert np.bincount(data["y_test"]).min() >= 35  # every digit in the test split


def test_bf16_autocast_learns_digits_as_well_as_fp32(digits_npz, tmp_path):
    """Five epochs of res8 from the same seed: both well above chance (10%), within 5 points of each other
    (docs/BENCHMARKS.md has more seeds and epochs: the two agree within their seed spread)."""
    accuracy = {}
    for amp in ("on", "off"):
        summary = train_teacher.main(["--model", "res8", "--dataset", str(digits_npz), "--epochs", "5", "--schedule",
                                      "4", "--batch_size", "32", "--gpu_id", "cpu", "--amp", amp, "--out_dir",
                                      str(tmp_path / amp)])
        assert summary["config"]["amp"] == (amp == "on")
        accuracy[amp] = summary["final_test_acc"]
    assert min(accuracy.values()) > 80.0, accuracy
    assert abs(accuracy["on"] - accuracy["off"]) < 5.0, accuracy
