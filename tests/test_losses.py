"""The losses equal the paper's formula, computed independently in float64."""

import math

import pytest
import torch

from losses import dih_loss, kd_loss


def reference(student, cohort, target, alpha, tau):
    """Σ_j [(1−α)·CE(s, y) + α·τ²·KL(p_j ‖ q)], KL averaged over the batch, written out by hand in float64."""
    s = student.double()
    batch = s.shape[0]
    log_softmax = lambda z: z - torch.logsumexp(z, dim=1, keepdim=True)  # noqa: E731
    ce = -log_softmax(s)[torch.arange(batch), target].mean()
    log_q = log_softmax(s / tau)
    total = 0.0
    for h in cohort:
        log_p = log_softmax(h.double() / tau)
        kl = (log_p.exp() * (log_p - log_q)).sum() / batch
        total = total + (1 - alpha) * ce + alpha * tau**2 * kl
    return total


@pytest.mark.parametrize("members", [1, 2, 4, 5])
@pytest.mark.parametrize("alpha,tau", [(0.1, 5.0), (0.5, 1.0), (0.9, 4.0), (0.0, 3.0)])
def test_dih_loss_matches_formula(members, alpha, tau):
    gen = torch.Generator().manual_seed(members * 100 + int(alpha * 10))
    student = torch.randn(16, 10, generator=gen) * 3
    cohort = [torch.randn(16, 10, generator=gen) * 3 for _ in range(members)]
    target = torch.randint(0, 10, (16,), generator=gen)
    got = dih_loss(student, cohort, target, alpha, tau)
    want = reference(student, cohort, target, alpha, tau)
    assert got.dtype == torch.float32
    assert math.isclose(got.item(), want.item(), rel_tol=1e-5, abs_tol=1e-6)
    mean = dih_loss(student, cohort, target, alpha, tau, cohort_reduction="mean")
    assert math.isclose(mean.item(), want.item() / members, rel_tol=1e-5, abs_tol=1e-6)


def test_kd_is_dih_with_one_member_and_ce_counted_per_member():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 100, generator=gen), torch.randn(8, 100, generator=gen)
    target = torch.randint(0, 100, (8,), generator=gen)
    kd = kd_loss(student, teacher, target, 0.1, 5.0)
    assert math.isclose(kd.item(), reference(student, [teacher], target, 0.1, 5.0).item(), rel_tol=1e-5)
    # With α = 0 the loss is (k+1) cross-entropies: the original counts CE once per cohort member.
    ce = torch.nn.functional.cross_entropy(student, target)
    three = dih_loss(student, [teacher] * 3, target, 0.0, 5.0)
    assert math.isclose(three.item(), 3 * ce.item(), rel_tol=1e-6)


def test_bf16_logits_are_lifted_to_fp32():
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(8, 10, generator=gen)
    cohort = [torch.randn(8, 10, generator=gen) for _ in range(3)]
    target = torch.randint(0, 10, (8,), generator=gen)
    low = dih_loss(student.bfloat16(), [c.bfloat16() for c in cohort], target, 0.1, 5.0)
    assert low.dtype == torch.float32
    assert math.isclose(low.item(), reference(student, cohort, target, 0.1, 5.0).item(), rel_tol=2e-2)


def test_gradient_matches_float64_reference():
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(6, 7, generator=gen, requires_grad=True)
    cohort = [torch.randn(6, 7, generator=gen) for _ in range(4)]
    target = torch.randint(0, 7, (6,), generator=gen)
    dih_loss(student, cohort, target, 0.3, 2.0).backward()
    student64 = student.detach().double().requires_grad_(True)
    reference(student64, cohort, target, 0.3, 2.0).backward()
    torch.testing.assert_close(student.grad.double(), student64.grad, rtol=1e-5, atol=1e-7)


def test_bad_arguments_are_refused():
    x, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError):
        dih_loss(x, [], y, 0.1, 5.0)
    with pytest.raises(ValueError):
        dih_loss(x, [x], y, 0.1, 5.0, cohort_reduction="max")


def test_float64_logits_are_computed_in_float64():
    """No detour through fp32: float64 logits give the formula to float64 rounding (fp32 errs by 1e-8 to 1e-7)."""
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(32, 100, generator=gen, dtype=torch.float64) * 4
    cohort = [torch.randn(32, 100, generator=gen, dtype=torch.float64) * 4 for _ in range(4)]
    target = torch.randint(0, 100, (32,), generator=gen)
    for reduction, members in (("sum", 1), ("mean", len(cohort))):
        got = dih_loss(student, cohort, target, 0.1, 5.0, cohort_reduction=reduction)
        assert got.dtype == torch.float64
        want = reference(student, cohort, target, 0.1, 5.0) / members
        assert math.isclose(got.item(), want.item(), rel_tol=1e-12)
    kd = kd_loss(student, cohort[0], target, 0.1, 5.0)
    assert kd.dtype == torch.float64
    assert math.isclose(kd.item(), reference(student, cohort[:1], target, 0.1, 5.0).item(), rel_tol=1e-12)
