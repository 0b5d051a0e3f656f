"""What several test files share: fakes, small generated inputs in real formats, stages on tiny models, the fast
path's reference step. Test files import these from here (or fixtures from conftest.py), never from each other."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from foreign_layouts import random_state, repdistiller_shapes
from PIL import Image
from torch import Tensor, nn
from torchvision.io import encode_jpeg

import bench
import data
import reproduce
import test_dih
import train_heads
import train_teacher
from benchmarks import harness
from data import from_arrays
from engine import TrainConfig
from heads import heads_for, tofd_aux_for
from methods import METHODS, Setup
from models import build_model

CPU = torch.device("cpu")
CLASSES, SIZE = 10, 16  # of build_stage's stages: classes, image size


def model_and_images(name: str) -> tuple[nn.Module, Tensor]:
    """Model `name` of the zoo (10 classes, from seed 0) in eval mode, and two random 32x32 images."""
    torch.manual_seed(0)
    return build_model(name, 10).eval(), torch.randn(2, 3, 32, 32)


class FakeCuda:
    """Stands in for CUDA: warm-up runs the step eagerly; capture records it without running it (as CUDA does)
    and returns a replay that runs it on the static batch, writing into the static outputs."""

    def __init__(self, optimizer: torch.optim.Optimizer, no_logits: bool = False):
        self.optimizer, self.no_logits = optimizer, no_logits
        self.warmed: list[tuple[int, ...]] = []
        self.captured: list[tuple[tuple[int, ...], float]] = []

    def warm(self, step, inputs):
        self.warmed.append(tuple(inputs[0].x.shape))
        return step(*inputs)

    def capture(self, step, static):
        self.captured.append((tuple(static[0].x.shape), self.optimizer.param_groups[0]["lr"]))
        outputs = (torch.zeros(()), None if self.no_logits else torch.zeros(()))

        def replay():
            loss, correct = step(*static)
            outputs[0].copy_(loss)
            if correct is not None:
                outputs[1].copy_(correct)

        return replay, outputs


def parsers_and_help(monkeypatch, capsys) -> dict[str, tuple[argparse.ArgumentParser, str]]:
    """Each script's parser and its --help text, from the script's own main."""
    seen: list[argparse.ArgumentParser] = []
    real = argparse.ArgumentParser.format_help
    monkeypatch.setattr(argparse.ArgumentParser, "format_help", lambda self: seen.append(self) or real(self))
    out = {}
    for name, main in [("train_teacher.py", train_teacher.main), ("train_heads.py", train_heads.main),
                       ("test_dih.py", test_dih.main), ("reproduce.py", reproduce.main), ("bench.py", bench.main)]:
        with pytest.raises(SystemExit) as exit_:
            main(["--help"])
        assert exit_.value.code == 0
        out[name] = (seen[-1], capsys.readouterr().out)
    return out


def repdistiller_checkpoint(path: Path, theirs: str, classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A `ckpt_epoch_240.pth` as RepDistiller's train_teacher.py writes it: its accuracy a tensor, an optimizer
    state beside the weights. Returns the weights."""
    state = random_state(repdistiller_shapes(theirs, classes), seed)
    momentum = {0: {"momentum_buffer": torch.zeros(3)}}
    optimizer = {"state": momentum, "param_groups": [{"lr": 5e-4, "momentum": 0.9, "nesterov": False, "params": [0]}]}
    torch.save({"epoch": 240, "model": state, "accuracy": torch.tensor(72.34), "optimizer": optimizer}, path)
    return state


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_batch(path: Path, x: np.ndarray, labels: dict[bytes, np.ndarray]) -> None:
    """A pickled batch in CIFAR's layout: byte-string keys, data uint8 (N, 3072), labels as lists."""
    entry = {b"batch_label": b"test batch", b"data": x.reshape(len(x), -1), b"filenames": [b"a.png"] * len(x)}
    entry.update({key: value.tolist() for key, value in labels.items()})
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def make_fake_cifar(root: Path, spec: str) -> tuple[data.CifarSource, dict[str, np.ndarray]]:
    """A tiny archive in the official format; returns a CifarSource pointing at it and the arrays written."""
    official = data.CIFAR_SOURCES[spec]
    rng = np.random.default_rng(len(spec))
    folder = root / "build" / official.folder
    folder.mkdir(parents=True)
    splits: dict[str, list] = {"train": [], "test": []}
    md5s: dict[str, list] = {"train": [], "test": []}
    for split, files in (("train", official.train_files), ("test", official.test_files)):
        for name, _ in files:
            n = int(rng.integers(3, 7))
            x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
            fine = rng.integers(0, official.num_classes, n)
            if spec == "cifar10":
                write_batch(folder / name, x, {b"labels": fine})
            else:
                write_batch(folder / name, x, {b"fine_labels": fine, b"coarse_labels": fine // 5})
            splits[split].append((x, fine))
            md5s[split].append((name, md5_of(folder / name)))
    meta_name = "batches.meta" if spec == "cifar10" else "meta"
    with open(folder / meta_name, "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(official.num_classes)]}, f, protocol=2)
    archive = root / "serve" / official.archive
    archive.parent.mkdir(exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=official.folder)
    source = dataclasses.replace(
        official,
        url=archive.as_uri(),
        archive_md5=md5_of(archive),
        train_files=tuple(md5s["train"]),
        test_files=tuple(md5s["test"]),
    )
    expected = {
        f"{kind}_{split}": np.concatenate([pair[i] for pair in splits[split]])
        for split in ("train", "test")
        for i, kind in enumerate("xy")
    }
    return source, expected


OFFICIAL = data.TINYIMAGENET


TINY_ROOT = "tiny-imagenet-200"


WNIDS = ["n09999999", "n01000001", "n05555555"]  # wnids.txt is not sorted; labels follow the sorted order


ANNOTATIONS = f"{TINY_ROOT}/val/val_annotations.txt"
LABEL = {wnid: i for i, wnid in enumerate(sorted(WNIDS))}


def pil_rgb(raw: bytes) -> np.ndarray:
    """PIL's decoding with .convert("RGB") (what the authors' ImageFolder did), as CHW."""
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")).transpose(2, 0, 1)


def jpeg(rng: np.random.Generator, size: int = 64, gray: bool = False) -> bytes:
    """A JPEG of random 8x8-pixel blocks, single-channel if `gray` (as some Tiny-ImageNet files are)."""
    blocks = torch.from_numpy(rng.integers(0, 256, (1 if gray else 3, size // 8, size // 8), dtype=np.uint8))
    image = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2).contiguous()
    return encode_jpeg(image, quality=90).numpy().tobytes()


def make_archive(path: Path, seed: int = 0, drop: tuple[str, ...] = (), extra: dict | None = None) -> dict:
    """Write a zip in Tiny-ImageNet's layout (members shuffled); return the arrays a correct loader yields.

    `drop` leaves members out and `extra` adds or replaces members, to make broken archives.
    """
    rng = np.random.default_rng(seed)
    members: dict[str, str | bytes] = {f"{TINY_ROOT}/wnids.txt": "\n".join(WNIDS) + "\n",
                                       f"{TINY_ROOT}/words.txt": "".join(f"{w}\tthing {w}\n" for w in WNIDS)}
    train = {}
    for wnid in WNIDS:
        for i in range(3):
            train[f"{TINY_ROOT}/train/{wnid}/images/{wnid}_{i}.JPEG"] = jpeg(rng, gray=i == 1)
        boxes = "".join(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(3))
        members[f"{TINY_ROOT}/train/{wnid}/{wnid}_boxes.txt"] = boxes
    val = [(f"val_{j}.JPEG", WNIDS[j % 3], jpeg(rng, gray=j == 2)) for j in range(6)]
    members.update({f"{TINY_ROOT}/val/images/{name}": raw for name, _, raw in val})
    members[ANNOTATIONS] = "".join(f"{name}\t{wnid}\t1\t2\t60\t61\n" for name, wnid, _ in val)
    members[f"{TINY_ROOT}/test/images/test_0.JPEG"] = jpeg(rng)
    members |= train
    members |= extra or {}
    names = [name for name in members if name not in drop]
    rng.shuffle(names)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in names:
            zf.writestr(name, members[name])
    ordered = sorted(train, key=lambda name: (LABEL[name.split("/")[2]], name))
    return {
        "x_train": np.stack([pil_rgb(train[name]) for name in ordered]),
        "y_train": np.array([LABEL[name.split("/")[2]] for name in ordered]),
        "x_test": np.stack([pil_rgb(raw) for _, _, raw in val]),
        "y_test": np.array([LABEL[wnid] for _, wnid, _ in val]),
    }


def source_for(archive: Path, url: str | None = None) -> data.TinyImageNetSource:
    """The official description, pointed at a local archive: its URL, md5 and size."""
    raw = archive.read_bytes()
    return dataclasses.replace(OFFICIAL, url=url or archive.as_uri(), archive_md5=hashlib.md5(raw).hexdigest(),
                               archive_size=len(raw))


def random_dataset(device: torch.device, n: int, size: int):
    """`n` random images of `size` pixels (classes in turn) on `device`; the first 8 are the test set."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, size, size, 3), generator=gen, dtype=torch.uint8).numpy()
    y = (torch.arange(n) % CLASSES).numpy()
    return from_arrays(x, y, x[:8], y[:8], device)


def build_stage(method: str, device: torch.device = CPU, n: int = 32, size: int = SIZE, channels_last: bool = False,
                **hyper):
    """`method`'s stage on tiny fresh models (res8 student and teacher) and `n` random images on `device`, the same
    weights at each call (tests/test_cuda.py builds its stages here too)."""
    torch.manual_seed(0)
    layout = {"memory_format": torch.channels_last if channels_last else torch.preserve_format}
    dataset = random_dataset(device, n, size)
    teacher = build_model("res8", CLASSES)
    student = build_model("res8", CLASSES)  # before any method's modules: the same student for every method
    spec = METHODS[method]
    teacher_ckpt = None
    if spec.teacher == "tofd":  # TOFD's teacher carries trained auxiliary classifiers: random ones do here
        aux = tofd_aux_for(teacher, CLASSES, size)
        teacher_ckpt = {"extras": {"state_dict": nn.ModuleDict({"aux": aux}).state_dict()}}
    heads = heads_for(teacher, CLASSES, size).to(device).eval().requires_grad_(False) if spec.heads else None
    setup = Setup(student.to(device, **layout), teacher.to(device, **layout).eval().requires_grad_(False),
                  {**spec.defaults, **hyper}, dataset, meta={}, heads=heads, teacher_ckpt=teacher_ckpt)
    stage = spec.build(setup)
    stage.extras.to(device, **layout)
    return stage


# (loss rtol, gradient relative error). fp32 differs only in summation order (measured: 0 and 1e-6). bf16 keeps
# 8 mantissa bits: measured 3e-4 on the loss and up to 5e-2 on the gradients of a random-init res8 at batch 16.
TOLERANCE = {False: (1e-5, 1e-4), True: (5e-3, 1e-1)}


def fast(kind: str, models: harness.Models, x: Tensor, y: Tensor, cfg: TrainConfig,
         device: torch.device = CPU) -> tuple[float, dict[str, Tensor]]:
    """Loss and gradients from the project's step for stage `kind` (a run alone: its teacher pass, its step)."""
    stage = harness.fast_stage(kind, models, cfg, device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    loss = harness.engine_step(stage, cfg)(x.to(device).contiguous(memory_format=memory_format), y.to(device))
    return loss.item(), {name: p.grad for name, p in stage.model.named_parameters()}


def reference(kind: str, models: harness.Models, x: Tensor, y: Tensor,
              device: torch.device = CPU) -> tuple[float, dict[str, Tensor]]:
    """The same step written out plainly: fp32, NCHW, eager, the cohort loss of SPEC section 1 member by member."""
    teacher, heads, student = (copy.deepcopy(m).to(device) for m in (models.teacher, models.heads, models.student))
    x, y = x.to(device), y.to(device)
    if kind == "teacher":
        trainable = teacher.train()
        loss = F.cross_entropy(teacher(x), y)
    else:
        teacher.eval()
        with torch.no_grad():
            final, features, _ = teacher.forward_features(x)
        if kind == "heads":
            trainable = heads
            loss = sum(F.cross_entropy(head(f.flatten(1)), y) for head, f in zip(heads.heads, features, strict=True))
        else:
            with torch.no_grad():
                cohort = [final, *(head(f.flatten(1)) for head, f in zip(heads.heads, features, strict=True))]
            trainable = student.train()
            logits, tau, alpha = student(x), harness.TEMPERATURE, harness.ALPHA
            log_q = F.log_softmax(logits / tau, 1)
            loss = sum(
                (1 - alpha) * F.cross_entropy(logits, y)
                + alpha * tau**2 * F.kl_div(log_q, F.softmax(h / tau, 1), reduction="batchmean")
                for h in cohort
            )
    loss.backward()
    return loss.item(), {name: p.grad for name, p in trainable.named_parameters()}


def relative_error(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    """‖got − want‖ / ‖want‖ over all gradients (or weights) together (the direction SGD takes)."""
    assert got.keys() == want.keys()
    diff = sum(((got[k].double() - want[k].double()) ** 2).sum() for k in want)
    return float((diff / sum((w.double() ** 2).sum() for w in want.values())).sqrt())
