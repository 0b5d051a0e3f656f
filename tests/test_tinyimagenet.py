"""Tiny-ImageNet, offline: small archives in the official layout (generated JPEGs, some grayscale)."""

import dataclasses
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_failure, run_script
from helpers import ANNOTATIONS, OFFICIAL, TINY_ROOT, WNIDS, jpeg, make_archive, source_for

import data
import train_teacher
from data import DataError, cache

# torchvision 0.29 deprecates its JPEG codecs in favour of TorchCodec; they are still the ones SPEC names.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
CPU = torch.device("cpu")








def check(ds: data.DeviceDataset, expected: dict) -> None:
    assert (ds.name, ds.num_classes, ds.image_size) == ("tinyimagenet", 3, 64)
    assert ds.mean == (0.4802, 0.4481, 0.3975) and ds.std == (0.2770, 0.2691, 0.2821)
    for key, value in expected.items():
        np.testing.assert_array_equal(getattr(ds, key).numpy(), value, err_msg=key)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    gray = ds.x_train[1]  # the second image of the first class was written single-channel
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


def test_download_decode_cache_and_reread(tmp_path, http_server, capsys):
    base_url, stop = http_server
    archive = tmp_path / "serve" / OFFICIAL.archive
    expected = make_archive(archive)
    source = source_for(archive, f"{base_url}/{OFFICIAL.archive}")
    data_dir = tmp_path / "data"
    check(data.load_dataset("tinyimagenet", data_dir, CPU, source=source), expected)
    assert "decoding the 15 labelled JPEGs" in capsys.readouterr().out
    assert sorted(p.name for p in data_dir.iterdir()) == ["tiny-imagenet-200.uint8", "tiny-imagenet-200.zip"]
    stop()
    (data_dir / OFFICIAL.archive).unlink()  # the cache alone serves a second run
    check(data.load_dataset("tinyimagenet", data_dir, CPU, source=source), expected)
    assert capsys.readouterr().out == ""


def test_file_url_and_a_zip_already_there(tmp_path):
    archive = tmp_path / "mirror" / OFFICIAL.archive
    expected = make_archive(archive)
    source = source_for(archive)
    check(data.load_dataset("tinyimagenet", tmp_path / "a", CPU, source=source), expected)
    (tmp_path / "b").mkdir()
    shutil.copy(archive, tmp_path / "b")
    offline = dataclasses.replace(source, url="http://127.0.0.1:9/unreachable.zip")
    check(data.load_dataset("tinyimagenet", tmp_path / "b", CPU, source=offline), expected)


@pytest.mark.parametrize(("change", "message"), [({"archive_md5": "0" * 32}, "fails its md5 check"),
                                                 ({"archive_size": 1234}, "bytes, expected 1,234")])
def test_wrong_md5_or_size_refused(tmp_path, http_server, change, message):
    base_url, _ = http_server
    archive = tmp_path / "serve" / OFFICIAL.archive
    make_archive(archive)
    source = dataclasses.replace(source_for(archive, f"{base_url}/{OFFICIAL.archive}"), **change)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match=message) as exc:
        data.load_dataset("tinyimagenet", data_dir, CPU, source=source)
    assert "downloaded from http" in one_line(exc)
    assert list(data_dir.iterdir()) == []  # the bad download is not kept
    shutil.copy(archive, data_dir)  # the same archive placed there by hand is refused too, and left alone
    with pytest.raises(DataError, match=f"{message}.*delete it to download it again") as exc:
        data.load_dataset("tinyimagenet", data_dir, CPU, source=source)
    one_line(exc)


def test_data_dir_is_a_file(tmp_path):
    (tmp_path / "occupied").write_text("")
    with pytest.raises(DataError, match="cannot create the data directory .*occupied") as exc:
        data.load_dataset("tinyimagenet", tmp_path / "occupied", CPU)
    one_line(exc)


def damage_payload(raw: bytes) -> bytes:
    return raw[:-200] + bytes([raw[-200] ^ 1]) + raw[-199:]


CACHE_DAMAGE = {
    "truncated": (lambda raw: raw[: len(raw) // 2], "truncated"),
    "one pixel changed": (damage_payload, "fails its checksum"),
    "header changed": (lambda raw: raw.replace(b'"shape": [9, 3', b'"shape": [9, 2'), "fails its checksum"),
    "header garbled": (lambda raw: raw[:30] + b"\xff" + raw[31:], "unreadable header"),
    "not a cache": (lambda raw: b"PK\x03\x04 something else", "does not start like a cache file"),
}


@pytest.mark.parametrize("damage", CACHE_DAMAGE)
def test_damaged_cache_is_rebuilt_never_used(tmp_path, capsys, damage):
    archive = tmp_path / "mirror" / OFFICIAL.archive
    expected = make_archive(archive)
    source = source_for(archive)
    data_dir = tmp_path / "data"
    data.load_dataset("tinyimagenet", data_dir, CPU, source=source)
    path = source.cache_path(data_dir)
    good = path.read_bytes()
    change, reason = CACHE_DAMAGE[damage]
    path.write_bytes(change(good))
    capsys.readouterr()
    check(data.load_dataset("tinyimagenet", data_dir, CPU, source=source), expected)
    out = capsys.readouterr().out
    assert f"{path} " in out and reason in out and "rebuilding it" in out
    assert path.read_bytes() == good  # rebuilt whole, bit for bit
    # With nothing to rebuild from, a damaged cache is still refused rather than used.
    path.write_bytes(change(good))
    (data_dir / OFFICIAL.archive).unlink()
    offline = dataclasses.replace(source, url="http://127.0.0.1:9/unreachable.zip")
    with pytest.raises(DataError, match="could not download Tiny-ImageNet"):
        data.load_dataset("tinyimagenet", data_dir, CPU, source=offline)


def test_stale_cache_is_rebuilt(tmp_path, capsys):
    """A cache made from another archive (here: another md5) is never used for this one."""
    archive = tmp_path / "mirror" / OFFICIAL.archive
    make_archive(archive, seed=0)
    data_dir = tmp_path / "data"
    data.load_dataset("tinyimagenet", data_dir, CPU, source=source_for(archive))
    other = make_archive(archive, seed=1)
    (data_dir / OFFICIAL.archive).unlink()
    capsys.readouterr()
    check(data.load_dataset("tinyimagenet", data_dir, CPU, source=source_for(archive)), other)
    assert "was made for another archive_md5, archive_size (stale): rebuilding it" in capsys.readouterr().out


def corrupt(archive: Path) -> None:
    """Flip bytes in the middle of the zip, inside some member's compressed data."""
    raw = bytearray(archive.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 16] = bytes(b ^ 0xFF for b in raw[middle : middle + 16])
    archive.write_bytes(bytes(raw))


with warnings.catch_warnings():  # built at collection, before pytestmark applies
    warnings.simplefilter("ignore", DeprecationWarning)
    SMALL_JPEG = jpeg(np.random.default_rng(5), 32)
BROKEN = {
    "corrupt zip": ({}, "is corrupt"),
    "no val_annotations.txt": ({"drop": (ANNOTATIONS,)}, f"has no {ANNOTATIONS}: not a Tiny-ImageNet archive"),
    "no wnids.txt": ({"drop": (f"{TINY_ROOT}/wnids.txt",)}, f"has no {TINY_ROOT}/wnids.txt"),
    "unknown wnid": ({"extra": {ANNOTATIONS: "val_0.JPEG\tn00000000\t0\t0\t1\t1\n"}}, f"line 1 of {ANNOTATIONS}"),
    "val image absent": ({"drop": (f"{TINY_ROOT}/val/images/val_3.JPEG",)}, "val_3.JPEG is labelled in"),
    "class without images": ({"extra": {f"{TINY_ROOT}/wnids.txt": "\n".join([*WNIDS, "n02222222"])}},
                             "no training images for class n02222222"),
    "image too small": ({"extra": {f"{TINY_ROOT}/train/{WNIDS[0]}/images/x.JPEG": SMALL_JPEG}},
                        "x.JPEG is 32x32 pixels, expected 64x64"),
    "not a JPEG": ({"extra": {f"{TINY_ROOT}/train/{WNIDS[0]}/images/x.JPEG": b"GIF89a"}},
                   "x.JPEG is not a readable JPEG"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_archive_one_line_and_no_cache(tmp_path, case):
    changes, message = BROKEN[case]
    archive = tmp_path / "data" / OFFICIAL.archive
    make_archive(archive, **changes)
    if case == "corrupt zip":
        corrupt(archive)
    with pytest.raises(DataError, match=message) as exc:
        data.load_dataset("tinyimagenet", archive.parent, CPU, source=source_for(archive, "http://127.0.0.1:9/x"))
    one_line(exc)
    assert [p.name for p in archive.parent.iterdir()] == [OFFICIAL.archive]  # no cache, nothing half-written


def test_stage_script_reads_the_official_cache(tmp_path):
    """`--dataset tinyimagenet` through train_teacher.py, offline: the cache of the official archive is all it
    reads (here holding the small archive's images), and a --data_url mirror of the wrong file is refused."""
    archive = tmp_path / "mirror" / OFFICIAL.archive
    make_archive(archive)
    source = source_for(archive)
    data.load_dataset("tinyimagenet", tmp_path / "build", CPU, source=source)
    arrays, info = cache.read(source.cache_path(tmp_path / "build"), source.cache_key())
    (tmp_path / "data").mkdir()
    cache.write(OFFICIAL.cache_path(tmp_path / "data"), arrays, OFFICIAL.cache_key(), info)

    out = tmp_path / "run"
    summary = train_teacher.main(["--model", "res8", "--dataset", "tinyimagenet", "--data_dir", str(tmp_path / "data"),
                                  "--epochs", "1", "--gpu_id", "cpu", "--out_dir", str(out)])
    ckpt = torch.load(out / summary["checkpoint"], weights_only=True)
    assert (ckpt["dataset"], ckpt["num_classes"], ckpt["image_size"]) == ("tinyimagenet", 3, 64)
    assert data.dataset_tag("tinyimagenet") == "tinyimagenet" and "tinyimagenet" in data.BUILTIN

    empty = tmp_path / "empty"
    result = run_script("train_teacher.py", "--dataset", "tinyimagenet", "--data_dir", str(empty), "--data_url",
                        archive.as_uri(), "--gpu_id", "cpu", "--out_dir", str(tmp_path / "refused"))
    assert_clean_failure(result, f"has {archive.stat().st_size:,} bytes, expected 248,100,043")
    assert list(empty.iterdir()) == []
