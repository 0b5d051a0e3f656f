"""Every method's distillation term is wired: the teacher's signal reaches the student's gradient, and with the
teacher's weight at zero the gradient is the cross-entropy's alone. Then the KD family with the cross-entropy
weight at zero (α = 1): the student still learns, from the teacher alone.

Learnability thresholds elsewhere are cleared by cross-entropy alone, so they cannot see a miswired teacher term;
these tests can. Each perturbs exactly the teacher output a method uses (the final logits, one tapped map, the
pooled feature), through `Perturbed`, and compares the student's gradient with the unperturbed one: any change
proves the signal arrives (the CPU is deterministic: an unwired signal leaves the gradient bit-identical).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_learnable
from helpers import CLASSES, CPU, SIZE, build_stage
from torch import Tensor, nn

from data import Batch, from_arrays
from engine import TrainConfig, fit
from heads import heads_for
from methods import METHODS, Setup
from models import Features, build_model
from stages import HeadsTraining, TeacherTraining

BATCH = 4


class Perturbed(nn.Module):
    """The frozen teacher with one of its outputs shifted by a fixed random tensor of `scale` (0: unchanged).

    `output` is "logits", "pooled" or "tap<i>"; every way a method reads the teacher (its call, forward_features,
    forward_to_tap) sees the same shifted output.
    """

    def __init__(self, teacher: nn.Module, output: str = "logits", scale: float = 0.0):
        super().__init__()
        self.teacher, self.output, self.scale = teacher, output, scale
        self.tap_names, self.taps_nonnegative = teacher.tap_names, teacher.taps_nonnegative

    def shift(self, value: Tensor) -> Tensor:
        noise = torch.randn(value.shape, generator=torch.Generator().manual_seed(7), dtype=value.dtype)
        return value + self.scale * value.std() * noise

    def forward_features(self, x: Tensor) -> Features:
        logits, taps, pooled = self.teacher.forward_features(x)
        taps = [self.shift(t) if self.output == f"tap{i}" else t for i, t in enumerate(taps)]
        return Features(self.shift(logits) if self.output == "logits" else logits, taps,
                        self.shift(pooled) if self.output == "pooled" else pooled)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x).logits

    def forward_to_tap(self, x: Tensor, tap: int) -> Tensor:
        return self.forward_features(x).taps[tap]






def batches() -> tuple[Batch, Batch]:
    gen = torch.Generator().manual_seed(1)
    return tuple(Batch(torch.randn(BATCH, 3, SIZE, SIZE, generator=gen), torch.randint(0, CLASSES, (BATCH,),
                                                                                        generator=gen),
                       torch.arange(BATCH) + i * BATCH) for i in range(2))


def gradient(method: str, output: str = "logits", scale: float = 0.0, phase: int = -1, wrap: bool = True, **hyper
             ) -> dict[str, Tensor]:
    """The student's gradient from `method`'s loss (of its `phase`), the teacher's `output` shifted by `scale`
    (`wrap=False`: the bare teacher).

    The one place that calls a method's step. CRD first runs a step's forward on an earlier batch: its memory
    banks take the teacher's embeddings from it, and the student meets them only in later steps.
    """
    stage = build_stage(method, **hyper)
    if wrap:  # the teacher the student reads: through its shared pass
        stage.shared_pass.teacher = Perturbed(stage.shared_pass.teacher, output, scale)
    stage.trainable.train()
    stage.start_epoch(1)
    chosen = stage.phases(1)[phase]

    def loss_fn(b: Batch):
        shared = stage.shared_pass.select(stage.shared_pass(b, chosen.needs), chosen.needs) if chosen.needs else None
        return chosen.loss(b, shared)

    earlier, batch = batches()
    torch.manual_seed(2)  # CRD draws its negatives from torch's generator
    if method == "crd":
        loss_fn(earlier)
    stage.trainable.zero_grad(set_to_none=True)
    loss_fn(batch)[0].backward()
    return {name: p.grad.clone() for name, p in stage.model.named_parameters() if p.grad is not None}


def ce_gradient(extra_heads: str | None = None, weight: float = 1.0, beta: float = 0.0) -> dict[str, Tensor]:
    """The same student's gradient from `weight`·CE(logits, y) (+ β·Σ CE of MHKD's student heads), written out."""
    stage = build_stage("mhkd" if extra_heads else "ce")
    stage.trainable.train()
    _, batch = batches()
    student = stage.model.forward_features(batch.x)
    loss = weight * F.cross_entropy(student.logits.float(), batch.y)
    if extra_heads:
        loss = loss + beta * sum(F.cross_entropy(h.float(), batch.y) for h in stage.student_heads(student.taps))
    stage.trainable.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in stage.model.named_parameters() if p.grad is not None}


def change(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Relative L2 distance between two gradients (over the parameters both have)."""
    keys = a.keys() & b.keys()
    diff = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in keys)
    return (diff / sum(float(a[k].double().pow(2).sum()) for k in keys)) ** 0.5


TAUGHT = [name for name, method in METHODS.items() if method.teacher != "none"]  # every method with a teacher
# Each method's teacher outputs that must reach the student's gradient (with the method's defaults). A registered
# method missing here fails the test below rather than going unchecked.
SIGNALS = {
    "kd": ["logits"],
    "takd": ["logits"],  # the assistant in the teacher's place
    "fitnets": ["logits"],  # its KD phase; the hint phase below
    "at": ["tap0", "tap1", "tap2"],
    "crd": ["pooled"],  # through the teacher's memory bank, filled by the earlier batch
    "tofd": ["logits", "pooled", "tap0", "tap1"],  # the main pair's logits and feature, each auxiliary pair
    "mhkd": ["logits", "tap0", "tap1"],  # the teacher's logits, and each teacher head (on taps 1 and 2)
    "dih": ["logits", "tap0", "tap1", "tap2"],  # the final classifier and each head
    "dkd": ["logits"],  # both its terms read the final logits (warmed up: 1/20 of their weight in epoch 1)
}
# Where a term weighs little at the defaults (MHKD's head KD: β·α = 0.05; TOFD's features: β = 0.05) its weight is
# raised, so that every change stands far above rounding.
HYPER = {"crd": {"nce_k": 16}, "mhkd": {"alpha": 0.9}, "tofd": {"beta": 1.0}}


@pytest.mark.parametrize("method", TAUGHT)
def test_the_teachers_signal_reaches_the_students_gradient(method):
    """An unwired output would leave the gradient bit-identical on the CPU (as TOFD's β = 0 shows below); each
    changes it by 1e-4 relative at least (measured: 2.7e-4 to 0.5)."""
    assert method in SIGNALS, f"{method}: name the teacher outputs that must reach its student's gradient"
    hyper = HYPER.get(method, {})
    base = gradient(method, **hyper)
    changes = {output: change(gradient(method, output, 1.0, **hyper), base) for output in SIGNALS[method]}
    assert min(changes.values()) > 1e-4, changes


def test_fitnets_hint_phase_learns_the_teachers_first_map_with_the_first_stage_only():
    base = gradient("fitnets", phase=0)
    assert change(gradient("fitnets", "tap0", 1.0, phase=0), base) > 1e-3
    stage = build_stage("fitnets")
    first = {name for name, _ in stage.model.named_parameters() if name.startswith(("stem.", "stages.0."))}
    assert set(base) == first  # nothing past tap 1 runs, nor learns, in the hint phase


def test_a_perturbation_of_zero_changes_nothing():
    """The wrapper itself is faithful: scale 0 gives the gradient of the bare teacher, bit for bit."""
    wrapped, bare = gradient("dih", "tap1"), gradient("dih", wrap=False)
    assert wrapped.keys() == bare.keys() and all(torch.equal(wrapped[name], bare[name]) for name in bare)


# With the teacher's weight at zero (KD family: α = 0; feature methods: β = 0) the gradient is the cross-entropy's,
# though the teacher's output is perturbed: it no longer matters.
# (method: its teacher's weights at zero, the output perturbed, the cross-entropy gradient's arguments)
REMOVED = {
    "kd": ({"alpha": 0.0}, "logits", {}),
    "takd": ({"alpha": 0.0}, "logits", {}),
    "fitnets": ({"alpha": 0.0}, "logits", {}),
    "dih": ({"alpha": 0.0}, "tap1", {"weight": 4.0}),  # the cohort sum counts CE once per member: 3 heads + final
    "at": ({"beta": 0.0}, "tap1", {}),
    "crd": ({"beta": 0.0, "nce_k": 16}, "pooled", {}),
    "mhkd": ({"alpha": 0.0}, "tap0", {"extra_heads": "student", "beta": 0.5}),  # its heads' CE stays, the KD goes
    "dkd": ({"alpha": 0.0, "beta": 0.0}, "logits", {}),  # its CE weight is 1: TCKD and NCKD both go
}
ZEROED_ELSEWHERE = {"tofd"}  # no weight on its logit term: test_tofd_without_its_feature_weight_... below


@pytest.mark.parametrize("method", [name for name in TAUGHT if name not in ZEROED_ELSEWHERE])
def test_with_the_teachers_weight_at_zero_the_gradient_is_cross_entropys(method):
    assert method in REMOVED, f"{method}: give the weights that remove its teacher's term"
    hyper, output, reference = REMOVED[method]
    want, got = ce_gradient(**reference), gradient(method, output, 1.0, **hyper)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=f"{method} {name}")


def test_tofd_without_its_feature_weight_ignores_the_teachers_features():
    """TOFD has no weight on its logit term (SCE at T_e) to zero; β = 0 makes the pooled features irrelevant,
    exactly, while the logits still count."""
    base = gradient("tofd", beta=0.0)
    assert change(gradient("tofd", "pooled", 1.0, beta=0.0), base) == 0.0
    assert change(gradient("tofd", "logits", 1.0, beta=0.0), base) > 1e-3


# ------------------------------------------------------------------------ α = 1: from the teacher alone


def fit_quietly(stage, dataset, out: Path, epochs: int = 2) -> float:
    """engine.fit at batch 16, lr 0.05 then 0.005: the final test accuracy."""
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=0.05, momentum=0.9, wd=5e-4, nesterov=True, schedule=(1,),
                      gamma=0.1, seed=30)
    return fit(stage, dataset, cfg, out, {}, log=lambda line: None)["final_test_acc"]


def student_of(method: str, teacher: nn.Module, dataset, heads: nn.Module | None = None, **hyper):
    torch.manual_seed(30)
    spec = METHODS[method]
    setup = Setup(build_model("res8", CLASSES), teacher, {**spec.defaults, "alpha": 1.0, **hyper}, dataset, meta={},
                  heads=heads)
    return spec.build(setup)


def test_kd_family_learns_from_the_teacher_alone(tmp_path):
    """α = 1 leaves no cross-entropy in the student's loss: above chance (10%) only if the teacher's term works.
    The control, KD from an untrained teacher, stays near chance: the labels do not leak in another way. On the
    learnable set (tests/conftest.py) at 16x16: a res8 teacher trained 2 epochs, its heads 1, each student 2 (DIH 4).
    Measured: teacher 90%, students 52-60%, control 1%."""
    x_train, y_train, x_test, y_test = make_learnable(160, 100)
    dataset = from_arrays(x_train[:, ::2, ::2].copy(), y_train, x_test[:, ::2, ::2].copy(), y_test, CPU)
    torch.manual_seed(30)
    teacher = build_model("res8", CLASSES)
    teacher_acc = fit_quietly(TeacherTraining(teacher, "res8"), dataset, tmp_path / "teacher")
    teacher.eval().requires_grad_(False)
    torch.manual_seed(30)
    heads = heads_for(teacher, CLASSES, dataset.image_size)
    fit_quietly(HeadsTraining(teacher, heads, {"model": "res8", "fingerprint": "-"}), dataset, tmp_path / "heads", 1)
    heads.eval().requires_grad_(False)
    accuracy = {}
    for method, extra, epochs in (("kd", {}, 2), ("fitnets", {"hint_epochs": 1}, 2), ("mhkd", {}, 2),
                                  ("dih", {}, 4)):  # 4 members' KL at T = 5 alone: measured 30-41% after 2 epochs
        stage = student_of(method, teacher, dataset, heads if method == "dih" else None, **extra)
        accuracy[method] = fit_quietly(stage, dataset, tmp_path / method, epochs)
        if method == "kd":  # TAKD: the KD student as the assistant, teaching the next student
            assistant = stage.model.eval().requires_grad_(False)
            accuracy["takd"] = fit_quietly(student_of("takd", assistant, dataset), dataset, tmp_path / "takd")
    torch.manual_seed(31)
    untrained = build_model("res8", CLASSES).eval().requires_grad_(False)
    control = fit_quietly(student_of("kd", untrained, dataset), dataset, tmp_path / "control")
    assert teacher_acc > 80.0, teacher_acc
    assert min(accuracy.values()) > 35.0, accuracy
    assert control < 20.0, control
