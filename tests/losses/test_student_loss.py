"""The distilled sub-networks' loss levers (losses/student.py) against the formulas written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from losses import LossConfig, build_kd_loss, build_label_loss
from losses.student import StudentLoss


def batch(seed: int = 0, n: int = 16, k: int = 10):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, k, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(n, k, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, k, (n,), generator=g)
    return student, teacher, labels


def smoothed_ce(logits, labels, eps=0.1):
    """Cross-entropy against (1−ε)·onehot + ε/K, per sample, from its definition."""
    k = logits.shape[1]
    log_q = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    target = torch.full_like(log_q, eps / k)
    target[torch.arange(len(labels)), labels] += 1 - eps
    return -(target * log_q).sum(dim=1)


def kl(student, teacher):
    log_q = student - torch.logsumexp(student, dim=1, keepdim=True)
    log_p = teacher - torch.logsumexp(teacher, dim=1, keepdim=True)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def losses(kd="kl"):
    config = LossConfig(kd_loss=kd)
    return build_label_loss(config), build_kd_loss(config)


def test_without_levers_it_is_the_weighted_kd_loss_exactly():
    label, kd = losses("adaptive_alpha")
    student, teacher, labels = batch()
    plain = StudentLoss(label, kd, kd_weight=2.5)
    assert not plain.has_levers
    assert torch.equal(plain(student, teacher, labels, step=0), 2.5 * kd(student, teacher))


def test_label_mix_is_gamma_ce_plus_one_minus_gamma_kd():
    label, kd = losses()
    student, teacher, labels = batch(1)
    value = StudentLoss(label, kd, label_mix=0.3)(student, teacher, labels, step=100)
    expected = (0.3 * smoothed_ce(student, labels) + 0.7 * kl(student, teacher)).mean()
    assert math.isclose(value.item(), expected.item(), rel_tol=1e-6)


@pytest.mark.parametrize(("step", "ramp"), [(0, 0.0), (5, 0.25), (10, 0.5), (20, 1.0), (50, 1.0)])
def test_warmup_ramps_kd_in_linearly(step, ramp):
    label, kd = losses()
    student, teacher, labels = batch(2)
    loss = StudentLoss(label, kd, warmup_steps=20, label_mix=0.2, kd_weight=2.0)
    assert loss.kd_share(step) == pytest.approx(ramp * 0.8)
    share = ramp * 0.8
    expected = ((1 - share) * smoothed_ce(student, labels) + share * 2.0 * kl(student, teacher)).mean()
    assert math.isclose(loss(student, teacher, labels, step=step).item(), expected.item(), rel_tol=1e-6)


def test_teacher_correct_gate_sends_wrong_teacher_samples_to_the_labels():
    label, kd = losses()
    student, teacher, labels = batch(3, n=32)
    labels[::2] = teacher[::2].argmax(dim=1)  # half the teacher's answers right, the others right by chance only
    right = teacher.argmax(dim=1) == labels
    assert 0 < right.sum() < len(labels)  # both kinds of sample in the batch
    metrics = {}
    value = StudentLoss(label, kd, gate="teacher_correct")(student, teacher, labels, step=0, metrics=metrics, name="s")
    expected = torch.where(right, kl(student, teacher), smoothed_ce(student, labels)).mean()
    assert math.isclose(value.item(), expected.item(), rel_tol=1e-6)
    assert metrics["kd_share/s"].item() == pytest.approx(right.double().mean().item())
    assert "kd_div/s" in metrics


def test_gradient_follows_the_mixed_formula():
    label, kd = losses("adaptive_alpha")
    student, teacher, labels = batch(4)
    ours = student.clone().requires_grad_(True)
    StudentLoss(label, kd, label_mix=0.4)(ours, teacher, labels, step=0).backward()
    ref = student.clone().requires_grad_(True)
    (0.4 * smoothed_ce(ref, labels).mean() + 0.6 * kd(ref, teacher)).backward()
    torch.testing.assert_close(ours.grad, ref.grad)


def test_without_kd_loss_the_students_learn_from_the_labels():
    label, _ = losses()
    student, teacher, labels = batch(5)
    value = StudentLoss(label, None, label_mix=0.5)(student, teacher, labels, step=0)
    assert math.isclose(value.item(), smoothed_ce(student, labels).mean().item(), rel_tol=1e-6)


def test_bad_values_are_refused():
    label, kd = losses()
    with pytest.raises(ValueError, match="label_mix"):
        StudentLoss(label, kd, label_mix=1.5)
    with pytest.raises(ValueError, match="gate"):
        StudentLoss(label, kd, gate="sometimes")
    with pytest.raises(ValueError, match="kd_gate"):
        LossConfig(kd_gate="sometimes")
    with pytest.raises(ValueError, match="kd_label_mix"):
        LossConfig(kd_label_mix=2.0)
