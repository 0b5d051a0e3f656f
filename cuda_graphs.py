"""Training steps and shared passes replayed from CUDA graphs (`--compile graphs`): one launch per step instead of
hundreds, for batch-64 steps that are launch-bound on a GPU. The engine wraps a step in `GraphedStep`; nothing
else here knows about stages or runs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from utils import UserError

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
