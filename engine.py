"""The one training loop behind every stage and every distillation method.

A stage (teacher, heads, or a student of some method) plugs in by subclassing `Stage`: which module it
delivers, which extra modules it trains beside it, the loss of a batch, its phases, and the named
classifiers to evaluate. The engine owns everything else: SGD with the multi-step schedule, device-side
metrics read once per epoch, evaluation, metrics.jsonl / summary.json, atomic checkpoints and exact
resumption, across phase boundaries included.

Runs are trained in groups (`fit_group`; `fit` is a group of one). Runs that share a seed, a dataset and a recipe
draw the same augmented batches in the same order, so each epoch the driver draws and augments each batch once,
computes each frozen pass they share (a teacher's forward: `Stage.shared_pass`) once, then takes every run's own
step with its own optimizer, schedule and random streams. A run keeps its folder, checkpoints and random streams
exactly as alone, so a grouped run is bit-identical to its solo run: the same code computes both.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import distributed
from checkpoint import expect_match, load_checkpoint, load_weights, model_fingerprint, save_checkpoint
from cuda_graphs import GraphedStep
from data import DEFAULT_PAD_MODE, Batch, Dataset, Shard, num_train_batches, test_batches, train_batches
from random_streams import (
    capture_random_streams,
    restore_random_state,
    restore_random_streams,
    resume_seed,
    run_generators,
    save_random_state,
)
from utils import UserError, WriteError, atomic_write_json, atomic_write_text, lr_at

RESUME_FILE = "last.pt"
EXTRAS_FILE = "extras.pt"
# Arguments that may change when a run is resumed: where and how fast it runs, where it reads and writes. The
# effective precision (which --amp gives on the device) is checked on its own, and so is the number of processes
# (`world_size`), by `Run._restore`.
RESUMABLE_CHANGES = frozenset({"resume", "gpu_id", "data_dir", "data_url", "out_dir", "amp", "compile", "summary",
                               "workers", "dist_timeout", "world_size"})

StepOutput = tuple[Tensor, list[Tensor]]  # (loss, logits of each classifier being trained)
Needs = frozenset[str]  # what a phase reads of its stage's shared pass (see `SharedPass`)


class SharedPass:
    """A frozen computation on each batch that several runs share, such as a teacher's forward pass.

    Every run whose stage holds the same object gets it computed once per batch for all of them, for the union
    of what their current phases need (`Phase.needs`); `select` then hands each run only what its own phase
    declared, so that a run reads the same values, in the same structure, alone or in any group.
    """

    def __call__(self, batch: Batch, needs: Needs) -> Any:
        raise NotImplementedError

    def select(self, outputs: Any, needs: Needs) -> Any:
        """The part of `outputs` (computed for a union of needs) that a phase needing `needs` reads."""
        return outputs


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
    compile: bool = False  # torch.compile the forward and loss of the training step, and the evaluation step
    channels_last: bool = False
    cuda_graphs: bool = False  # replay the whole training step, optimizer included, from CUDA graphs
    pad_mode: str = DEFAULT_PAD_MODE  # of the random crop: "zeros" (the authors' code) or "reflect"
    sync_bn: bool = False  # in a run of several processes, batch norm over the global batch (distributed.py)
    eval_batch_size: int = 1000


@dataclass(frozen=True)
class Phase:
    """A stretch of epochs with its own loss, its own parameters and a fresh optimizer.

    Most stages have one phase of `--epochs`; FitNets has a hint phase before it. `constant_lr` keeps
    `--lr` throughout instead of following `--schedule` (which counts epochs from the phase's start).
    `loss(batch, shared)` gets what `needs` asks of the stage's shared pass (None when it needs nothing).
    """

    name: str
    epochs: int
    parameters: list[nn.Parameter]
    loss: Callable[[Batch, Any], StepOutput]
    constant_lr: bool = False
    needs: Needs = frozenset()


class Stage:
    """What a stage supplies to `fit`; subclasses override `training_step` at least.

    `model` is what the run delivers (saved as `<kind>.pt`, the file the next stage or any tool loads);
    `extras` are further modules it trains or updates (a method's regressors, embeddings, memory banks,
    auxiliary classifiers), saved apart in extras.pt so that the model file stays the plain model.
    Both are put in train mode for training, in eval mode for evaluation, and restored on --resume;
    frozen networks (a teacher) are kept outside them. A frozen pass that other runs may share (a student's
    teacher) is `shared_pass`, and `needs` says what the default phase reads of it.
    """

    kind: str  # "teacher" | "heads" | "student": names the weights file and summary.json's `stage`
    headline: tuple[str, ...] = ("model",)  # outputs of `evaluate` whose mean accuracy is the run's test_acc
    shared_pass: SharedPass | None = None
    needs: Needs = frozenset()

    def __init__(self, kind: str, model: nn.Module, extras: dict[str, nn.Module] | None = None):
        self.kind, self.model = kind, model
        self.extras = nn.ModuleDict(extras or {})
        self.trainable = nn.ModuleDict({"model": model, "extras": self.extras})

    def phases(self, epochs: int) -> list[Phase]:
        """The run's phases; by default one phase of `epochs` training everything trainable."""
        return [Phase("train", epochs, trainable_parameters(self.trainable), self.training_step, needs=self.needs)]

    def start_epoch(self, epoch: int) -> None:
        """Called before each training epoch with its 1-based number within its phase (TOFD's temperature)."""

    def training_step(self, batch: Batch, shared: Any = None) -> StepOutput:
        """Loss of one batch and the logits of each classifier being trained (for train accuracy); `shared` is
        what `needs` asks of the shared pass."""
        raise NotImplementedError

    def training_loss(self, batch: Batch) -> StepOutput:
        """The default phase's loss of one batch, its shared pass computed for it alone (tools and tests)."""
        shared = self.shared_pass.select(self.shared_pass(batch, self.needs), self.needs) if self.needs else None
        return self.training_step(batch, shared)

    def evaluate(self, x: Tensor) -> dict[str, Tensor]:
        """Logits of every classifier worth reporting, by name; by default the model's own."""
        return {"model": self.model(x)}

    def checkpoint_meta(self) -> dict[str, Any]:
        """Metadata stored beside the final weights so the next stage can rebuild and check them."""
        return {}

    def summary_fields(self, last: dict[str, Any]) -> dict[str, Any]:
        """Stage-specific summary.json fields, given the last epoch's metrics."""
        return {}

    def provenance(self) -> dict[str, dict[str, str]]:
        """The trained networks the run learns from, by role: {"teacher": {"file": path, "fingerprint": ...}}.

        Recorded in last.pt; --resume refuses a run whose inputs changed on disk since (a teacher retrained in
        place), which would otherwise finish as a mixture of two runs.
        """
        return {}


def trainable_parameters(*modules: nn.Module) -> list[nn.Parameter]:
    """The parameters of `modules` that require gradients, each once."""
    return list({id(p): p for m in modules for p in m.parameters() if p.requires_grad}.values())


def make_optimizer(parameters: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with (Nesterov) momentum and weight decay, as the paper trains every stage."""
    return torch.optim.SGD(list(parameters), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd,
                           nesterov=cfg.nesterov)


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast when `cfg.amp` (losses are computed in fp32 by the stages), else nothing.

    Its cache of bf16 weight copies is off under CUDA graphs, whose captured memory must not outlive a step.
    """
    if not cfg.amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not cfg.cuda_graphs)


StepResult = tuple[Tensor, Tensor | None]  # (loss, number correct): device tensors
TrainStep = Callable[[Batch, Any], StepResult]


def make_train_step(loss_fn: Callable[[Batch, Any], StepOutput], optimizer: torch.optim.Optimizer,
                    cfg: TrainConfig) -> TrainStep:
    """One optimisation step on a batch (and what the phase reads of its shared pass), returning (loss, number
    correct) as device tensors: no host sync.

    The number correct is None when the loss trains no classifier.
    `cfg.compile` compiles the forward and the loss, and through AOTAutograd their backward; the optimizer stays
    eager (compiling SGD took 74 s on 2 CPU cores to save 4 of ~240 ms per res110 step, and recompiles at each
    LR). `cfg.cuda_graphs` replays the whole step, optimizer included, from CUDA graphs: see `GraphedStep`.
    """
    forward = torch.compile(loss_fn) if cfg.compile else loss_fn

    parameters = [p for group in optimizer.param_groups for p in group["params"]]

    def step(batch: Batch, shared: Any = None) -> StepResult:
        with autocast(cfg, batch.x.device):
            loss, logits = forward(batch, shared)
        optimizer.zero_grad(set_to_none=True)
        if batch.whole is None:
            loss.backward()
        else:  # one process's share of a global batch: the shares' gradients sum to the global batch's
            (loss * batch.share).backward()
            distributed.reduce_gradients(parameters)
        optimizer.step()
        if not logits:  # a phase that trains no classifier (FitNets' hint phase) has no train accuracy
            return loss.detach().float(), None
        correct = sum((out.argmax(1) == batch.y).sum() for out in logits) / len(logits)
        return loss.detach().float(), correct

    return GraphedStep(step, optimizer) if cfg.cuda_graphs else step


def make_shared_step(shared_pass: SharedPass, needs: Needs, cfg: TrainConfig) -> Callable[[Batch], Any]:
    """A shared pass for `needs` as the engine runs it: under the same autocast, compilation and CUDA graphs as
    the train steps that read it."""

    def compute(batch: Batch) -> Any:
        return shared_pass(batch, needs)

    forward = torch.compile(compute) if cfg.compile else compute

    def step(batch: Batch) -> Any:
        with autocast(cfg, batch.x.device):
            return forward(batch)

    return GraphedStep(step) if cfg.cuda_graphs else step


def locate(phases: list[Phase], epoch: int) -> tuple[int, int]:
    """(phase index, 1-based epoch within that phase) of the run's 1-based `epoch`."""
    for index, phase in enumerate(phases):
        if epoch <= phase.epochs:
            return index, epoch
        epoch -= phase.epochs
    raise ValueError("epoch past the last phase")


# ------------------------------------------------------------------------------------------------------ a run


class PhaseTraining(NamedTuple):
    """What a run trains its current phase with: a fresh optimizer at each phase's start, and its train step."""

    phase_index: int
    optimizer: torch.optim.Optimizer
    train_step: TrainStep


class SavedOptimizer(NamedTuple):
    """An optimizer's state from last.pt and the phase it belongs to (a later phase starts a fresh one)."""

    phase_index: int
    state: dict[str, Any]


class Run:
    """One run as `fit_group` trains it: its stage, phases, optimizer and train step, history, folder, resume state
    and random streams, everything its solo run would hold.

    Built right after its stage, whose construction consumed the random streams it starts from.
    """

    def __init__(self, stage: Stage, cfg: TrainConfig, device: torch.device, out_dir: str | Path | None = None,
                 args: dict[str, Any] | None = None, name: str = ""):
        self.stage, self.cfg, self.args, self.name = stage, cfg, args or {}, name
        if cfg.sync_bn and distributed.world_size() > 1:
            distributed.sync_batchnorm(stage.trainable, device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.phases = stage.phases(cfg.epochs)
        self.total = sum(phase.epochs for phase in self.phases)
        self.generator = torch.Generator(device=device)  # draws the batches: equal in every run of one seed
        self.generator.manual_seed(cfg.seed)
        self.device = self.generator.device
        self.streams = capture_random_streams(self.device)
        self.history: list[dict[str, Any]] = []
        self.summary: dict[str, Any] | None = None  # set once the run is finished
        self.phase, self.lr = self.phases[0], cfg.lr
        self.eval_step = torch.compile(stage.evaluate) if cfg.compile else stage.evaluate
        self._restored: SavedOptimizer | None = None  # from last.pt, for the phase it was saved in
        self._training: PhaseTraining | None = None  # the current phase's optimizer and train step

    @contextlib.contextmanager
    def own_random_streams(self) -> Iterator[None]:
        """The global generators hold this run's stream while inside."""
        restore_random_streams(self.streams, self.device)
        try:
            yield
        finally:
            self.streams = capture_random_streams(self.device)

    def open(self, resume: bool, log: Callable[[str], None]) -> None:
        """Read what the run's folder holds: a finished run is kept as it is, an interrupted one continues from its
        last completed epoch, and a folder holding a run is refused without `resume`. (The folder's one writer is
        claimed before this, and before any data is loaded, by the stage script's `runlock.run_folder`.)"""
        summary_path, resume_path = self.out_dir / "summary.json", self.out_dir / RESUME_FILE
        weights_path = self.out_dir / f"{self.stage.kind}.pt"
        if not (summary_path.exists() or resume_path.exists()):
            return
        if not resume:
            raise UserError(f"{self.out_dir} already holds a run: pass --resume to continue it, or choose another "
                            "--out_dir")
        if summary_path.exists() and weights_path.exists():  # finished, whether last.pt is still there or not
            _check_arguments(load_checkpoint(weights_path, self.stage.kind, "--resume", mmap=True)["args"], self.args)
            log(f"{self.out_dir} is already finished; nothing to do")
            self.summary = json.loads(summary_path.read_text())
            return
        if not resume_path.exists():
            raise UserError(f"--resume: {self.out_dir} holds summary.json but neither {weights_path.name} nor "
                            f"{RESUME_FILE}: delete summary.json to train the run again")
        self._restore(resume_path, log)
        log(f"resuming {self.out_dir} after epoch {self.history[-1]['epoch']}")

    def start_epoch(self, epoch: int) -> None:
        """Enter the run's 1-based `epoch`: its phase (a fresh optimizer at a phase's start), LR and train mode."""
        index, phase_epoch = locate(self.phases, epoch)
        self.phase = self.phases[index]
        if self._training is None or self._training.phase_index != index:
            optimizer = make_optimizer(self.phase.parameters, self.cfg)
            if self._restored is not None and self._restored.phase_index == index:
                optimizer.load_state_dict(self._restored.state)
            self._training = PhaseTraining(index, optimizer, make_train_step(self.phase.loss, optimizer, self.cfg))
        cfg = self.cfg
        self.lr = cfg.lr if self.phase.constant_lr else lr_at(phase_epoch, cfg.lr, list(cfg.schedule), cfg.gamma)
        for group in self._training.optimizer.param_groups:
            group["lr"] = self.lr
        self.stage.trainable.train()
        with self.own_random_streams():
            self.stage.start_epoch(phase_epoch)

    def step(self, batch: Batch, shared: Any) -> StepResult:
        """The run's own optimisation step on a batch, in its own random streams."""
        with self.own_random_streams():
            return self._training.train_step(batch, shared)

    def end_epoch(self, epoch: int, train_loss: float, train_acc: float | None, train_seconds: float,
                  data: Dataset, log: Callable[[str], None]) -> None:
        """Evaluate, then record the epoch: last.pt (everything needed to continue exactly), then metrics.jsonl."""
        started = time.perf_counter()
        with self.own_random_streams():
            test = _evaluate(self.stage, self.eval_step, data, self.cfg)
        headline = self.stage.headline
        row = {
            "epoch": epoch,
            "phase": self.phase.name,
            "lr": self.lr,
            "train_loss": train_loss,
            "train_acc": None if train_acc is None else 100.0 * train_acc,
            "test_loss": sum(test[name][0] for name in headline) / len(headline),
            "test_acc": sum(test[name][1] for name in headline) / len(headline),
        }
        if len(test) > 1:
            row["test_acc_by_output"] = {name: acc for name, (_, acc) in test.items()}
        train_step = self._training.train_step
        if isinstance(train_step, GraphedStep):  # what a caller reads to know that the graphs ran
            row["cuda_graphs"] = {"steps": num_train_batches(data, self.cfg.batch_size), **train_step.take_counts()}
        row["seconds"] = train_seconds + time.perf_counter() - started
        self.history.append(row)
        _explain_write_errors(self.out_dir / RESUME_FILE, self._save_progress)
        shown = "-" if row["train_acc"] is None else f"{row['train_acc']:.2f}"
        log(
            f"epoch {epoch:3d}/{self.total} {self.phase.name if len(self.phases) > 1 else ''} lr {self.lr:.4g}  "
            f"train loss {row['train_loss']:.4f} acc {shown}  "
            f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.2f}  {row['seconds']:.1f}s"
            + (f"  [{self.name}]" if self.name else "")
        )

    def _save_progress(self) -> None:
        """last.pt and metrics.jsonl, written by rank 0 alone (every rank holds the same state: `check_identical`)."""
        if not distributed.is_main():
            return
        with self.own_random_streams():
            random_state = save_random_state(run_generators(self.generator))
        save_checkpoint(
            self.out_dir / RESUME_FILE,
            "resume",
            self.stage.trainable.state_dict(),
            stage=self.stage.kind,
            args=self.args,
            history=self.history,
            phase_index=self._training.phase_index,
            amp=self.cfg.amp,  # the effective precision: --amp auto may pick another one on another machine
            channels_last=self.cfg.channels_last,  # the effective layout, kept on resume (assembly.keep_layout)
            provenance=self.stage.provenance(),
            optimizer=self._training.optimizer.state_dict(),
            **random_state,
        )
        atomic_write_text(self.out_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in self.history))

    def _restore(self, path: Path, log: Callable[[str], None]) -> None:
        ckpt = load_checkpoint(path, "resume", "--resume")
        expect_match(ckpt, "--resume", stage=self.stage.kind)
        cfg, args = self.cfg, self.args
        if ckpt.get("amp", cfg.amp) != cfg.amp:  # (checkpoints before this check did not record it)
            precision = {True: "bf16 autocast", False: "fp32"}
            raise UserError(f"--resume: this run trained in {precision[ckpt['amp']]}, but here --amp "
                            f"{args.get('amp')} gives {precision[cfg.amp]}; resume with --amp "
                            f"{'on' if ckpt['amp'] else 'off'}")
        if ckpt.get("channels_last", cfg.channels_last) != cfg.channels_last:
            raise UserError(f"--resume: this run trained with channels_last={ckpt['channels_last']}, but this config "
                            f"has {cfg.channels_last}; resume in the layout it started with (assembly.keep_layout "
                            "gives it)")
        started_on, here = ckpt["args"].get("world_size", 1), args.get("world_size", 1)
        if started_on != here:  # (runs before many processes recorded none: they ran on one)
            raise UserError(f"--resume: this run was started on {started_on} process(es), here it runs on {here}; "
                            f"resume it on {started_on} (torchrun --nproc_per_node {started_on}, or as many srun "
                            "tasks)")
        _check_arguments(ckpt["args"], args)
        now = self.stage.provenance()
        for role, then in ckpt.get("provenance", {}).items():  # (checkpoints before this check did not record it)
            current = now.get(role, {}).get("fingerprint")
            if current != then["fingerprint"]:
                raise UserError(f"--resume: the {role} this run started from has changed on disk ({then['file']}: "
                                f"fingerprint {then['fingerprint']} then, {current} now; retrained in place?); "
                                "resume with the original file, or start the run afresh in another --out_dir")
        load_weights(self.stage.trainable, ckpt, "--resume")
        with self.own_random_streams():
            restore_random_state(ckpt, run_generators(self.generator), resume_seed(self.cfg.seed, len(ckpt["history"])),
                                 log)
        self.history = ckpt["history"]
        self._restored = SavedOptimizer(ckpt["phase_index"], ckpt["optimizer"])

    def finish(self, data: Dataset) -> dict[str, Any]:
        """Write the final weights (and the extras, apart), then summary.json (its presence marks the run done)."""
        return _explain_write_errors(self.out_dir / RESUME_FILE, self._finish, data)

    def _finish(self, data: Dataset) -> dict[str, Any]:
        stage, cfg, history = self.stage, self.cfg, self.history
        weights_file = f"{stage.kind}.pt"
        fingerprint = model_fingerprint(stage.model)
        meta = {"dataset": data.name, "num_classes": data.num_classes, "image_size": data.image_size,
                "epoch": len(history), "args": self.args}
        writer = distributed.is_main()  # every rank builds the summary; rank 0 alone writes
        if writer:
            save_checkpoint(self.out_dir / weights_file, stage.kind, stage.model.state_dict(), **meta,
                            fingerprint=fingerprint, **stage.checkpoint_meta())
        if writer and len(stage.extras):
            save_checkpoint(self.out_dir / EXTRAS_FILE, "extras", stage.extras.state_dict(), **meta,
                            model_fingerprint=fingerprint, modules=list(stage.extras.keys()))
        last = history[-1]
        final_phase = [row for row in history if row["phase"] == self.phases[-1].name]
        best = max(final_phase, key=lambda row: row["test_acc"])
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
        if len(self.phases) > 1:
            summary["phases"] = [{"name": phase.name, "epochs": phase.epochs} for phase in self.phases]
        graphed = [row["cuda_graphs"] for row in history if "cuda_graphs" in row]
        if graphed:  # over the epochs run with CUDA graphs
            summary["cuda_graphs"] = {key: sum(counts[key] for counts in graphed) for key in graphed[0]}
        if len(stage.extras):
            summary["extras"] = EXTRAS_FILE
        if writer:
            atomic_write_json(self.out_dir / "summary.json", summary)
        self.summary = summary
        return summary


# ------------------------------------------------------------------------------------------------ the driver


class GroupStep:
    """One batch for a cohort of runs: each distinct shared pass once, for the union of what its runs' phases
    need, then every run's own step on what it reads of it. Keeps the compiled or graphed shared passes."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.shared_steps: dict[tuple[SharedPass, Needs], Callable[[Batch], Any]] = {}

    def __call__(self, runs: list[Run], batch: Batch) -> list[StepResult]:
        needs: dict[SharedPass, set[str]] = {}
        for run in runs:
            if run.phase.needs:
                needs.setdefault(run.stage.shared_pass, set()).update(run.phase.needs)
        outputs = {shared_pass: self._shared_step(shared_pass, frozenset(union))(batch)
                   for shared_pass, union in needs.items()}
        results = []
        for run in runs:
            shared_pass, phase_needs = run.stage.shared_pass, run.phase.needs
            shared = shared_pass.select(outputs[shared_pass], phase_needs) if phase_needs else None
            results.append(run.step(batch, shared))
        return results

    def _shared_step(self, shared_pass: SharedPass, needs: Needs) -> Callable[[Batch], Any]:
        key = (shared_pass, needs)
        if key not in self.shared_steps:
            self.shared_steps[key] = make_shared_step(shared_pass, needs, self.cfg)
        return self.shared_steps[key]


def fit(
    stage: Stage,
    data: Dataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    args: dict[str, Any],
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train `stage` through its phases, writing into `out_dir`; return the summary. A group of one.

    With `resume`, a finished run is returned as it is and an interrupted one continues from its
    last completed epoch (in whichever phase), ending bit-identical to an uninterrupted run on the CPU.
    """
    return fit_group([Run(stage, cfg, data.device, out_dir, args)], data, resume, log)[0]


def fit_group(runs: list[Run], data: Dataset, resume: bool = False,
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train `runs` (one seed, one recipe) side by side; return their summaries, in order.

    Every folder is taken up first, so that one holding a run without `resume` stops the group before any
    training. Then, epoch by epoch, the runs at the lowest epoch train it together, so that after an interruption
    (between two runs' checkpoint writes included) the ones behind catch up first; a finished run is not trained
    again. A run whose loss diverges stops with nothing written for that epoch while the others go on; the group
    then fails with its message.
    """
    cfg = runs[0].cfg
    if any(run.cfg != cfg for run in runs):
        raise ValueError("the runs of a group share one TrainConfig")
    for run in runs:
        run.open(resume, log)
    distributed.barrier()  # every rank has read the folders before rank 0 writes into them
    group_step = GroupStep(cfg)
    active = [run for run in runs if run.summary is None]
    failures: list[str] = []
    while active:
        for run in [run for run in active if len(run.history) == run.total]:
            run.finish(data)
            active.remove(run)
        if not active:
            break
        epoch = 1 + min(len(run.history) for run in active)
        cohort = [run for run in active if len(run.history) + 1 == epoch]
        for run, message in _train_epoch(cohort, epoch, data, group_step, log):
            failures.append(f"{run.name}: {message}" if run.name else message)
            active.remove(run)
    if failures:
        more = f" ({len(failures) - 1} more run(s) failed too)" if len(failures) > 1 else ""
        raise UserError(failures[0] + more)
    return [run.summary for run in runs]


@dataclass
class EpochTally:
    """A run's training loss and number correct, summed over an epoch's batches on the device: no host
    synchronisation inside the epoch."""

    loss: Tensor
    correct: Tensor | None = None  # stays None through a phase that trains no classifier (FitNets' hint phase)

    def add(self, result: StepResult, batch_size: int) -> None:
        loss, correct = result
        self.loss += loss * batch_size
        if correct is not None:
            self.correct = correct if self.correct is None else self.correct + correct

    def sums(self) -> Tensor:
        """(loss, number correct) as one tensor; the count is 0 where no classifier is trained."""
        return torch.stack((self.loss, torch.zeros_like(self.loss) if self.correct is None else self.correct))


def _train_epoch(cohort: list[Run], epoch: int, data: Dataset, group_step: GroupStep,
                 log: Callable[[str], None]) -> list[tuple[Run, str]]:
    """Train `epoch` for every run of the cohort on one draw of batches; record it for each run whose loss stayed
    finite. Returns the others with their message."""
    started = time.perf_counter()
    cfg, leader = cohort[0].cfg, cohort[0]
    if any(not torch.equal(run.generator.get_state(), leader.generator.get_state()) for run in cohort):
        raise RuntimeError(f"the runs training epoch {epoch} together would draw different batches")
    for run in cohort:
        run.start_epoch(epoch)
    tallies = [EpochTally(torch.zeros((), device=data.device)) for _ in cohort]
    shard = Shard(distributed.rank(), distributed.world_size())  # this process's share of every global batch
    batches = train_batches(data, cfg.batch_size, leader.generator, cfg.channels_last, cfg.pad_mode, shard)
    total = max(run.total for run in cohort)
    for batch in tqdm(batches, total=num_train_batches(data, cfg.batch_size), desc=f"epoch {epoch}/{total}",
                      leave=False, disable=None if distributed.is_main() else True):  # one bar for the job
        for tally, result in zip(tallies, group_step(cohort, batch), strict=True):
            tally.add(result, batch.y.numel())
    sums = distributed.all_reduce_sum(torch.stack([tally.sums() for tally in tallies]))  # over the processes' shares
    means = (sums / len(data.y_train)).tolist()  # the epoch's one host read
    train_seconds = (time.perf_counter() - started) / len(cohort)  # each run's share of the epoch's training
    for run in cohort:  # the leader drew the batches for all: every run's data generator moves on with it
        run.generator.set_state(leader.generator.get_state())
        if not cfg.sync_bn:  # each process's batch-norm statistics followed its own share: take rank 0's
            distributed.broadcast_batchnorm_statistics(run.stage.trainable)
        with run.own_random_streams():
            distributed.check_identical(f"epoch {epoch}{f' [{run.name}]' if run.name else ''}", run.stage.trainable,
                                        run_generators(run.generator).values())
    diverged = []
    for run, tally, (train_loss, train_acc) in zip(cohort, tallies, means, strict=True):
        if not math.isfinite(train_loss):
            diverged.append((run, f"the training loss became {train_loss} in epoch {epoch} (diverged: try a lower "
                                  "--lr); nothing was written for this epoch"))
            continue
        run.end_epoch(epoch, train_loss, None if tally.correct is None else train_acc, train_seconds, data, log)
    return diverged


def _explain_write_errors(resume_path: Path, write: Callable[..., Any], *arguments: Any) -> Any:
    """`write(*arguments)`, with a file that cannot be written (a full disk, a file-size limit) reported in one
    line that says what the run still has: atomic writes leave the previous checkpoint as it was."""
    try:
        return write(*arguments)
    except WriteError as err:
        try:
            epochs = len(load_checkpoint(resume_path, "resume", "--resume", mmap=True)["history"])
            kept = f"{resume_path} still holds epoch {epochs}"
        except UserError:
            kept = "no epoch is saved yet"
        raise UserError(f"{err}; {kept}: make room (or fix the folder), then rerun with --resume") from None


def evaluate(stage: Stage, data: Dataset, cfg: TrainConfig) -> dict[str, tuple[float, float]]:
    """Per named classifier of `stage`: (mean cross-entropy, accuracy in percent) on the test set, as each epoch
    reports them (an imported teacher is measured so on load)."""
    return _evaluate(stage, stage.evaluate, data, cfg)


def _evaluate(stage: Stage, eval_step: Callable, data: Dataset, cfg: TrainConfig) -> dict:
    """Per named classifier: (mean cross-entropy, accuracy in percent) over the test set."""
    stage.trainable.eval()
    sums: dict[str, Tensor] = {}
    shard = Shard(distributed.rank(), distributed.world_size())  # each process its share of the test set
    with torch.inference_mode(), autocast(cfg, data.device):
        for x, y in test_batches(data, cfg.eval_batch_size, channels_last=cfg.channels_last, shard=shard):
            for name, logits in eval_step(x).items():
                logits = logits.float()
                batch = torch.stack([F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum()])
                sums[name] = sums[name] + batch if name in sums else batch
    if distributed.world_size() > 1:  # every test image counted once, by the process whose share holds it
        names = sorted(sums)
        total = distributed.all_reduce_sum(torch.stack([sums[name].double() for name in names]))
        sums = dict(zip(names, total, strict=True))
    count = len(data.y_test)
    return {name: (float(s[0]) / count, 100.0 * float(s[1]) / count) for name, s in sums.items()}


def _check_arguments(recorded: dict[str, Any], args: dict[str, Any]) -> None:
    """Refuse to continue a run under other arguments than it was started with (where it runs may change)."""
    changed = sorted(key for key in set(args) | set(recorded)
                     if key not in RESUMABLE_CHANGES and args.get(key) != recorded.get(key))
    if changed:
        key = changed[0]
        raise UserError(
            f"--resume: this run was started with {key}={recorded.get(key)!r}, now {args.get(key)!r}; "
            f"resume with the same arguments ({len(changed)} differ: {', '.join(changed)})"
        )

