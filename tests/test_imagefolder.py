"""Image folders through the streaming path: the scan and its one-line refusals, decoding to RGB, torchvision's
transforms, random streams independent of the workers, and all three stages on a generated folder."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from conftest import (
    Interrupted,
    assert_clean_failure,
    metrics_lines,
    run_script,
    stop_after_first_epoch,
)
from image_folders import CLASSES, image_bytes, make_image_folder
from PIL import Image

import engine
import students
import test_dih
import train_heads
import train_teacher
from checkpoint import load_checkpoint
from data import DataError, Shard, StreamingDataset, load_dataset, num_train_batches, test_batches, train_batches
from data.imagefolder import index_folder
from data.streaming import crop_box, decode_rgb, eval_view
from utils import UserError

CPU = torch.device("cpu")
# 64 pixels: at 32 torchvision's ResNets end on 1x1 maps, whose batch norms on 8 images a batch leave a teacher's
# evaluation-mode outputs at 1e20 after an epoch.
FAST = ["--gpu_id", "cpu", "--image_size", "64", "--batch_size", "6", "--lr", "0.01", "--workers", "0",
        "--amp", "off"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images") / "pets")


def test_scan_sorts_classes_and_labels_by_folder_name(folder):
    index = index_folder(folder)
    assert index.classes == CLASSES
    assert len(index.train_files) == 18 and len(index.val_files) == 6
    assert [Path(f).parent.name for f in index.train_files] == [CLASSES[y] for y in index.train_labels]
    assert index.name.startswith("folder:pets:")
    data = load_dataset(str(folder), "unused", CPU, image_size=32, workers=0)
    assert isinstance(data, StreamingDataset) and (data.num_classes, data.image_size) == (3, 32)
    assert num_train_batches(data, 8) == 3


def test_grayscale_cmyk_and_png_decode_to_rgb_as_pil_does(folder):
    for path in sorted((folder / "train" / CLASSES[0]).iterdir())[:3]:  # gray JPEG, CMYK JPEG, RGBA PNG
        image = decode_rgb(path.read_bytes(), str(path))
        reference = np.asarray(Image.open(path).convert("RGB"))
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert np.abs(image.permute(1, 2, 0).numpy().astype(int) - reference).max() <= 1, path.name


def test_an_animated_gif_and_a_webp_decode_as_pil_opens_them(tmp_path):
    frames = [Image.open(io.BytesIO(image_bytes(np.random.default_rng(i), 30, 40))).convert("P") for i in range(3)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    frames[1].convert("RGBA").save(tmp_path / "b.webp", lossless=True)
    for path in (tmp_path / "a.gif", tmp_path / "b.webp"):
        image = decode_rgb(path.read_bytes(), str(path))
        assert np.array_equal(image.permute(1, 2, 0).numpy(), np.asarray(Image.open(path).convert("RGB"))), path


def test_evaluation_view_is_torchvisions_resize_and_centre_crop():
    image = decode_rgb(image_bytes(np.random.default_rng(1), 300, 410), "x.jpg")
    reference = T.Compose([T.Resize(256, antialias=True), T.CenterCrop(224)])(image)
    assert torch.equal(eval_view(image, 224), reference)
    assert eval_view(image, 32).shape == (3, 32, 32)


def test_random_resized_crops_keep_torchvisions_scale_and_ratio():
    """Crops inside the image, of 8-100% of its area and ratio 3/4-4/3 (up to rounding); a strip too narrow for any
    such crop gets torchvision's fallback, the centre crop of the clamped ratio."""
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(500):
        height = int(rng.integers(100, 500))
        width = int(height * rng.uniform(0.6, 1.6))
        top, left, h, w = crop_box(height, width, rng)
        assert 0 <= top <= height - h and 0 <= left <= width - w
        areas.append(h * w / (height * width))
        assert 0.07 <= areas[-1] <= 1 and 0.7 <= w / h <= 1.4
    assert min(areas) < 0.15 and max(areas) > 0.9
    assert crop_box(440, 20, np.random.default_rng(1)) == ((440 - 27) // 2, 0, 27, 20)


def test_epochs_are_independent_of_the_workers_and_replay_from_the_generator(folder):
    """Same generator state, same batches, whether 0 or 2 workers decode them: a resumed epoch is the same."""
    batches = {}
    for workers in (0, 2):
        data = load_dataset(str(folder), "unused", CPU, image_size=32, workers=workers)
        generator = torch.Generator().manual_seed(5)
        batches[workers] = [tuple(t.clone() for t in b) for b in train_batches(data, 8, generator)]
    assert len(batches[0]) == 3
    for first, second in zip(batches[0], batches[2], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    x, y, index = batches[0][0]
    assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32) and torch.equal(y, data.y_train[index])
    last = next(iter(train_batches(data, 8, torch.Generator().manual_seed(5), channels_last=True))).x
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, batches[0][0][0])
    again = [b.x for b in train_batches(data, 8, torch.Generator().manual_seed(6))]
    assert not torch.equal(again[0], batches[0][0][0])
    (x_test, y_test), = test_batches(data, 100)
    assert x_test.shape == (6, 3, 32, 32) and torch.equal(y_test, data.y_test)


def test_two_processes_decode_their_shares_of_the_one_process_epoch(folder):
    """With a Shard, each process gets its rows of every global batch (the same crops: an image's crop follows the
    epoch's seed and its index) and its contiguous share of the validation images; together, the one-process epoch."""
    data = load_dataset(str(folder), "unused", CPU, image_size=32, workers=0)
    alone = list(train_batches(data, 8, torch.Generator().manual_seed(5)))
    shares = [list(train_batches(data, 8, torch.Generator().manual_seed(5), shard=Shard(rank, 2))) for rank in (0, 1)]
    for whole, first, second in zip(alone, *shares, strict=True):
        assert (first.start, second.start) == (0, len(first.y)) and first.whole == second.whole == len(whole.y)
        for name in ("x", "y", "index"):
            assert torch.equal(torch.cat([getattr(first, name), getattr(second, name)]), getattr(whole, name))
    tests = [[y for _, y in test_batches(data, 2, shard=Shard(rank, 2))] for rank in (0, 1)]
    assert torch.equal(torch.cat([*tests[0], *tests[1]]), data.y_test) and len(tests[0]) == len(tests[1]) == 2


def broken_copy(folder: Path, tmp_path: Path, breakage: str) -> tuple[Path, str]:
    """A copy of `folder` with one thing wrong; returns it and the path the message must name."""
    root = tmp_path / breakage
    shutil.copytree(folder, root)
    if breakage == "corrupt":
        (root / "train" / "bee" / "003.jpg").write_bytes(b"this is no image at all")
        return root, str(root / "train" / "bee" / "003.jpg")
    if breakage == "empty_file":
        (root / "val" / "cat" / "000.jpg").write_bytes(b"")
        return root, str(root / "val" / "cat" / "000.jpg")
    if breakage == "empty_class":
        shutil.rmtree(root / "train" / "cat")
        (root / "train" / "cat").mkdir()
        return root, str(root / "train" / "cat")
    assert breakage == "val_only_class"
    shutil.copytree(root / "val" / "cat", root / "val" / "dog")
    return root, str(root / "val" / "dog")


@pytest.mark.parametrize(("breakage", "says"), [("corrupt", "is not a JPEG, PNG, GIF or WebP image"),
                                                 ("empty_file", "is an empty file"),
                                                 ("empty_class", "is an empty class folder"),
                                                 ("val_only_class", "class 'dog' is not in")])
def test_bad_folders_are_refused_in_one_line_naming_the_culprit(folder, tmp_path, breakage, says):
    root, culprit = broken_copy(folder, tmp_path, breakage)
    with pytest.raises(DataError, match="^" + culprit.replace("\\", "\\\\").replace(".", r"\.")) as caught:
        index_folder(root)
    assert says in str(caught.value) and "\n" not in str(caught.value)
    if breakage == "corrupt":  # and on the command line: one line, exit 2, nothing trained
        result = run_script("train_teacher.py", "--model", "resnet18", "--dataset", str(root), "--epochs", "1",
                            "--out_dir", str(tmp_path / "out"), *FAST)
        assert_clean_failure(result, culprit, says)


def test_a_truncated_jpeg_is_named_when_decoded(folder, tmp_path):
    root = tmp_path / "truncated"
    shutil.copytree(folder, root)
    path = root / "val" / "bee" / "001.jpg"
    path.write_bytes(path.read_bytes()[:200])
    data = load_dataset(str(root), "unused", CPU, image_size=32, workers=1)
    with pytest.raises(DataError, match=f"^{path} could not be decoded as an image"):
        list(test_batches(data, 4))


@pytest.mark.parametrize(("dataset", "flags", "says"), [
    ("npz", ["--image_size", "64"], "--image_size applies to folders of images and imagenet"),
    ("npz", ["--workers", "2"], "--workers applies to folders of images and imagenet"),
    ("folder", ["--pad_mode", "reflect"], "--pad_mode is the padded crop's"),
    ("folder", ["--decode", "nvjpeg"], "--decode nvjpeg decodes on a CUDA GPU; this run is on cpu"),
    ("imagenet", [], "holds 3 class folders; ILSVRC-2012 has 1000"),
])
def test_folder_flags_are_checked(folder, tiny_npz, tmp_path, dataset, flags, says):
    where = {"npz": ["--dataset", str(tiny_npz)], "folder": ["--dataset", str(folder)],
             "imagenet": ["--dataset", "imagenet", "--data_dir", str(folder)]}[dataset]
    with pytest.raises(UserError, match=re.escape(says)) as caught:
        train_teacher.main(["--model", "resnet18", *where, *flags, "--out_dir", str(tmp_path / "out"),
                            "--gpu_id", "cpu"])
    assert "\n" not in str(caught.value)


def test_three_stages_on_an_image_folder_with_a_group_of_students(folder, tmp_path, monkeypatch, capsys):
    """resnet18 teacher, its pooled heads, then mobilenet_v2 taught by DIH and KD as one group, and a resnet18
    student by DIH; the group killed after its first epoch resumes to exactly the uninterrupted run."""
    teacher = tmp_path / "teacher"
    train_teacher.main(["--model", "resnet18", "--dataset", str(folder), "--epochs", "1", "--out_dir", str(teacher),
                        *FAST])
    heads = tmp_path / "heads"
    summary = train_heads.main(["--teacher", "resnet18", "--teacher_ckpt", str(teacher / "teacher.pt"), "--dataset",
                                str(folder), "--epochs", "1", "--out_dir", str(heads), *FAST])
    assert [h["tap"] for h in summary["heads"]] == ["layer1", "layer2", "layer3", "layer4"]
    assert load_checkpoint(heads / "heads.pt", "heads", "test")["grid"] == [2, 2]
    common = ["--teacher", "resnet18", "--teacher_ckpt", str(teacher / "teacher.pt"), "--heads_ckpt",
              str(heads / "heads.pt"), "--dataset", str(folder), "--epochs", "2", *FAST]
    group = ["--method", "dih", "kd", "--student", "mobilenet_v2", *common]
    test_dih.main([*group, "--dih.out_dir", str(tmp_path / "dih"), "--kd.out_dir", str(tmp_path / "kd")])
    test_dih.main(["--method", "dih", "--student", "resnet18", *common, "--epochs", "1", "--out_dir",
                   str(tmp_path / "dih_res18")])
    assert json.loads((tmp_path / "dih_res18" / "summary.json").read_text())["epochs"] == 1

    cut = ["--dih.out_dir", str(tmp_path / "cut_dih"), "--kd.out_dir", str(tmp_path / "cut_kd")]
    with monkeypatch.context() as patch:
        patch.setattr(students, "fit_group", lambda *args, **kw: engine.fit_group(*args, **kw,
                                                                                 log=stop_after_first_epoch))
        with pytest.raises(Interrupted):
            test_dih.main([*group, *cut])
    assert len(metrics_lines(tmp_path / "cut_dih")) == 1
    capsys.readouterr()
    test_dih.main([*group, *cut, "--resume"])
    assert f"resuming {tmp_path / 'cut_dih'} after epoch 1" in capsys.readouterr().out
    for method in ("dih", "kd"):
        whole = load_checkpoint(tmp_path / method / "student.pt", "student", "test")
        resumed = load_checkpoint(tmp_path / f"cut_{method}" / "student.pt", "student", "test")
        assert resumed["fingerprint"] == whole["fingerprint"]
        assert untimed(tmp_path / method) == untimed(tmp_path / f"cut_{method}")


def untimed(out: Path) -> list[dict]:
    """A run's metrics without the measured seconds."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in metrics_lines(out)]


def test_the_nvjpeg_path_crops_as_the_workers_do(folder, monkeypatch):
    """--decode nvjpeg's logic on the CPU (no GPU here): torchvision's batched decode_jpeg with its device argument
    dropped, PNGs through the per-file fallback; the batches equal the workers' for the same generator. The GPU
    itself (nvjpeg, crops on the device) stays untested."""
    import dataclasses

    from torchvision.io import decode_jpeg

    import data.streaming as streaming

    monkeypatch.setattr(streaming, "decode_jpeg", lambda raw, mode, device: decode_jpeg(raw, mode=mode))
    workers = load_dataset(str(folder), "unused", CPU, image_size=32, workers=0)
    nvjpeg = dataclasses.replace(workers, decode="nvjpeg")
    train = [[b.x for b in train_batches(ds, 8, torch.Generator().manual_seed(3))] for ds in (workers, nvjpeg)]
    tests = [[x for x, _ in test_batches(ds, 4)] for ds in (workers, nvjpeg)]
    for first, second in (train, tests):
        assert len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
