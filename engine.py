"""The one training loop behind every stage and every distillation method.

A stage (teacher, heads, or a student of some method) plugs in by subclassing `Stage`: which module it
delivers, which extra modules it trains beside it, the loss of a batch, its phases, and the named
classifiers to evaluate. The engine owns everything else: SGD with the multi-step schedule, device-side
metrics read once per epoch, evaluation, metrics.jsonl / summary.json, atomic checkpoints and exact
resumption, across phase boundaries included.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from checkpoint import expect_match, load_checkpoint, load_weights, model_fingerprint, save_checkpoint
from data import DEFAULT_PAD_MODE, Batch, DeviceDataset, num_train_batches, test_batches, train_batches
from utils import UserError, atomic_write_json, atomic_write_text, lr_at

RESUME_FILE = "last.pt"
EXTRAS_FILE = "extras.pt"
# Arguments that may change when a run is resumed: where and how fast it runs, where it reads and writes. The
# effective precision (which --amp gives on the device) is checked on its own.
RESUMABLE_CHANGES = frozenset({"resume", "gpu_id", "data_dir", "data_url", "out_dir", "amp", "compile", "summary"})

StepOutput = tuple[Tensor, list[Tensor]]  # (loss, logits of each classifier being trained)


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
    eval_batch_size: int = 1000


@dataclass(frozen=True)
class Phase:
    """A stretch of epochs with its own loss, its own parameters and a fresh optimizer.

    Most stages have one phase of `--epochs`; FitNets has a hint phase before it. `constant_lr` keeps
    `--lr` throughout instead of following `--schedule` (which counts epochs from the phase's start).
    """

    name: str
    epochs: int
    parameters: list[nn.Parameter]
    loss: Callable[[Batch], StepOutput]
    constant_lr: bool = False


class Stage:
    """What a stage supplies to `fit`; subclasses override `training_step` at least.

    `model` is what the run delivers (saved as `<kind>.pt`, the file the next stage or any tool loads);
    `extras` are further modules it trains or updates (a method's regressors, embeddings, memory banks,
    auxiliary classifiers), saved apart in extras.pt so that the model file stays the plain model.
    Both are put in train mode for training, in eval mode for evaluation, and restored on --resume;
    frozen networks (a teacher) are kept outside them.
    """

    kind: str  # "teacher" | "heads" | "student": names the weights file and summary.json's `stage`
    headline: tuple[str, ...] = ("model",)  # outputs of `evaluate` whose mean accuracy is the run's test_acc

    def __init__(self, kind: str, model: nn.Module, extras: dict[str, nn.Module] | None = None):
        self.kind, self.model = kind, model
        self.extras = nn.ModuleDict(extras or {})
        self.trainable = nn.ModuleDict({"model": model, "extras": self.extras})

    def phases(self, epochs: int) -> list[Phase]:
        """The run's phases; by default one phase of `epochs` training everything trainable."""
        return [Phase("train", epochs, trainable_parameters(self.trainable), self.training_step)]

    def start_epoch(self, epoch: int) -> None:
        """Called before each training epoch with its 1-based number within its phase (TOFD's temperature)."""

    def training_step(self, batch: Batch) -> StepOutput:
        """Loss of one batch and the logits of each classifier being trained (for train accuracy)."""
        raise NotImplementedError

    def evaluate(self, x: Tensor) -> dict[str, Tensor]:
        """Logits of every classifier worth reporting, by name; by default the model's own."""
        return {"model": self.model(x)}

    def checkpoint_meta(self) -> dict[str, Any]:
        """Metadata stored beside the final weights so the next stage can rebuild and check them."""
        return {}

    def summary_fields(self, last: dict[str, Any]) -> dict[str, Any]:
        """Stage-specific summary.json fields, given the last epoch's metrics."""
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
TrainStep = Callable[[Batch], StepResult]


def make_train_step(loss_fn: Callable[[Batch], StepOutput], optimizer: torch.optim.Optimizer,
                    cfg: TrainConfig) -> TrainStep:
    """One optimisation step on a batch, returning (loss, number correct) as device tensors: no host sync.

    The number correct is None when the loss trains no classifier.
    `cfg.compile` compiles the forward and the loss, and through AOTAutograd their backward; the optimizer stays
    eager (compiling SGD took 74 s on 2 CPU cores to save 4 of ~240 ms per res110 step, and recompiles at each
    LR). `cfg.cuda_graphs` replays the whole step, optimizer included, from CUDA graphs: see `GraphedStep`.
    """
    forward = torch.compile(loss_fn) if cfg.compile else loss_fn

    def step(batch: Batch) -> StepResult:
        with autocast(cfg, batch.x.device):
            loss, logits = forward(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not logits:  # a phase that trains no classifier (FitNets' hint phase) has no train accuracy
            return loss.detach().float(), None
        correct = sum((out.argmax(1) == batch.y).sum() for out in logits) / len(logits)
        return loss.detach().float(), correct

    return GraphedStep(step, optimizer) if cfg.cuda_graphs else step


WARMUP_STEPS = 2  # eager steps of each batch shape before it is captured: momentum buffers, cuDNN autotuning, compiling


def on_side_stream(step: TrainStep, batch: Batch) -> StepResult:
    """An eager step on a side stream of the batch's GPU, as CUDA graphs want their warm-up; the outputs come back
    on that GPU's current stream."""
    with torch.cuda.device(batch.x.device):
        current, side = torch.cuda.current_stream(), torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            outputs = step(batch)
        current.wait_stream(side)
    return outputs


def capture_cuda_graph(step: TrainStep, static: Batch) -> tuple[Callable[[], None], StepResult]:
    """Record `step` on the static batch as a CUDA graph: its replay function and its static outputs.

    The capture stream is made on the batch's GPU (torch.cuda.graph's default one is made once per process, on
    whichever GPU was current then), and the replay runs with that GPU current."""
    device = static.x.device
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device), torch.cuda.graph(graph, stream=torch.cuda.Stream(device)):
        outputs = step(static)

    def replay() -> None:
        with torch.cuda.device(device):
            graph.replay()

    return replay, outputs


class GraphedStep:
    """A training step replayed from CUDA graphs: one launch per step instead of hundreds (eager batch-64 steps
    are launch-bound on a GPU, docs/BENCHMARKS.md).

    Each batch shape (the full batch, an epoch's partial last one) first runs `WARMUP_STEPS` eager steps, then
    is captured once; a change of the optimizer's hyper-parameters (the LR at a milestone) recaptures, since a
    graph holds them as constants. Each batch is copied into its graph's static inputs and the outputs are
    cloned out of its static ones. The replayed kernels are the eager ones: results equal eager up to the
    kernels' own nondeterminism. A graph sees tensors, not Python values: state that a stage changes between
    epochs must live in a tensor updated in place (as TOFD's temperature does), and a step must not read a
    value back to the host. `warm` and `capture` are CUDA's unless a test fakes them.

    `counts` tallies warm-up steps, captures and replays (fit records them per epoch in metrics.jsonl and in
    summary.json): every step after the warm-ups is a replay, the evidence that graphs ran at all.
    """

    def __init__(self, step: TrainStep, optimizer: torch.optim.Optimizer,
                 warm: Callable[[TrainStep, Batch], StepResult] = on_side_stream,
                 capture: Callable[[TrainStep, Batch], tuple[Callable[[], None], StepResult]] = capture_cuda_graph):
        self.step, self.optimizer, self.warm, self.capture = step, optimizer, warm, capture
        self.eager_steps: Counter[tuple[int, ...]] = Counter()
        self.graphs: dict[tuple[int, ...], tuple[Batch, Callable[[], None], StepResult]] = {}
        self.hyper: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()

    def __call__(self, batch: Batch) -> StepResult:
        hyper = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        if hyper != self.hyper:
            self.graphs.clear()
            self.hyper = hyper
        shape = tuple(batch.x.shape)
        if shape not in self.graphs:
            if self.eager_steps[shape] < WARMUP_STEPS:
                self.eager_steps[shape] += 1
                self.counts["warmups"] += 1
                return self.warm(self.step, batch)
            self.graphs[shape] = self._capture(batch)
            self.counts["captures"] += 1
        static, replay, outputs = self.graphs[shape]
        for buffer, value in zip(static, batch, strict=True):
            if buffer is not None:
                buffer.copy_(value)
        replay()
        self.counts["replays"] += 1
        loss, correct = outputs
        return loss.clone(), None if correct is None else correct.clone()

    def take_counts(self) -> dict[str, int]:
        """Warm-up steps, captures and replays since the last call."""
        counts = {key: self.counts[key] for key in ("warmups", "captures", "replays")}
        self.counts.clear()
        return counts

    def _capture(self, batch: Batch) -> tuple[Batch, Callable[[], None], StepResult]:
        static = Batch(*(None if t is None else t.clone() for t in batch))
        # No gradient may exist at capture: the graph's backward then writes fresh ones instead of accumulating.
        self.optimizer.zero_grad(set_to_none=True)
        try:
            replay, outputs = self.capture(self.step, static)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"--compile graphs: this step cannot be captured as a CUDA graph ({reason}); "
                            "use --compile on or off") from None
        return static, replay, outputs


def locate(phases: list[Phase], epoch: int) -> tuple[int, int]:
    """(phase index, 1-based epoch within that phase) of the run's 1-based `epoch`."""
    for index, phase in enumerate(phases):
        if epoch <= phase.epochs:
            return index, epoch
        epoch -= phase.epochs
    raise ValueError("epoch past the last phase")


def fit(
    stage: Stage,
    data: DeviceDataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    args: dict[str, Any],
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train `stage` through its phases, writing into `out_dir`; return the summary.

    With `resume`, a finished run is returned as it is and an interrupted one continues from its
    last completed epoch (in whichever phase), ending bit-identical to an uninterrupted run on the CPU.
    """
    out_dir = Path(out_dir)
    device = data.x_train.device
    phases = stage.phases(cfg.epochs)
    total = sum(phase.epochs for phase in phases)
    generator = torch.Generator(device=device)
    generator.manual_seed(cfg.seed)
    generators = run_generators(generator)
    history: list[dict[str, Any]] = []
    optimizer_state: tuple[int, dict] | None = None  # (phase index, state) restored from last.pt

    summary_path, resume_path = out_dir / "summary.json", out_dir / RESUME_FILE
    if summary_path.exists() or resume_path.exists():
        if not resume:
            raise UserError(f"{out_dir} already holds a run: pass --resume to continue it, or choose another --out_dir")
        ckpt = _restore(resume_path, stage, args, cfg)
        if summary_path.exists():
            log(f"{out_dir} is already finished; nothing to do")
            return json.loads(summary_path.read_text())
        history, optimizer_state = ckpt["history"], (ckpt["phase_index"], ckpt["optimizer"])
        restore_random_state(ckpt, generators, cfg.seed + RESEED_STRIDE * len(history), log)
        log(f"resuming {out_dir} after epoch {history[-1]['epoch']}")

    eval_step = torch.compile(stage.evaluate) if cfg.compile else stage.evaluate
    steps = num_train_batches(data, cfg.batch_size)
    current: tuple[int, torch.optim.Optimizer, Callable] | None = None

    for epoch in range(len(history) + 1, total + 1):
        started = time.perf_counter()
        index, phase_epoch = locate(phases, epoch)
        phase = phases[index]
        if current is None or current[0] != index:  # entering a phase: a fresh optimizer
            optimizer = make_optimizer(phase.parameters, cfg)
            if optimizer_state is not None and optimizer_state[0] == index:
                optimizer.load_state_dict(optimizer_state[1])
            current = (index, optimizer, make_train_step(phase.loss, optimizer, cfg))
        _, optimizer, train_step = current
        lr = cfg.lr if phase.constant_lr else lr_at(phase_epoch, cfg.lr, list(cfg.schedule), cfg.gamma)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stage.trainable.train()
        stage.start_epoch(phase_epoch)
        loss_sum = torch.zeros((), device=device)
        correct: Tensor | None = torch.zeros((), device=device)
        batches = train_batches(data, cfg.batch_size, generator, cfg.channels_last, cfg.pad_mode)
        for batch in tqdm(batches, total=steps, desc=f"epoch {epoch}/{total}", leave=False, disable=None):
            loss, batch_correct = train_step(batch)
            # Accumulated on the device: no host synchronisation inside the epoch.
            loss_sum += loss * batch.y.numel()
            correct = None if batch_correct is None else correct + batch_correct
        sums = [loss_sum] if correct is None else [loss_sum, correct]
        train_loss, *train_correct = (torch.stack(sums) / len(data.y_train)).tolist()  # the epoch's one host read
        if not math.isfinite(train_loss):
            raise UserError(
                f"the training loss became {train_loss} in epoch {epoch} (diverged: try a lower --lr); "
                f"nothing was written for this epoch"
            )
        test = _evaluate(stage, eval_step, data, cfg)
        row = {
            "epoch": epoch,
            "phase": phase.name,
            "lr": lr,
            "train_loss": train_loss,
            "train_acc": 100.0 * train_correct[0] if train_correct else None,
            "test_loss": sum(test[name][0] for name in stage.headline) / len(stage.headline),
            "test_acc": sum(test[name][1] for name in stage.headline) / len(stage.headline),
        }
        if len(test) > 1:
            row["test_acc_by_output"] = {name: acc for name, (_, acc) in test.items()}
        if isinstance(train_step, GraphedStep):  # what a caller reads to know that the graphs ran
            row["cuda_graphs"] = {"steps": steps, **train_step.take_counts()}
        row["seconds"] = time.perf_counter() - started
        history.append(row)
        _save_progress(out_dir, stage, index, optimizer, generators, history, args, cfg)
        train_acc = "-" if row["train_acc"] is None else f"{row['train_acc']:.2f}"
        log(
            f"epoch {epoch:3d}/{total} {phase.name if len(phases) > 1 else ''} lr {lr:.4g}  "
            f"train loss {row['train_loss']:.4f} acc {train_acc}  "
            f"test loss {row['test_loss']:.4f} acc {row['test_acc']:.2f}  {row['seconds']:.1f}s"
        )

    return _finish(out_dir, stage, data, cfg, phases, history, args)


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


def _save_progress(out_dir, stage: Stage, phase_index: int, optimizer, generators, history, args, cfg) -> None:
    """Everything needed to continue exactly after this epoch, then the metrics so far."""
    save_checkpoint(
        out_dir / RESUME_FILE,
        "resume",
        stage.trainable.state_dict(),
        stage=stage.kind,
        args=args,
        history=history,
        phase_index=phase_index,
        amp=cfg.amp,  # the effective precision: --amp auto may pick another one on another machine
        optimizer=optimizer.state_dict(),
        **save_random_state(generators),
    )
    atomic_write_text(out_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))


RESEED_STRIDE = 1_000_003  # a stream reseeded on resume starts from --seed + this x the epochs done


def run_generators(data: torch.Generator) -> dict[str, torch.Generator]:
    """The generators a run draws from, by their last.pt key: the data generator (batch order, crops, flips; on the
    run's device), torch's CPU generator, and on a GPU that GPU's default generator (CRD's negatives). No other
    GPU's: their states mean nothing to this run, and another machine may have fewer."""
    generators = {"data_rng": data, "torch_rng": torch.default_generator}
    if data.device.type == "cuda":
        torch.cuda.init()
        index = torch.cuda.current_device() if data.device.index is None else data.device.index
        generators["device_rng"] = torch.cuda.default_generators[index]
    return generators


def save_random_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """The run's random state for last.pt, with the device it was drawn on."""
    return {"rng_device": str(generators["data_rng"].device), **{k: g.get_state() for k, g in generators.items()}}


def restore_random_state(saved: dict[str, Any], generators: dict[str, torch.Generator], reseed: int,
                         log: Callable[[str], None]) -> None:
    """Continue the saved random stream where it carries over; else reseed it, with a one-line notice.

    torch's CPU generator always carries over. A GPU generator's state (a seed and an offset) means the same on any
    GPU, so a run resumed on another GPU index continues its stream exactly; a CPU generator's (a Mersenne Twister)
    cannot become a GPU's or back, so a run moved between the CPU and a GPU continues with the data and device
    generators reseeded from `reseed`. A last.pt from before the device was recorded counts as the CPU's (every run
    until then was); a state of another size than this torch's generator holds is reseeded, never a traceback.
    """
    generators["torch_rng"].set_state(saved["torch_rng"])
    saved_on, device = torch.device(saved.get("rng_device", "cpu")), generators["data_rng"].device
    drawn = {key: generator for key, generator in generators.items() if key != "torch_rng"}
    if saved_on.type == device.type and all(
            isinstance(saved.get(key), Tensor) and saved[key].numel() == g.get_state().numel()
            for key, g in drawn.items()):
        for key, generator in drawn.items():
            generator.set_state(saved[key])
        return
    for generator in drawn.values():
        generator.manual_seed(reseed)
    log(f"--resume: this run was interrupted on {saved_on}, it continues on {device}; its random stream (batch order, "
        "crops, flips, CRD's negatives) cannot carry over and is reseeded from --seed and the epoch, so the result "
        "will differ from an uninterrupted run's")


def _restore(path: Path, stage: Stage, args: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """last.pt checked against this run's arguments and precision, its weights loaded into the stage."""
    ckpt = load_checkpoint(path, "resume", "--resume")
    expect_match(ckpt, "--resume", stage=stage.kind)
    if ckpt.get("amp", cfg.amp) != cfg.amp:  # (checkpoints before this check did not record it)
        precision = {True: "bf16 autocast", False: "fp32"}
        raise UserError(f"--resume: this run trained in {precision[ckpt['amp']]}, but here --amp {args.get('amp')} "
                        f"gives {precision[cfg.amp]}; resume with --amp {'on' if ckpt['amp'] else 'off'}")
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
    return ckpt


def _finish(out_dir: Path, stage: Stage, data, cfg: TrainConfig, phases: list[Phase], history, args) -> dict:
    """Write the final weights (and the extras, apart), then summary.json (its presence marks the run done)."""
    weights_file = f"{stage.kind}.pt"
    fingerprint = model_fingerprint(stage.model)
    meta = {"dataset": data.name, "num_classes": data.num_classes, "image_size": data.image_size, "epoch": len(history),
            "args": args}
    save_checkpoint(out_dir / weights_file, stage.kind, stage.model.state_dict(), **meta, fingerprint=fingerprint,
                    **stage.checkpoint_meta())
    if len(stage.extras):
        save_checkpoint(out_dir / EXTRAS_FILE, "extras", stage.extras.state_dict(), **meta,
                        model_fingerprint=fingerprint, modules=list(stage.extras.keys()))
    last = history[-1]
    final_phase = [row for row in history if row["phase"] == phases[-1].name]
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
    if len(phases) > 1:
        summary["phases"] = [{"name": phase.name, "epochs": phase.epochs} for phase in phases]
    graphed = [row["cuda_graphs"] for row in history if "cuda_graphs" in row]
    if graphed:  # over the epochs run with CUDA graphs
        summary["cuda_graphs"] = {key: sum(counts[key] for counts in graphed) for key in graphed[0]}
    if len(stage.extras):
        summary["extras"] = EXTRAS_FILE
    atomic_write_json(out_dir / "summary.json", summary)
    return summary
