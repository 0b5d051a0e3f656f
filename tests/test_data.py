"""Tests for the data package: on-device augmentation at any size, the synthetic set, npz checks, offline CIFAR."""

import dataclasses
import hashlib
import pickle
import urllib.parse
import urllib.request
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_fake_cifar, md5_of

import data
from data import DataError, DeviceDataset

CPU = torch.device("cpu")


def random_dataset(n_train: int, n_test: int = 5, seed: int = 0, size: int = 32) -> DeviceDataset:
    """Noise images (so every crop is unique) labelled 0..n_train-1, so a label names its source image."""
    rng = np.random.default_rng(seed)
    x_train = torch.from_numpy(rng.integers(0, 256, (n_train, 3, size, size), dtype=np.uint8))
    x_test = torch.from_numpy(rng.integers(0, 256, (n_test, 3, size, size), dtype=np.uint8))
    return DeviceDataset(
        name="noise",
        num_classes=n_train,
        x_train=x_train,
        y_train=torch.arange(n_train),
        x_test=x_test,
        y_test=torch.arange(n_test) % n_train,
        mean=(0.3, 0.5, 0.6),
        std=(0.2, 0.25, 0.3),
    )


def unnormalise(x: torch.Tensor, ds: DeviceDataset) -> np.ndarray:
    """Invert the normalisation back to uint8, checking the values land on integer pixel levels."""
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    pixels = ((x * std + mean) * 255).double().numpy()
    np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)
    return np.round(pixels).astype(np.uint8)


def reference_crop(image: np.ndarray, dy: int, dx: int, flip: bool, pad: int = 4, mode: str = "zeros") -> np.ndarray:
    """torchvision's RandomCrop(S, padding=pad, padding_mode=...) + flip, in numpy: "zeros" pads with 0 (constant)."""
    size = image.shape[-1]
    padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)), mode="constant" if mode == "zeros" else mode)
    crop = padded[:, dy : dy + size, dx : dx + size]
    return crop[:, :, ::-1] if flip else crop


# ------------------------------------------------------------------------------------------ crop/flip


@pytest.mark.parametrize("size", [32, 64, 17])
@pytest.mark.parametrize("mode", data.PAD_MODES)
def test_crop_flip_matches_numpy_pad(mode, size):
    rng = np.random.default_rng(1)
    n = 64
    images = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    offsets = rng.integers(0, 9, (n, 2))
    offsets[:4] = [[0, 0], [8, 8], [0, 8], [8, 0]]  # the extreme corners reach furthest into the reflection
    flips = rng.integers(0, 2, n).astype(bool)
    out = data.crop_flip(torch.from_numpy(images), torch.from_numpy(offsets), torch.from_numpy(flips), pad_mode=mode)
    assert out.dtype == torch.uint8 and out.shape == (n, 3, size, size)
    for i in range(n):
        expected = reference_crop(images[i], *offsets[i], flips[i], mode=mode)
        np.testing.assert_array_equal(out[i].numpy(), expected)


def test_crop_flip_other_pad():
    images = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8))
    offsets = torch.tensor([[0, 4], [4, 0], [2, 3]])
    flips = torch.tensor([True, False, True])
    out = data.crop_flip(images, offsets, flips, pad=2, pad_mode="reflect")
    for i in range(3):
        expected = reference_crop(images[i].numpy(), *offsets[i].tolist(), bool(flips[i]), pad=2, mode="reflect")
        np.testing.assert_array_equal(out[i].numpy(), expected)


# -------------------------------------------------------------------------------------- train batches


def find_augmentation(source: np.ndarray, crop: np.ndarray, mode: str = "zeros") -> tuple[int, int, bool]:
    """The (dy, dx, flip) that turns ``source`` into ``crop``; noise images make it unique."""
    matches = [
        (dy, dx, flip)
        for dy in range(9)
        for dx in range(9)
        for flip in (False, True)
        if np.array_equal(reference_crop(source, dy, dx, flip, mode=mode), crop)
    ]
    assert len(matches) == 1, matches
    return matches[0]


@pytest.mark.parametrize(("size", "mode"), [(32, "zeros"), (64, "zeros"), (64, "reflect")])
def test_train_batches_augment_each_sample_and_normalise(size, mode):
    """Each image of a batch is its source image padded (zeros or mirrored), sliced S x S, flipped or not."""
    ds = random_dataset(64, size=size)
    x, y, index = next(data.train_batches(ds, 64, torch.Generator().manual_seed(0), pad_mode=mode))
    assert torch.equal(ds.y_train[index], y)
    assert x.dtype == torch.float32 and x.shape == (64, 3, size, size) and y.dtype == torch.int64
    pixels = unnormalise(x, ds)
    augmentations = [find_augmentation(ds.x_train[label].numpy(), pixels[i], mode) for i, label in enumerate(y)]
    assert len({(dy, dx) for dy, dx, _ in augmentations}) > 20
    assert {flip for _, _, flip in augmentations} == {False, True}


def test_train_batches_each_sample_once_with_partial_last_batch():
    ds = random_dataset(37)
    assert data.num_train_batches(ds, 8) == 5
    batches = list(data.train_batches(ds, 8, torch.Generator().manual_seed(3)))
    assert [len(b.y) for b in batches] == [8, 8, 8, 8, 5]
    labels = torch.cat([b.y for b in batches])
    assert torch.equal(torch.cat([b.index for b in batches]), labels)  # the labels are the indices here
    assert sorted(labels.tolist()) == list(range(37))
    assert labels.tolist() != list(range(37))  # shuffled


def test_train_batches_replay_from_generator_state():
    ds = random_dataset(40)
    generator = torch.Generator().manual_seed(7)
    state = generator.get_state()
    first = list(data.train_batches(ds, 16, generator))
    second = list(data.train_batches(ds, 16, generator))
    generator.set_state(state)
    replay = list(data.train_batches(ds, 16, generator))
    for (x1, y1, _), (x2, y2, _) in zip(first, replay, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(torch.cat([b.y for b in first]), torch.cat([b.y for b in second]))


def test_train_batches_channels_last_same_values():
    ds = random_dataset(20)
    plain = list(data.train_batches(ds, 8, torch.Generator().manual_seed(5)))
    cl = list(data.train_batches(ds, 8, torch.Generator().manual_seed(5), channels_last=True))
    for (x1, y1, _), (x2, y2, _) in zip(plain, cl, strict=True):
        assert x1.is_contiguous()
        assert x2.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_test_batches_in_order_without_augmentation():
    ds = random_dataset(10, n_test=23)
    for channels_last in (False, True):
        batches = list(data.test_batches(ds, 10, channels_last=channels_last))
        assert [len(y) for _, y in batches] == [10, 10, 3]
        x = torch.cat([x for x, _ in batches])
        np.testing.assert_array_equal(unnormalise(x, ds), ds.x_test.numpy())
        assert torch.equal(torch.cat([y for _, y in batches]), ds.y_test)
        assert batches[0][0].is_contiguous(memory_format=torch.channels_last) == channels_last


def test_bad_batch_size():
    ds = random_dataset(4)
    with pytest.raises(DataError, match="batch size"):
        next(data.train_batches(ds, 0, torch.Generator()))
    with pytest.raises(DataError, match="batch size"):
        data.num_train_batches(ds, 0)


# ------------------------------------------------------------------------------------------ synthetic


def test_synthetic_deterministic_and_balanced():
    first = data.make_synthetic(300, 100)
    second = data.make_synthetic(300, 100)
    for a, b in zip(first, second, strict=True):
        assert a.tobytes() == b.tobytes()
    x_train, y_train, x_test, y_test = first
    assert x_train.shape == (300, 32, 32, 3) and x_train.dtype == np.uint8
    assert x_test.shape == (100, 32, 32, 3) and y_train.dtype == np.int64
    assert np.bincount(y_train).tolist() == [30] * 10 and np.bincount(y_test).tolist() == [10] * 10
    assert x_train.std() > 30  # images, not blank canvases
    assert data.make_synthetic(300, 100, seed=1)[0].tobytes() != x_train.tobytes()


def test_synthetic_colour_statistics_do_not_give_the_class_away():
    """Half the objects wear a class colour, but image-level colour statistics stay near chance (10%)."""
    x, y, _, _ = data.make_synthetic(2000, 0)
    features = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1)
    centroids = np.stack([features[y == c].mean(0) for c in range(10)])
    nearest = np.argmin(((features[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == y).mean() < 0.2


def test_load_synthetic():
    ds = data.load_dataset("synthetic", "unused", CPU)
    assert ds.name == "synthetic" and ds.num_classes == 10
    assert ds.x_train.shape == (10_000, 3, 32, 32) and ds.x_test.shape == (2_000, 3, 32, 32)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert all(0.3 < m < 0.7 for m in ds.mean) and all(0.15 < s < 0.35 for s in ds.std)  # exact: npz test
    assert data.load_dataset("synthetic", "unused", CPU).x_train.data_ptr() != ds.x_train.data_ptr()
    assert data.dataset_tag("synthetic") == "synthetic"


# ------------------------------------------------------------------------------------------------ npz


def small_arrays(n_train: int = 20, n_test: int = 8, classes: int = 4, size: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (n_train, size, size, 3), dtype=np.uint8),
        "y_train": np.arange(n_train) % classes,
        "x_test": rng.integers(0, 256, (n_test, size, size, 3), dtype=np.uint8),
        "y_test": np.arange(n_test) % classes,
    }


@pytest.mark.parametrize("size", [32, 64, 16])
def test_npz_round_trip(tmp_path, size):
    arrays = small_arrays(size=size)
    path = tmp_path / "my data.npz"
    data.save_npz(path, **arrays)
    assert [p.name for p in tmp_path.iterdir()] == ["my data.npz"]  # no temporary file left behind
    ds = data.load_dataset(str(path), "unused", CPU)
    assert ds.num_classes == 4
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert ds.name == f"npz:my data:{digest}"
    assert data.dataset_tag(str(path)) == "my_data"
    for split in ("train", "test"):
        x, y = getattr(ds, f"x_{split}"), getattr(ds, f"y_{split}")
        np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), arrays[f"x_{split}"])
        np.testing.assert_array_equal(y.numpy(), arrays[f"y_{split}"])
        assert x.is_contiguous() and y.dtype == torch.int64
    pixels = arrays["x_train"].reshape(-1, 3) / 255
    np.testing.assert_allclose(ds.mean, pixels.mean(0), atol=1e-9)
    np.testing.assert_allclose(ds.std, pixels.std(0), atol=1e-9)
    assert ds.image_size == size


def test_from_arrays():
    arrays = small_arrays(size=48)
    ds = data.from_arrays(**arrays, device=CPU, name="mine", num_classes=6, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    assert (ds.name, ds.num_classes, ds.mean, ds.std, ds.image_size) == ("mine", 6, (0.5,) * 3, (0.2,) * 3, 48)
    np.testing.assert_array_equal(ds.x_test.permute(0, 2, 3, 1).numpy(), arrays["x_test"])
    measured = data.from_arrays(**arrays, device=CPU)
    assert measured.num_classes == 4
    np.testing.assert_allclose(measured.mean, (arrays["x_train"].reshape(-1, 3) / 255).mean(0), atol=1e-9)
    with pytest.raises(DataError, match="mine: labels reach 3, but there are 3 classes") as exc:
        data.from_arrays(**arrays, device=CPU, name="mine", num_classes=3)
    check_one_line(exc)
    with pytest.raises(DataError, match="mine: x_test has dtype float32"):
        data.from_arrays(**{**arrays, "x_test": arrays["x_test"].astype(np.float32)}, device=CPU, name="mine")


def malformed(**changes) -> dict[str, np.ndarray]:
    arrays = small_arrays()
    arrays.update(changes)
    return {k: v for k, v in arrays.items() if v is not None}


U8 = np.uint8
NPZ_CASES = {
    "missing array": (malformed(y_test=None), r"lacks array\(s\) y_test"),
    "float images": (malformed(x_train=np.zeros((20, 32, 32, 3), np.float32)), "x_train has dtype float32"),
    "channels first": (malformed(x_test=np.zeros((8, 3, 32, 32), U8)), r"x_test has shape \(8, 3, 32, 32\)"),
    "not square": (malformed(x_train=np.zeros((20, 32, 28, 3), U8)), r"expected \(N, S, S, 3\): square RGB"),
    "too small": (malformed(x_train=np.zeros((20, 8, 8, 3), U8)), r"S >= 16"),
    "sizes differ": (malformed(x_test=np.zeros((8, 64, 64, 3), U8)), "x_train holds 32x32 images but x_test 64x64"),
    "empty split": (
        malformed(x_test=np.zeros((0, 32, 32, 3), U8), y_test=np.zeros(0, int)),
        "x_test is empty",
    ),
    "float labels": (malformed(y_train=np.zeros(20, np.float64)), "y_train has dtype float64"),
    "2-d labels": (malformed(y_train=np.zeros((20, 1), np.int64)), r"y_train has shape \(20, 1\)"),
    "label count": (malformed(y_test=np.zeros(7, np.int64)), "y_test has 7 labels but x_test has 8 images"),
    "negative label": (malformed(y_train=np.arange(20) % 4 - 1), "y_train has negative labels"),
    "unseen test class": (malformed(y_test=np.array([0, 1, 2, 3, 4, 5, 0, 1])), "absent from y_train"),
    "single class": (malformed(y_train=np.zeros(20, int), y_test=np.zeros(8, int)), "single class"),
    "huge label": (malformed(y_train=np.r_[np.arange(19) % 4, 10**6]), "labels must be class indices"),
    "object array": (malformed(y_test=np.array([0, "x"] * 4, dtype=object)), "y_test could not be read"),
}


def check_one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("case", NPZ_CASES)
def test_npz_malformations(tmp_path, case):
    arrays, pattern = NPZ_CASES[case]
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=pattern) as exc:
        data.load_dataset(str(path), "unused", CPU)
    check_one_line(exc)


def test_npz_file_problems(tmp_path):
    cases = {
        tmp_path / "absent.npz": "not found",
        tmp_path / "text.npz": "not an npz",
        tmp_path / "dir.npz": "not found",
        tmp_path / "truncated.npz": "not an npz",
    }
    (tmp_path / "text.npz").write_text("x_train,y_train\n1,2\n")
    (tmp_path / "dir.npz").mkdir()
    np.savez(tmp_path / "whole.npz", **small_arrays())
    whole = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "truncated.npz").write_bytes(whole[: len(whole) // 2])  # central directory cut off
    np.save(tmp_path / "plain.npy", np.zeros(3))
    (tmp_path / "plain.npy").rename(tmp_path / "plain.npz")
    cases[tmp_path / "plain.npz"] = "not an npz"
    for path, pattern in cases.items():
        with pytest.raises(DataError, match=pattern) as exc:
            data.load_dataset(str(path), "unused", CPU)
        check_one_line(exc)


def test_npz_corrupt_member(tmp_path):
    path = tmp_path / "corrupt.npz"
    data.save_npz(path, **small_arrays())
    raw = bytearray(path.read_bytes())
    start = raw.index(b"x_train.npy") + 200  # inside the first member's compressed data
    raw[start : start + 64] = bytes(64)
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError) as exc:
        data.load_dataset(str(path), "unused", CPU)
    assert "corrupt.npz" in check_one_line(exc)


def test_data_url_only_for_downloaded_datasets(tmp_path):
    for spec in ("synthetic", str(tmp_path / "mine.npz")):
        with pytest.raises(DataError, match="--data_url is a mirror of a downloaded archive .*tinyimagenet") as exc:
            data.load_dataset(spec, tmp_path, CPU, url="http://mirror.example/x.zip")
        check_one_line(exc)


def test_unknown_dataset():
    for call in (partial(data.dataset_tag, "imagenet21k"), partial(data.load_dataset, "imagenet21k", ".", CPU)):
        with pytest.raises(DataError, match="unknown dataset 'imagenet21k': choose cifar10, cifar100, .*, imagenet, a "
                                            "path to a .npz file or a folder of images") as exc:
            call()
        check_one_line(exc)


# ---------------------------------------------------------------------------------------------- CIFAR








def check_loaded(ds: DeviceDataset, spec: str, expected: dict[str, np.ndarray]) -> None:
    official = data.CIFAR_SOURCES[spec]
    assert ds.name == spec and ds.num_classes == official.num_classes
    assert ds.mean == official.mean and ds.std == official.std
    for key, value in expected.items():
        np.testing.assert_array_equal(getattr(ds, key).numpy(), value)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64


def test_cifar10_download_over_http_then_offline(tmp_path, http_server):
    base_url, stop = http_server
    source, expected = make_fake_cifar(tmp_path, "cifar10")
    source = dataclasses.replace(source, url=f"{base_url}/{source.archive}")
    data_dir = tmp_path / "data"
    check_loaded(data.load_dataset("cifar10", data_dir, CPU, source=source), "cifar10", expected)
    assert sorted(p.name for p in data_dir.iterdir()) == sorted([source.archive, source.folder])
    stop()
    check_loaded(data.load_dataset("cifar10", data_dir, CPU, source=source), "cifar10", expected)
    with pytest.raises(DataError, match="no network") as exc:  # nothing on disk, server gone
        data.load_dataset("cifar10", tmp_path / "elsewhere", CPU, source=source)
    assert "place cifar-10-python.tar.gz there, pass --data_dir, or a mirror with --data_url" in check_one_line(exc)


def test_cifar_from_data_url(tmp_path):
    """--data_url replaces the official URL; here a plain local path, the simplest mirror."""
    source, expected = make_fake_cifar(tmp_path, "cifar10")
    mirror = urllib.request.url2pathname(urllib.parse.urlparse(source.url).path)
    source = dataclasses.replace(source, url="http://127.0.0.1:9/unreachable")
    ds = data.load_dataset("cifar10", tmp_path / "data", CPU, source=source, url=mirror)
    check_loaded(ds, "cifar10", expected)


def test_cifar100_from_file_url(tmp_path):
    source, expected = make_fake_cifar(tmp_path, "cifar100")
    assert source.url.startswith("file://")
    data_dir = tmp_path / "data"
    check_loaded(data.load_dataset("cifar100", data_dir, CPU, source=source), "cifar100", expected)
    # Extracted files are used as they are, even once the archive is gone.
    (data_dir / source.archive).unlink()
    check_loaded(data.load_dataset("cifar100", data_dir, CPU, source=source), "cifar100", expected)


def test_cifar_wrong_archive_md5(tmp_path, http_server):
    base_url, _ = http_server
    source, _ = make_fake_cifar(tmp_path, "cifar10")
    source = dataclasses.replace(source, url=f"{base_url}/{source.archive}", archive_md5="0" * 32)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="fails its md5 check") as exc:
        data.load_dataset("cifar10", data_dir, CPU, source=source)
    check_one_line(exc)
    assert list(data_dir.iterdir()) == []  # the bad download is not kept


def test_cifar_bad_archive_already_present(tmp_path):
    source, _ = make_fake_cifar(tmp_path, "cifar10")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / source.archive).write_bytes(b"not the archive")
    with pytest.raises(DataError, match="fails its md5 check .*: delete it to download it again") as exc:
        data.load_dataset("cifar10", data_dir, CPU, source=source)
    check_one_line(exc)


def tamper(folder: Path, source: data.CifarSource) -> data.CifarSource:
    """One byte of an extracted batch changed: its md5 no longer matches."""
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-1] + b"\x00")
    return source


def unparsable(folder: Path, source: data.CifarSource) -> data.CifarSource:
    """A batch whose md5 matches the (changed) table but is not a CIFAR batch: a pickle of another class."""
    batch = folder / "test_batch"
    batch.write_bytes(pickle.dumps({b"data": dataclasses.field}))
    return dataclasses.replace(source, test_files=(("test_batch", md5_of(batch)),))


@pytest.mark.parametrize(("damage", "message"), [(tamper, "data_batch_3 is missing or fails its md5 check"),
                                                 (unparsable, "could not parse .*test_batch")])
def test_cifar_extracted_file_damaged(tmp_path, damage, message):
    source, _ = make_fake_cifar(tmp_path, "cifar10")
    data_dir = tmp_path / "data"
    data.load_dataset("cifar10", data_dir, CPU, source=source)
    source = damage(data_dir / source.folder, source)
    with pytest.raises(DataError, match=message) as exc:
        data.load_dataset("cifar10", data_dir, CPU, source=source)
    check_one_line(exc)


def test_official_sources_come_from_torchvision():
    c10, c100 = data.CIFAR_SOURCES["cifar10"], data.CIFAR_SOURCES["cifar100"]
    assert c10.archive_md5 == "c58f30108f718f92721af3b95e74349a"
    assert c100.archive_md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    assert [name for name, _ in c10.train_files] == [f"data_batch_{i}" for i in range(1, 6)]
    assert (c100.folder, c100.label_key, c100.num_classes) == ("cifar-100-python", b"fine_labels", 100)


def test_cifar_data_dir_is_a_file(tmp_path):
    source, _ = make_fake_cifar(tmp_path, "cifar10")
    (tmp_path / "occupied").write_text("")
    with pytest.raises(DataError, match="cannot create the data directory .*occupied") as exc:
        data.load_dataset("cifar10", tmp_path / "occupied", CPU, source=source)
    check_one_line(exc)


def test_synthetic_mini_is_the_synthetic_renderer_averaged_down_to_16x16():
    """`make demo`'s set: the first images of the built-in set's streams (the train split does not depend on the
    test split's size), each pixel the rounded mean of a 2x2 block; the same labels."""
    mini = data.SOURCES["synthetic-mini"].load(Path("unused"))
    x_train, y_train, x_test, y_test = data.make_synthetic(2_000, 1_000, seed=0)
    assert mini.name == "synthetic-mini" and mini.num_classes == 10
    assert tuple(mini.x_train.shape) == (2_000, 3, 16, 16) and tuple(mini.x_test.shape) == (1_000, 3, 16, 16)
    block = x_train[:5].reshape(5, 16, 2, 16, 2, 3).mean((2, 4))
    np.testing.assert_array_equal(np.asarray(mini.x_train[:5]).transpose(0, 2, 3, 1), (block + 0.5).astype(np.uint8))
    np.testing.assert_array_equal(np.asarray(mini.y_train), y_train)
    np.testing.assert_array_equal(np.asarray(mini.y_test), y_test)
