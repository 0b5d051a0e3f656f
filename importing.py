"""Teachers trained by other code: RepDistiller's and mdistiller's checkpoints, the DIH authors' state dicts.

`train_teacher.py --model NAME --import PATH` turns such a file into an ordinary stage-1 run folder (teacher.pt
with this project's metadata, summary.json), so that stages 2 and 3 use it exactly like a teacher trained here.

Two layouts are read, both with `torch.load(weights_only=True)` only (a file that needs pickled code to load is
refused, never executed):
- RepDistiller / mdistiller: `{'model': state_dict, 'epoch': E, 'accuracy': A, 'optimizer': ...}`, e.g. the
  `<name>_vanilla/ckpt_epoch_240.pth` of RepDistiller's scripts/fetch_pretrained_teachers.sh or of mdistiller's
  cifar_teachers.tar (its `*_best.pth` states `best_acc` instead of `accuracy`);
- a plain state dict, as the DIH authors' code saves its models (`torch.save(model.state_dict(), path)`), with
  `module.` before every key where it ran under DataParallel; torchvision's weight files are such state dicts
  (`~/.cache/torch/hub/checkpoints/resnet34-b627a593.pth` after `torchvision.models.resnet34(weights="DEFAULT")`).

Their key names become ours by explicit rules per architecture family (below), each source key matched whole by
one rule, and every tensor checked against our model's entry of that name: a file of another architecture or
class count is refused in one line, and nothing is ever matched by position.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import assembly
import cli
from checkpoint import FORMAT, model_fingerprint, save_checkpoint
from engine import RESUME_FILE, TrainConfig, evaluate
from models import TapModel
from models.mobilenetv2 import STAGES as MOBILENET_STAGES
from models.mobilenetv2 import MobileNetV2
from models.resnet import ResNet
from models.resnet_cifar import CifarResNet
from models.shufflenet import ShuffleV1, ShuffleV2
from models.torchvision_nets import MOBILENET_V2_STAGE_ENDS, TorchvisionMobileNetV2, TorchvisionResNet
from models.vgg import BenchmarkVGG
from models.wrn import WideResNet
from stages import TeacherTraining
from utils import UserError, atomic_write_json, file_sha256

Rule = tuple[str, Callable[[re.Match], str]]

# RepDistiller's resnet8..110, resnet8x4, resnet32x4 and the DIH authors' ResNet_Cifar (tiny_resnets.py) share
# these names (`downsample`, `fc`); the DIH authors' ResNet-18/34 (massive_resnets.py) and RepDistiller's ResNet50
# (resnetv2.py; Bottlenecks: conv3, bn3) say `shortcut`, `linear`.
RESNET_RULES: list[Rule] = [
    (r"conv1\.(\w+)", lambda m: f"stem.0.{m[1]}"),
    (r"bn1\.(\w+)", lambda m: f"stem.1.{m[1]}"),
    (r"layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3])\.(\w+)", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.{m[3]}.{m[4]}"),
    (r"layer([1-4])\.(\d+)\.(?:downsample|shortcut)\.([01])\.(\w+)",
     lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.shortcut.{m[3]}.{m[4]}"),
    (r"(?:fc|linear)\.(\w+)", lambda m: f"classifier.{m[1]}"),
]
# RepDistiller's wrn_16_2, wrn_40_1, wrn_40_2 (models/wrn.py).
WRN_RULES: list[Rule] = [
    (r"conv1\.weight", lambda m: "stem.weight"),
    (r"block([1-3])\.layer\.(\d+)\.(conv[12]|bn[12])\.(\w+)", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.{m[3]}.{m[4]}"),
    (r"block([1-3])\.layer\.(\d+)\.convShortcut\.weight", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.shortcut.weight"),
    (r"bn1\.(\w+)", lambda m: f"bn.{m[1]}"),
    (r"fc\.(\w+)", lambda m: f"classifier.{m[1]}"),
]
# RepDistiller's vgg8 / vgg13 (models/vgg.py, batch norm): block 0 is our stem; our stages start with their pool.
VGG_RULES: list[Rule] = [
    (r"block0\.(\d+)\.(\w+)", lambda m: f"stem.{m[1]}.{m[2]}"),
    (r"block([1-4])\.(\d+)\.(\w+)", lambda m: f"stages.{int(m[1]) - 1}.{int(m[2]) + 1}.{m[3]}"),
    (r"classifier\.(\w+)", lambda m: f"classifier.{m[1]}"),
]
# RepDistiller's MobileNetV2 (mobilenetv2.py, mobile_half): its groups `blocks.G` sit in our stages by
# models/mobilenetv2.STAGES (group G is block `i` of stage `s`); its `conv.0-7` keep their indices; `conv2` is our
# fifth stage.
MOBILENET_PLACE = {group: (stage, i) for stage, groups in enumerate(MOBILENET_STAGES) for i, group in enumerate(groups)}
MOBILENET_RULES: list[Rule] = [
    (r"conv1\.([01])\.(\w+)", lambda m: f"stem.{m[1]}.{m[2]}"),
    (r"blocks\.([0-6])\.(\d+)\.conv\.([0-7])\.(\w+)",
     lambda m: "stages.{}.{}.{}.conv.{}.{}".format(*MOBILENET_PLACE[int(m[1])], m[2], m[3], m[4])),
    (r"conv2\.([01])\.(\w+)", lambda m: f"stages.{len(MOBILENET_STAGES)}.{m[1]}.{m[2]}"),
    (r"classifier\.0\.(\w+)", lambda m: f"classifier.{m[1]}"),
]
# RepDistiller's ShuffleV1 (ShuffleNetv1.py) and ShuffleV2 (ShuffleNetv2.py): `conv1`/`bn1` stems, `layerL.B` blocks
# (V1: conv1-3; V2: conv1-5 in a stage's down-sampling block, conv1-3 after it), V2's `conv2`/`bn2` (our fourth
# stage), `linear`.
SHUFFLE_STEM_RULES: list[Rule] = [
    (r"conv1\.weight", lambda m: "stem.0.weight"),
    (r"bn1\.(\w+)", lambda m: f"stem.1.{m[1]}"),
    (r"linear\.(\w+)", lambda m: f"classifier.{m[1]}"),
]
SHUFFLE_V1_RULES: list[Rule] = [
    *SHUFFLE_STEM_RULES,
    (r"layer([1-3])\.(\d+)\.(conv[1-3]|bn[1-3])\.(\w+)", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.{m[3]}.{m[4]}"),
]
SHUFFLE_V2_RULES: list[Rule] = [
    *SHUFFLE_STEM_RULES,
    (r"layer([1-3])\.(\d+)\.(conv[1-5]|bn[1-5])\.(\w+)", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.{m[3]}.{m[4]}"),
    (r"conv2\.weight", lambda m: "stages.3.0.weight"),
    (r"bn2\.(\w+)", lambda m: f"stages.3.1.{m[1]}"),
]
# torchvision's resnet18/34/50 (models/resnet.py there): the files `torchvision.models.resnet34(weights=...)` caches.
TORCHVISION_RESNET_RULES: list[Rule] = [
    (r"conv1\.(\w+)", lambda m: f"stem.0.{m[1]}"),
    (r"bn1\.(\w+)", lambda m: f"stem.1.{m[1]}"),
    (r"layer([1-4])\.(\d+)\.((?:conv|bn)[123]|downsample\.[01])\.(\w+)",
     lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.{m[3]}.{m[4]}"),
    (r"fc\.(\w+)", lambda m: f"classifier.{m[1]}"),
]


def _mobilenet_v2_feature(m: re.Match) -> str:
    """features.N.rest -> our stem (N = 0, 1) or stage and position (see MOBILENET_V2_STAGE_ENDS)."""
    index, rest = int(m[1]), m[2]
    if index < 2:
        return f"stem.{index}.{rest}"
    stage = next(i for i, end in enumerate(MOBILENET_V2_STAGE_ENDS) if index <= end)
    start = 2 if stage == 0 else MOBILENET_V2_STAGE_ENDS[stage - 1] + 1
    return f"stages.{stage}.{index - start}.{rest}"


# torchvision's mobilenet_v2: `features.N...` regrouped into stem and stages, its classifier's Linear (`classifier.1`).
TORCHVISION_MOBILENET_V2_RULES: list[Rule] = [
    (r"features\.(1[0-8]|[0-9])\.([\w.]+)", _mobilenet_v2_feature),
    (r"classifier\.1\.(\w+)", lambda m: f"classifier.{m[1]}"),
]
RULES: dict[type, list[Rule]] = {CifarResNet: RESNET_RULES, ResNet: RESNET_RULES, WideResNet: WRN_RULES,
                                 BenchmarkVGG: VGG_RULES, MobileNetV2: MOBILENET_RULES, ShuffleV1: SHUFFLE_V1_RULES,
                                 ShuffleV2: SHUFFLE_V2_RULES, TorchvisionResNet: TORCHVISION_RESNET_RULES,
                                 TorchvisionMobileNetV2: TORCHVISION_MOBILENET_V2_RULES}


@dataclass(frozen=True)
class ForeignCheckpoint:
    """A foreign file's weights with what it says about itself."""

    state: dict[str, Tensor]
    layout: str  # "repdistiller" ({'model': state_dict, ...}) or "state_dict"
    epoch: int | None  # as the file states them; None where it does not
    accuracy: float | None
    sha256: str


def _number(value: Any) -> float | None:
    """A stated epoch or accuracy as a float (RepDistiller stores its accuracy as a tensor); None otherwise."""
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def read_foreign(path: str | Path) -> ForeignCheckpoint:
    """Load a RepDistiller/mdistiller checkpoint or a plain state dict, refusing anything else in one line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--import: no file at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if code:
            raise UserError(f"--import: {path} needs pickled Python code ({code[1]}) to load, which is never run "
                            "here (RepDistiller's *_last.pth keeps its argparse options so): import a "
                            "ckpt_epoch_*.pth or a plain state dict") from None
        raise UserError(f"--import: {path} is not a readable checkpoint (truncated or corrupt?)") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--import: {path} is not a readable checkpoint (truncated or corrupt?): {reason}") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        raise UserError(f"--import: {path} is already a checkpoint of this project: pass it as --teacher_ckpt")
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        layout, state = "repdistiller", obj["model"]
        epoch, accuracy = _number(obj.get("epoch")), _number(obj.get("accuracy", obj.get("best_acc")))
    else:
        layout, state, epoch, accuracy = "state_dict", obj, None, None
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise UserError(f"--import: {path} holds neither a state dict nor a {{'model': state_dict, ...}} checkpoint")
    if all(key.startswith("module.") for key in state):  # saved from a DataParallel wrapper
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return ForeignCheckpoint(state, layout, None if epoch is None else int(epoch), accuracy, file_sha256(path))


def translate(key: str, rules: list[Rule]) -> str | None:
    """Our name for a foreign key: the first rule that matches the whole key; None if none does."""
    for pattern, name in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return name(match)
    return None


def map_state(model: TapModel, name: str, foreign: dict[str, Tensor], num_classes: int, source: str
              ) -> dict[str, Tensor]:
    """`foreign` under our key names, every entry of `model` present once with its exact shape, or a UserError.

    BN's `num_batches_tracked`, absent from files written by PyTorch before 0.4.1, is set to 0 where missing: it
    only counts training steps and changes nothing in evaluation.
    """
    rules = RULES.get(type(model))
    if rules is None:
        raise UserError(f"--import: no key rules for {name}: importable are the CIFAR ResNets, ResNet-18/34/50, the "
                        "WRNs, RepDistiller's vgg8/vgg13, mobilenetv2, shufflev1 and shufflev2, and torchvision's "
                        "resnet18/34/50 and mobilenet_v2")
    own = model.state_dict()
    mapped: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for key, tensor in foreign.items():
        target = translate(key, rules)
        if target is None or target not in own:
            raise UserError(f"--import: {source} does not hold a {name}: its tensor {key} has no place in one")
        if target in mapped:
            raise UserError(f"--import: {source} holds two tensors for {target} ({origin[target]} and {key})")
        mapped[target], origin[target] = tensor, key
    weight = mapped.get("classifier.weight")
    if weight is not None and weight.ndim == 2 and weight.shape[0] != num_classes:
        raise UserError(f"--import: {source} holds a {weight.shape[0]}-class model, but this run's dataset has "
                        f"{num_classes} classes")
    for key, tensor in own.items():
        if key.endswith("num_batches_tracked") and key not in mapped:
            mapped[key] = torch.zeros_like(tensor)
    missing = [key for key in own if key not in mapped]
    if missing:
        raise UserError(f"--import: {source} does not hold a {name}: {len(missing)} of its tensors are missing "
                        f"(first: {missing[0]})")
    wrong = [key for key in own if mapped[key].shape != own[key].shape]
    if wrong:
        key = wrong[0]
        raise UserError(f"--import: {source} does not hold a {name}: {origin[key]} is {tuple(mapped[key].shape)}, "
                        f"a {name} has {tuple(own[key].shape)} there ({len(wrong)} tensors of another shape)")
    return {key: mapped[key].to(own[key].dtype) for key in own}


def import_teacher(name: str, path: str | Path, args: argparse.Namespace, device: torch.device, cfg: TrainConfig,
                   out_dir: Path) -> dict[str, Any]:
    """Write the stage-1 run folder of teacher `name` from the foreign file at `path`; return its summary.

    teacher.pt is this project's checkpoint of the mapped weights (fingerprint, dataset, classes, image size,
    and where they came from); summary.json records the file's sha256, its stated epoch and accuracy, and the
    test accuracy measured here on the run's dataset. With --resume, a folder already holding this very import
    is left as it is.
    """
    path = Path(path)
    foreign = read_foreign(path)  # before any data is loaded
    summary_path = out_dir / "summary.json"
    if summary_path.exists() or (out_dir / RESUME_FILE).exists():
        if not args.resume:
            raise UserError(f"{out_dir} already holds a run: pass --resume to continue it, or choose another --out_dir")
        done = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        if done.get("imported_sha256") == foreign.sha256 and done.get("model") == name:
            print(f"{out_dir} is already finished; nothing to do")
            return done
        raise UserError(f"{out_dir} holds another run than this import of {path}: choose another --out_dir")
    started = time.perf_counter()
    data = cli.load_data(args, device)
    model = assembly.build(name, data.num_classes, device, cfg.channels_last, data.image_size)
    model.load_state_dict(map_state(model, name, foreign.state, data.num_classes, str(path)))
    test_loss, test_acc = evaluate(TeacherTraining(model, name), data, cfg)["model"]
    provenance = {"imported_file": str(path.resolve()), "imported_sha256": foreign.sha256,
                  "imported_layout": foreign.layout, "imported_epoch": foreign.epoch,
                  "imported_accuracy": foreign.accuracy}
    save_checkpoint(out_dir / "teacher.pt", "teacher", model.state_dict(), model=name, dataset=data.name,
                    num_classes=data.num_classes, image_size=data.image_size, epoch=foreign.epoch,
                    args=cli.stored_args(args), fingerprint=model_fingerprint(model), **provenance)
    summary = {"stage": "teacher", "model": name, **provenance, "dataset": data.name, "seed": args.seed,
               "epochs": foreign.epoch, "final_test_acc": test_acc, "final_test_loss": test_loss,
               "wall_time_s": time.perf_counter() - started, "checkpoint": "teacher.pt", "amp": cfg.amp}
    atomic_write_json(summary_path, summary)
    return summary
