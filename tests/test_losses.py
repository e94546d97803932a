"""KD divergences against independent float64 closed forms, Eq. 5 gradients, limits, stability."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from losses import (
    KD_LOSSES,
    AdaptiveAlphaDivergence,
    AlphaDivergence,
    KLDivergence,
    LabelSmoothingCrossEntropy,
    LossConfig,
    ReverseKLDivergence,
    SymmetricKLDivergence,
    build_kd_loss,
)


# ---- independent references, written from the formulas with NumPy in float64 ----------------------------
def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def ref_alpha_div(s: np.ndarray, t: np.ndarray, alpha: float) -> np.ndarray:
    """D_α(p‖q) = 1/(α(α−1)) Σ q[(p/q)^α − 1] (AlphaNet Eq. 3) and its limits."""
    q, p = softmax(s), softmax(t)
    if alpha == 1.0:
        return (p * np.log(p / q)).sum(1)
    if alpha == 0.0:
        return (q * np.log(q / p)).sum(1)
    return (q * ((p / q) ** alpha - 1.0)).sum(1) / (alpha * (alpha - 1.0))


def ref_eq5_grad(s: np.ndarray, t: np.ndarray, alpha: float, clip: float | None) -> np.ndarray:
    """d/ds of the batch mean, from −(1/α) E_q[min((p/q)^α, β) ∇_s log q] with ∇_s log q_i = e_i − q."""
    q, p = softmax(s), softmax(t)
    w = (p / q) ** alpha
    if clip is not None:
        w = np.minimum(w, clip)
    c = q * w
    return -(c - q * c.sum(1, keepdims=True)) / alpha / s.shape[0]


def autograd(loss, s: np.ndarray, t: np.ndarray, dtype=torch.float32):
    student = torch.tensor(s, dtype=dtype, requires_grad=True)
    teacher = torch.tensor(t, dtype=dtype, requires_grad=True)
    value = loss(student, teacher)
    value.backward()
    return value, student.grad, teacher.grad


@pytest.fixture
def logits():
    """Random rows, plus two rows of a confident student against a flat teacher (where KL(p‖q) is
    the larger of the adaptive pair; on random rows D_{-1} usually is)."""
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(6, 10)) * 2.0, rng.normal(size=(6, 10)) * 2.0
    s[4:] = 0.0
    s[4:, 0] = [6.0, 9.0]
    t[4:] = rng.normal(size=(2, 10)) * 0.1
    return s, t


# ---- values --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [-2.0, -1.0, -0.5, 0.0, 0.3, 0.5, 1.0, 1.5, 2.0])
def test_alpha_divergence_value_matches_closed_form(logits, alpha):
    s, t = logits
    got = AlphaDivergence(alpha).divergence(torch.tensor(s), torch.tensor(t)).double().numpy()
    np.testing.assert_allclose(got, ref_alpha_div(s, t, alpha), rtol=1e-5, atol=1e-6)


def test_limits_alpha_to_one_and_zero_are_the_kls(logits):
    s, t = (torch.tensor(x) for x in logits)
    kl = KLDivergence().divergence(s, t)
    rkl = ReverseKLDivergence().divergence(s, t)
    for eps in (1e-3, -1e-3):
        torch.testing.assert_close(AlphaDivergence(1.0 + eps).divergence(s, t), kl, rtol=5e-3, atol=1e-5)
        torch.testing.assert_close(AlphaDivergence(eps).divergence(s, t), rkl, rtol=5e-3, atol=1e-5)
    np.testing.assert_allclose(kl.double().numpy(), ref_alpha_div(*logits, 1.0), rtol=1e-5)
    np.testing.assert_allclose(rkl.double().numpy(), ref_alpha_div(*logits, 0.0), rtol=1e-5)


def test_training_loss_value_is_the_batch_mean_divergence(logits):
    s, t = (torch.tensor(x, dtype=torch.float32) for x in logits)
    for loss in (
        AlphaDivergence(-1.0, clip=5.0),
        AdaptiveAlphaDivergence(),
        SymmetricKLDivergence(),
        ReverseKLDivergence(),
    ):
        torch.testing.assert_close(loss(s, t), loss.divergence(s, t).mean())


def test_adaptive_takes_the_per_sample_maximum(logits):
    s, t = logits
    got = AdaptiveAlphaDivergence(-1.0, 1.0, 5.0).divergence(torch.tensor(s), torch.tensor(t)).double().numpy()
    expected = np.maximum(ref_alpha_div(s, t, -1.0), ref_alpha_div(s, t, 1.0))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Both branches must be exercised by this fixture for the test to mean anything.
    picks_minus = ref_alpha_div(s, t, -1.0) > ref_alpha_div(s, t, 1.0)
    assert picks_minus.any() and (~picks_minus).any()


def test_symmetric_kl_is_the_sum(logits):
    s, t = logits
    got = SymmetricKLDivergence().divergence(torch.tensor(s), torch.tensor(t)).double().numpy()
    np.testing.assert_allclose(got, ref_alpha_div(s, t, 1.0) + ref_alpha_div(s, t, 0.0), rtol=1e-5)


# ---- gradients -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [-1.0, -0.5, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("clip", [None, 5.0, 1.5])
def test_gradient_is_eq5(logits, alpha, clip):
    s, t = logits
    s = s * 2.5  # spread the ratios so that clipping is active for some classes
    _, grad, teacher_grad = autograd(AlphaDivergence(alpha, clip), s, t, torch.float64)
    np.testing.assert_allclose(grad.numpy(), ref_eq5_grad(s, t, alpha, clip), rtol=1e-6, atol=1e-9)
    assert teacher_grad is None
    if clip == 1.5:  # make sure the clip actually bit somewhere
        q, p = softmax(s), softmax(t)
        assert ((p / q) ** alpha > clip).any()


def test_unclipped_alpha_one_and_zero_gradients_are_the_kl_gradients(logits):
    s, t = logits
    q, p = softmax(s), softmax(t)
    _, g1, _ = autograd(AlphaDivergence(1.0), s, t, torch.float64)
    np.testing.assert_allclose(g1.numpy(), (q - p) / s.shape[0], rtol=1e-6, atol=1e-10)  # ∇ KL(p‖q) = q − p
    _, g0, _ = autograd(AlphaDivergence(0.0, clip=5.0), s, t, torch.float64)
    r = np.log(q / p)
    expected = q * (r - (q * r).sum(1, keepdims=True)) / s.shape[0]  # ∇ KL(q‖p)
    np.testing.assert_allclose(g0.numpy(), expected, rtol=1e-6, atol=1e-10)


def test_adaptive_gradient_follows_the_chosen_branch(logits):
    s, t = logits
    _, grad, _ = autograd(AdaptiveAlphaDivergence(-1.0, 1.0, 5.0), s, t, torch.float64)
    plus = ref_alpha_div(s, t, 1.0) >= ref_alpha_div(s, t, -1.0)
    expected = np.where(plus[:, None], ref_eq5_grad(s, t, 1.0, 5.0), ref_eq5_grad(s, t, -1.0, 5.0))
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-6, atol=1e-10)


def test_kl_temperature_scales_by_t_squared(logits):
    s, t = logits
    temperature = 4.0
    loss, grad, _ = autograd(KLDivergence(temperature), s, t, torch.float64)
    ref = ref_alpha_div(s / temperature, t / temperature, 1.0)
    assert loss.item() == pytest.approx(ref.mean() * temperature**2, rel=1e-9)
    q, p = softmax(s / temperature), softmax(t / temperature)
    np.testing.assert_allclose(grad.numpy(), temperature * (q - p) / s.shape[0], rtol=1e-6, atol=1e-12)


# ---- numerical safety ----------------------------------------------------------------------------------
ALL_LOSSES = [
    AlphaDivergence(-1.0),
    AlphaDivergence(-1.0, 5.0),
    AlphaDivergence(2.0),
    AlphaDivergence(0.5, 5.0),
    AlphaDivergence(1.0, 5.0),
    AdaptiveAlphaDivergence(),
    AdaptiveAlphaDivergence(-2.0, 2.0, None),
    KLDivergence(),
    KLDivergence(3.0),
    ReverseKLDivergence(),
    SymmetricKLDivergence(),
]


def has_unbounded_weights(loss) -> bool:
    """(p/q)^α is unbounded for α outside [0, 1] unless clipped."""
    if isinstance(loss, AdaptiveAlphaDivergence):
        return has_unbounded_weights(loss.minus) or has_unbounded_weights(loss.plus)
    return isinstance(loss, AlphaDivergence) and loss.clip is None and not 0.0 <= loss.alpha <= 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", ALL_LOSSES, ids=repr)
@pytest.mark.parametrize(
    "student, teacher",
    [
        ([[200.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]),
        ([[0.0, 0.0, 0.0]], [[200.0, 0.0, 0.0]]),
        ([[200.0, 0.0, -200.0]], [[-200.0, 0.0, 200.0]]),
        ([[1e4, -1e4, 0.0]], [[-1e4, 1e4, 0.0]]),
    ],
)
def test_extreme_logits_give_finite_values_and_gradients(loss, dtype, student, teacher):
    if dtype is torch.float16 and has_unbounded_weights(loss):
        pytest.skip("unclipped importance weights exceed float16's range here; fp16 training relies on loss scaling")
    s = torch.tensor(student, dtype=dtype, requires_grad=True)
    t = torch.tensor(teacher, dtype=dtype)
    value = loss(s, t)
    value.backward()
    assert torch.isfinite(value), value
    assert torch.isfinite(loss.divergence(s, t)).all()
    assert torch.isfinite(s.grad).all(), s.grad
    assert value.item() >= 0


def test_underflowing_student_probability_gives_the_true_divergence():
    # q = softmax([200, 0, 0]) underflows to exactly 0 in float32 for two classes; the reference
    # implementation divides by it and returns NaN.  Here D_{-1}(p‖q) = (Σ q²/p − 1)/2 = (3·1 − 1)/2 = 1.
    s = torch.tensor([[200.0, 0.0, 0.0]])
    t = torch.zeros(1, 3)
    assert AlphaDivergence(-1.0).divergence(s, t).item() == pytest.approx(1.0, rel=1e-6)
    assert KLDivergence().divergence(s, t).item() == pytest.approx(200.0 * 2 / 3 - math.log(3), rel=1e-5)


logit_rows = arrays(np.float64, (3, 5), elements=st.floats(-30, 30, allow_nan=False, allow_infinity=False))


@settings(max_examples=60, deadline=None)
@given(s=logit_rows, t=logit_rows, alpha=st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]))
def test_property_non_negative_and_matches_closed_form(s, t, alpha):
    got = AlphaDivergence(alpha).divergence(torch.tensor(s), torch.tensor(t)).double().numpy()
    assert (got >= 0).all()
    ref = ref_alpha_div(s, t, alpha)
    finite = np.isfinite(ref) & (np.abs(ref) < 1e30)
    np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-3, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(t=logit_rows, shift=st.floats(-50, 50), name=st.sampled_from(sorted(KD_LOSSES)))
def test_property_zero_when_student_equals_teacher(t, shift, name):
    loss = build_kd_loss(LossConfig(kd_loss=name, alpha=-0.5))
    s = torch.tensor(t + shift, requires_grad=True)  # a constant shift leaves the softmax unchanged
    value = loss(s, torch.tensor(t))
    value.backward()
    assert abs(value.item()) < 1e-5
    assert s.grad.abs().max().item() < 1e-5


# ---- cross-entropy and the registry ----------------------------------------------------------------------
def test_label_smoothing_cross_entropy_matches_formula(logits):
    s, _ = logits
    target = np.array([0, 3, 9, 2, 2, 5])
    eps, k = 0.1, s.shape[1]
    smooth = np.full_like(s, eps / k)
    smooth[np.arange(len(target)), target] += 1 - eps
    log_q = np.log(softmax(s))
    expected = -(smooth * log_q).sum(1).mean()
    got = LabelSmoothingCrossEntropy(eps)(torch.tensor(s), torch.tensor(target)).item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_every_named_loss_builds_from_config():
    assert isinstance(build_kd_loss(LossConfig()), AdaptiveAlphaDivergence)
    built = {name: build_kd_loss(LossConfig(kd_loss=name, alpha=-0.5, temperature=2.0)) for name in KD_LOSSES}
    assert isinstance(built["alpha"], AlphaDivergence) and built["alpha"].alpha == -0.5
    assert isinstance(built["kl"], KLDivergence) and built["kl"].temperature == 2.0
    assert isinstance(built["reverse_kl"], ReverseKLDivergence)
    assert isinstance(built["symmetric_kl"], SymmetricKLDivergence)
    with pytest.raises(ValueError, match="alpha_minus"):
        LossConfig(alpha_minus=1.0, alpha_plus=1.0)
