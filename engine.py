"""The one training loop behind all three stages.

A stage (teacher, heads or student) plugs in through the small `Stage` protocol: which module is
trained, the loss of a batch, and the named classifiers to evaluate. The engine owns everything
else: SGD with the multi-step schedule, device-side metrics read once per epoch, evaluation,
metrics.jsonl / summary.json, atomic checkpoints and exact resumption.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from checkpoint import expect_match, load_checkpoint, load_weights, model_fingerprint, save_checkpoint
from data import DeviceDataset, num_train_batches, test_batches, train_batches
from utils import UserError, atomic_write_json, atomic_write_text, lr_at

RESUME_FILE = "last.pt"
# Arguments that may change when a run is resumed: where it runs and where it reads and writes.
RESUMABLE_CHANGES = frozenset({"resume", "gpu_id", "data_dir", "out_dir", "compile", "summary"})


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and execution settings shared by all stages (Table 2 of the paper by default)."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    wd: float
    nesterov: bool
    schedule: tuple[int, ...]
    gamma: float
    seed: int
    amp: bool = False  # bf16 autocast; losses stay in fp32
    compile: bool = False  # torch.compile the training and evaluation steps
    channels_last: bool = False
    eval_batch_size: int = 1000


class Stage(Protocol):
    """What a stage supplies to `fit`."""

    kind: str  # "teacher" | "heads" | "student": names the weights file and summary.json's `stage`
    trainable: nn.Module  # optimised, checkpointed and saved; anything frozen lives outside it
    headline: tuple[str, ...]  # outputs of `evaluate` whose mean accuracy is the stage's test_acc

    def training_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Loss of one batch and the logits of each classifier being trained (for train accuracy)."""
        ...

    def evaluate(self, x: Tensor) -> dict[str, Tensor]:
        """Logits of every classifier worth reporting, by name."""
        ...

    def checkpoint_meta(self) -> dict[str, Any]:
        """Metadata stored beside the final weights so the next stage can rebuild and check them."""
        ...

    def summary_fields(self, last: dict[str, Any]) -> dict[str, Any]:
        """Stage-specific summary.json fields, given the last epoch's metrics."""
        ...


def make_optimizer(stage: Stage, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with (Nesterov) momentum and weight decay over the stage's trainable parameters."""
    params = [p for p in stage.trainable.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd, nesterov=cfg.nesterov)


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast when `cfg.amp` (losses are computed in fp32 by the stages), else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if cfg.amp else contextlib.nullcontext()


def make_train_step(stage: Stage, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> Callable:
    """One optimisation step on a batch, returning (loss, number correct) as device tensors: no host sync."""
    forward = torch.compile(stage.training_step) if cfg.compile else stage.training_step

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with autocast(cfg, x.device):
            loss, logits = forward(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        correct = sum((out.argmax(1) == y).sum() for out in logits) / len(logits)
        return loss.detach().float(), correct

    return step


def fit(
    stage: Stage,
    data: DeviceDataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    args: dict[str, Any],
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train `stage` for `cfg.epochs`, writing into `out_dir`; return the summary.

    With `resume`, a finished run is returned as it is and an interrupted one continues from its
    last completed epoch, ending bit-identical to an uninterrupted run on the CPU.
    """
    out_dir = Path(out_dir)
    device = data.x_train.device
    optimizer = make_optimizer(stage, cfg)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed)
    history: list[dict[str, Any]] = []

    summary_path, resume_path = out_dir / "summary.json", out_dir / RESUME_FILE
    if summary_path.exists() or resume_path.exists():
        if not resume:
            raise UserError(f"{out_dir} already holds a run: pass --resume to continue it, or choose another --out_dir")
        history = _restore(resume_path, stage, optimizer, generator, args)
        if summary_path.exists():
            log(f"{out_dir} is already finished; nothing to do")
            return json.loads(summary_path.read_text())
        log(f"resuming {out_dir} after epoch {history[-1]['epoch']}")

    train_step = make_train_step(stage, optimizer, cfg)
    eval_step = torch.compile(stage.evaluate) if cfg.compile else stage.evaluate
    steps = num_train_batches(data, cfg.batch_size)

    for epoch in range(len(history) + 1, cfg.epochs + 1):
        started = time.perf_counter()
        lr = lr_at(epoch, cfg.lr, list(cfg.schedule), cfg.gamma)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stage.trainable.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        batches = train_batches(data, cfg.batch_size, generator, channels_last=cfg.channels_last)
        for x, y in tqdm(batches, total=steps, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=None):
            loss, batch_correct = train_step(x, y)
            # Accumulated on the device: no host synchronisation inside the epoch.
            loss_sum += loss * y.numel()
            correct += batch_correct
        train_loss, train_correct = (torch.stack([loss_sum, correct]) / len(data.y_train)).tolist()
        if not math.isfinite(train_loss):
            raise UserError(
                f"the training loss became {train_loss} in epoch {epoch} (diverged: try a lower --lr); "
                f"nothing was written for this epoch"
            )
        test = _evaluate(stage, eval_step, data, cfg)
        row = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": train_loss,
            "train_acc": 100.0 * train_correct,
            "test_loss": sum(test[name][0] for name in stage.headline) / len(stage.headline),
            "test_acc": sum(test[name][1] for name in stage.headline) / len(stage.headline),
        }
        if len(test) > 1:
            row["test_acc_by_output"] = {name: acc for name, (_, acc) in test.items()}
        row["seconds"] = time.perf_counter() - started
        history.append(row)
        _save_progress(out_dir, stage, optimizer, generator, history, args)
        log(
            f"epoch {epoch:3d}/{cfg.epochs}  lr {lr:.4g}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.2f}  test loss {row['test_loss']:.4f} acc {row['test_acc']:.2f}  "
            f"{row['seconds']:.1f}s"
        )

    return _finish(out_dir, stage, data, cfg, history, args)


def _evaluate(stage: Stage, eval_step: Callable, data: DeviceDataset, cfg: TrainConfig) -> dict:
    """Per named classifier: (mean cross-entropy, accuracy in percent) over the test set."""
    stage.trainable.eval()
    sums: dict[str, Tensor] = {}
    with torch.inference_mode(), autocast(cfg, data.x_test.device):
        for x, y in test_batches(data, cfg.eval_batch_size, channels_last=cfg.channels_last):
            for name, logits in eval_step(x).items():
                logits = logits.float()
                batch = torch.stack([F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum()])
                sums[name] = sums[name] + batch if name in sums else batch
    count = len(data.y_test)
    return {name: (float(s[0]) / count, 100.0 * float(s[1]) / count) for name, s in sums.items()}


def _save_progress(out_dir, stage, optimizer, generator, history, args) -> None:
    """Everything needed to continue exactly after this epoch, then the metrics so far."""
    save_checkpoint(
        out_dir / RESUME_FILE,
        "resume",
        stage.trainable.state_dict(),
        stage=stage.kind,
        args=args,
        history=history,
        optimizer=optimizer.state_dict(),
        data_rng=generator.get_state(),
        torch_rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    )
    atomic_write_text(out_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))


def _restore(path: Path, stage: Stage, optimizer, generator, args: dict[str, Any]) -> list[dict[str, Any]]:
    ckpt = load_checkpoint(path, "resume", "--resume")
    expect_match(ckpt, "--resume", stage=stage.kind)
    changed = sorted(
        key for key in set(args) | set(ckpt["args"])
        if key not in RESUMABLE_CHANGES and args.get(key) != ckpt["args"].get(key)
    )
    if changed:
        key = changed[0]
        raise UserError(
            f"--resume: this run was started with {key}={ckpt['args'].get(key)!r}, now {args.get(key)!r}; "
            f"resume with the same arguments ({len(changed)} differ: {', '.join(changed)})"
        )
    load_weights(stage.trainable, ckpt, "--resume")
    optimizer.load_state_dict(ckpt["optimizer"])
    generator.set_state(ckpt["data_rng"])
    torch.set_rng_state(ckpt["torch_rng"])
    if ckpt["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    return ckpt["history"]


def _finish(out_dir: Path, stage: Stage, data, cfg: TrainConfig, history, args) -> dict[str, Any]:
    """Write the final weights for the next stage, then summary.json (its presence marks the run done)."""
    weights_file = f"{stage.kind}.pt"
    state = stage.trainable.state_dict()
    save_checkpoint(
        out_dir / weights_file,
        stage.kind,
        state,
        dataset=data.name,
        num_classes=data.num_classes,
        epoch=len(history),
        args=args,
        fingerprint=model_fingerprint(stage.trainable),
        **stage.checkpoint_meta(),
    )
    last = history[-1]
    best = max(history, key=lambda row: row["test_acc"])
    summary = {
        "stage": stage.kind,
        **stage.summary_fields(last),
        "dataset": data.name,
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "final_test_acc": last["test_acc"],
        "best_test_acc": best["test_acc"],
        "best_epoch": best["epoch"],
        "wall_time_s": sum(row["seconds"] for row in history),
        "checkpoint": weights_file,
        "config": asdict(cfg),
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary
