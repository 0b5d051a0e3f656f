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
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn
from tqdm import tqdm

from checkpoint import expect_match, load_checkpoint, load_weights, model_fingerprint, save_checkpoint
from data import DEFAULT_PAD_MODE, Batch, DeviceDataset, num_train_batches, test_batches, train_batches
from utils import UserError, WriteError, atomic_write_json, atomic_write_text, lr_at

RESUME_FILE = "last.pt"
EXTRAS_FILE = "extras.pt"
# Arguments that may change when a run is resumed: where and how fast it runs, where it reads and writes. The
# effective precision (which --amp gives on the device) is checked on its own.
RESUMABLE_CHANGES = frozenset({"resume", "gpu_id", "data_dir", "data_url", "out_dir", "amp", "compile", "summary",
                               "workers"})

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

    def step(batch: Batch, shared: Any = None) -> StepResult:
        with autocast(cfg, batch.x.device):
            loss, logits = forward(batch, shared)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
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


WARMUP_STEPS = 2  # eager steps of each batch shape before it is captured: momentum buffers, cuDNN autotuning, compiling


def on_side_stream(step: Callable[..., Any], inputs: tuple) -> Any:
    """An eager step on a side stream of the inputs' GPU, as CUDA graphs want their warm-up; the outputs come back
    on that GPU's current stream."""
    with torch.cuda.device(tensors(inputs)[0].device):
        current, side = torch.cuda.current_stream(), torch.cuda.Stream()
        side.wait_stream(current)
        with torch.cuda.stream(side):
            outputs = step(*inputs)
        current.wait_stream(side)
    return outputs


def capture_cuda_graph(step: Callable[..., Any], static: tuple) -> tuple[Callable[[], None], Any]:
    """Record `step` on the static inputs as a CUDA graph: its replay function and its static outputs.

    The capture stream is made on the inputs' GPU (torch.cuda.graph's default one is made once per process, on
    whichever GPU was current then), and the replay runs with that GPU current."""
    device = tensors(static)[0].device
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device), torch.cuda.graph(graph, stream=torch.cuda.Stream(device)):
        outputs = step(*static)

    def replay() -> None:
        with torch.cuda.device(device):
            graph.replay()

    return replay, outputs


def tensors(tree: Any) -> list[Tensor]:
    """The tensors of nested tuples, lists and named tuples, in order (None entries skipped)."""
    return [leaf for leaf in pytree.tree_leaves(tree) if leaf is not None]


def cloned(tree: Any) -> Any:
    """A copy of nested tuples, lists and named tuples of tensors, each tensor cloned."""
    return pytree.tree_map(lambda leaf: None if leaf is None else leaf.clone(), tree)


class GraphedStep:
    """A step replayed from CUDA graphs: one launch per step instead of hundreds (eager batch-64 steps are
    launch-bound on a GPU, docs/BENCHMARKS.md). A training step (with its optimizer) or a shared pass (without).

    Each batch shape (the full batch, an epoch's partial last one) first runs `WARMUP_STEPS` eager steps, then
    is captured once; a change of the optimizer's hyper-parameters (the LR at a milestone) recaptures, since a
    graph holds them as constants. Each call's inputs (a batch, and what a run reads of a shared pass) are copied
    into its graph's static inputs and the outputs are cloned out of its static ones. The replayed kernels are
    the eager ones: results equal eager up to the kernels' own nondeterminism. A graph sees tensors, not Python
    values: state that a stage changes between epochs must live in a tensor updated in place (as TOFD's
    temperature does), and a step must not read a value back to the host. `warm` and `capture` are CUDA's
    unless a test fakes them.

    `counts` tallies warm-up steps, captures and replays (a run records its train step's per epoch in
    metrics.jsonl and in summary.json): every step after the warm-ups is a replay, the evidence that graphs ran.
    """

    def __init__(self, step: Callable[..., Any], optimizer: torch.optim.Optimizer | None = None,
                 warm: Callable[[Callable[..., Any], tuple], Any] = on_side_stream,
                 capture: Callable[[Callable[..., Any], tuple], tuple[Callable[[], None], Any]] = capture_cuda_graph):
        self.step, self.optimizer, self.warm, self.capture = step, optimizer, warm, capture
        self.eager_steps: Counter[tuple[int, ...]] = Counter()
        self.graphs: dict[tuple[int, ...], tuple[tuple, Callable[[], None], Any]] = {}
        self.hyper: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()

    def __call__(self, *inputs: Any) -> Any:
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        hyper = [{k: v for k, v in group.items() if k != "params"} for group in groups]
        if hyper != self.hyper:
            self.graphs.clear()
            self.hyper = hyper
        values = tensors(inputs)
        shape = tuple(values[0].shape)  # the batch's images
        if shape not in self.graphs:
            if self.eager_steps[shape] < WARMUP_STEPS:
                self.eager_steps[shape] += 1
                self.counts["warmups"] += 1
                return self.warm(self.step, inputs)
            self.graphs[shape] = self._capture(inputs)
            self.counts["captures"] += 1
        static, replay, outputs = self.graphs[shape]
        for buffer, value in zip(tensors(static), values, strict=True):
            buffer.copy_(value)
        replay()
        self.counts["replays"] += 1
        return cloned(outputs)

    def take_counts(self) -> dict[str, int]:
        """Warm-up steps, captures and replays since the last call."""
        counts = {key: self.counts[key] for key in ("warmups", "captures", "replays")}
        self.counts.clear()
        return counts

    def _capture(self, inputs: tuple) -> tuple[tuple, Callable[[], None], Any]:
        static = cloned(inputs)
        # No gradient may exist at capture: the graph's backward then writes fresh ones instead of accumulating.
        if self.optimizer is not None:
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


# ---------------------------------------------------------------------------------------------- random streams
# A run draws from its data generator (batch order, crops, flips; on the run's device) and from torch's global
# generators: the CPU's (initial weights) and, on a GPU, that GPU's default one (CRD's negatives). Each run of a group
# keeps its own copy of the global generators' state, swapped in around everything it does, so that its stream is
# the one its solo run would see. last.pt records all of them with the device they were drawn on; no other GPU's
# state, which means nothing to this run and which another machine may lack.

RESEED_STRIDE = 1_000_003  # a stream reseeded on resume starts from --seed + this x the epochs done


def global_generators(device: torch.device) -> dict[str, torch.Generator]:
    """torch's CPU generator and, on a GPU, that GPU's default generator, by their last.pt keys."""
    generators = {"torch_rng": torch.default_generator}
    if device.type == "cuda":
        torch.cuda.init()
        index = torch.cuda.current_device() if device.index is None else device.index
        generators["device_rng"] = torch.cuda.default_generators[index]
    return generators


def run_generators(data: torch.Generator) -> dict[str, torch.Generator]:
    """Every generator a run draws from, by its last.pt key: its data generator and the global ones of its device."""
    return {"data_rng": data, **global_generators(data.device)}


def capture_random_streams(device: torch.device) -> dict[str, Tensor]:
    """The global generators' state on `device`, as last.pt records it."""
    return {key: generator.get_state() for key, generator in global_generators(device).items()}


def restore_random_streams(streams: dict[str, Tensor], device: torch.device) -> None:
    """Set the global generators to a state from `capture_random_streams`."""
    for key, generator in global_generators(device).items():
        generator.set_state(streams[key])


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


# ------------------------------------------------------------------------------------------------------ a run


class Run:
    """One run as `fit_group` trains it: its stage, phases, optimizer and train step, history, folder, resume state
    and random streams, everything its solo run would hold.

    Built right after its stage, whose construction consumed the random streams it starts from.
    """

    def __init__(self, stage: Stage, cfg: TrainConfig, device: torch.device, out_dir: str | Path | None = None,
                 args: dict[str, Any] | None = None, name: str = ""):
        self.stage, self.cfg, self.args, self.name = stage, cfg, args or {}, name
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
        self._optimizer_state: tuple[int, dict] | None = None  # (phase index, state) restored from last.pt
        self._current: tuple[int, torch.optim.Optimizer, TrainStep] | None = None

    @contextlib.contextmanager
    def own_random_streams(self) -> Iterator[None]:
        """The global generators hold this run's stream while inside."""
        restore_random_streams(self.streams, self.device)
        try:
            yield
        finally:
            self.streams = capture_random_streams(self.device)

    def open(self, resume: bool, log: Callable[[str], None]) -> None:
        """Take up the run's folder: the one place where a run claims it for writing. A finished run is kept as it
        is, an interrupted one continues from its last completed epoch, and a folder holding a run is refused
        without `resume`."""
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
        if self._current is None or self._current[0] != index:
            optimizer = make_optimizer(self.phase.parameters, self.cfg)
            if self._optimizer_state is not None and self._optimizer_state[0] == index:
                optimizer.load_state_dict(self._optimizer_state[1])
            self._current = (index, optimizer, make_train_step(self.phase.loss, optimizer, self.cfg))
        cfg = self.cfg
        self.lr = cfg.lr if self.phase.constant_lr else lr_at(phase_epoch, cfg.lr, list(cfg.schedule), cfg.gamma)
        for group in self._current[1].param_groups:
            group["lr"] = self.lr
        self.stage.trainable.train()
        with self.own_random_streams():
            self.stage.start_epoch(phase_epoch)

    def step(self, batch: Batch, shared: Any) -> StepResult:
        """The run's own optimisation step on a batch, in its own random streams."""
        with self.own_random_streams():
            return self._current[2](batch, shared)

    def end_epoch(self, epoch: int, train_loss: float, train_acc: float | None, train_seconds: float,
                  data: DeviceDataset, log: Callable[[str], None]) -> None:
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
        train_step = self._current[2]
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
        index, optimizer, _ = self._current
        with self.own_random_streams():
            random_state = save_random_state(run_generators(self.generator))
        save_checkpoint(
            self.out_dir / RESUME_FILE,
            "resume",
            self.stage.trainable.state_dict(),
            stage=self.stage.kind,
            args=self.args,
            history=self.history,
            phase_index=index,
            amp=self.cfg.amp,  # the effective precision: --amp auto may pick another one on another machine
            channels_last=self.cfg.channels_last,  # the effective layout, kept on resume (cli.keep_layout)
            provenance=self.stage.provenance(),
            optimizer=optimizer.state_dict(),
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
                            f"has {cfg.channels_last}; resume in the layout it started with (cli.keep_layout gives it)")
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
            restore_random_state(ckpt, run_generators(self.generator),
                                 self.cfg.seed + RESEED_STRIDE * len(ckpt["history"]), log)
        self.history = ckpt["history"]
        self._optimizer_state = (ckpt["phase_index"], ckpt["optimizer"])

    def finish(self, data: DeviceDataset) -> dict[str, Any]:
        """Write the final weights (and the extras, apart), then summary.json (its presence marks the run done)."""
        return _explain_write_errors(self.out_dir / RESUME_FILE, self._finish, data)

    def _finish(self, data: DeviceDataset) -> dict[str, Any]:
        stage, cfg, history = self.stage, self.cfg, self.history
        weights_file = f"{stage.kind}.pt"
        fingerprint = model_fingerprint(stage.model)
        meta = {"dataset": data.name, "num_classes": data.num_classes, "image_size": data.image_size,
                "epoch": len(history), "args": self.args}
        save_checkpoint(self.out_dir / weights_file, stage.kind, stage.model.state_dict(), **meta,
                        fingerprint=fingerprint, **stage.checkpoint_meta())
        if len(stage.extras):
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
    data: DeviceDataset,
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


def fit_group(runs: list[Run], data: DeviceDataset, resume: bool = False,
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


def _train_epoch(cohort: list[Run], epoch: int, data: DeviceDataset, group_step: GroupStep,
                 log: Callable[[str], None]) -> list[tuple[Run, str]]:
    """Train `epoch` for every run of the cohort on one draw of batches; record it for each run whose loss stayed
    finite. Returns the others with their message."""
    started = time.perf_counter()
    cfg, device = cohort[0].cfg, data.device
    generator = cohort[0].generator
    state = generator.get_state()
    if any(not torch.equal(run.generator.get_state(), state) for run in cohort[1:]):
        raise RuntimeError(f"the runs training epoch {epoch} together would draw different batches")
    for run in cohort:
        run.start_epoch(epoch)
    loss_sums = [torch.zeros((), device=device) for _ in cohort]
    corrects: list[Tensor | None] = [torch.zeros((), device=device) for _ in cohort]
    batches = train_batches(data, cfg.batch_size, generator, cfg.channels_last, cfg.pad_mode)
    total = max(run.total for run in cohort)
    for batch in tqdm(batches, total=num_train_batches(data, cfg.batch_size), desc=f"epoch {epoch}/{total}",
                      leave=False, disable=None):
        for i, (loss, correct) in enumerate(group_step(cohort, batch)):
            # Accumulated on the device: no host synchronisation inside the epoch.
            loss_sums[i] += loss * batch.y.numel()
            corrects[i] = None if correct is None else corrects[i] + correct
    sums = [value for i in range(len(cohort)) for value in (loss_sums[i], corrects[i])
            if value is not None]
    read = iter((torch.stack(sums) / len(data.y_train)).tolist())  # the epoch's one host read
    totals = [(next(read), None if corrects[i] is None else next(read)) for i in range(len(cohort))]
    train_seconds = (time.perf_counter() - started) / len(cohort)  # each run's share of the epoch's training
    for run in cohort[1:]:
        run.generator.set_state(generator.get_state())
    diverged = []
    for run, (train_loss, train_acc) in zip(cohort, totals, strict=True):
        if not math.isfinite(train_loss):
            diverged.append((run, f"the training loss became {train_loss} in epoch {epoch} (diverged: try a lower "
                                  "--lr); nothing was written for this epoch"))
            continue
        run.end_epoch(epoch, train_loss, train_acc, train_seconds, data, log)
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


def evaluate(stage: Stage, data: DeviceDataset, cfg: TrainConfig) -> dict[str, tuple[float, float]]:
    """Per named classifier of `stage`: (mean cross-entropy, accuracy in percent) on the test set, as each epoch
    reports them (an imported teacher is measured so on load)."""
    return _evaluate(stage, stage.evaluate, data, cfg)


def _evaluate(stage: Stage, eval_step: Callable, data: DeviceDataset, cfg: TrainConfig) -> dict:
    """Per named classifier: (mean cross-entropy, accuracy in percent) over the test set."""
    stage.trainable.eval()
    sums: dict[str, Tensor] = {}
    with torch.inference_mode(), autocast(cfg, data.device):
        for x, y in test_batches(data, cfg.eval_batch_size, channels_last=cfg.channels_last):
            for name, logits in eval_step(x).items():
                logits = logits.float()
                batch = torch.stack([F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum()])
                sums[name] = sums[name] + batch if name in sums else batch
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

