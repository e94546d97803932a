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
    kd_loss_names,
)
from typedconfig import from_mapping


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


def test_adaptive_exact_choice_takes_the_per_sample_maximum(logits):
    s, t = logits
    loss = AdaptiveAlphaDivergence(-1.0, 1.0, 5.0, choice="exact")
    got = loss.divergence(torch.tensor(s), torch.tensor(t)).double().numpy()
    expected = np.maximum(ref_alpha_div(s, t, -1.0), ref_alpha_div(s, t, 1.0))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Both branches must be exercised by this fixture for the test to mean anything.
    picks_minus = ref_alpha_div(s, t, -1.0) > ref_alpha_div(s, t, 1.0)
    assert picks_minus.any() and (~picks_minus).any()
    np.testing.assert_array_equal(loss.picks_minus(torch.tensor(s), torch.tensor(t)).numpy(), picks_minus)


def test_symmetric_kl_is_the_sum(logits):
    s, t = logits
    got = SymmetricKLDivergence().divergence(torch.tensor(s), torch.tensor(t)).double().numpy()
    np.testing.assert_allclose(got, ref_alpha_div(s, t, 1.0) + ref_alpha_div(s, t, 0.0), rtol=1e-5)


# ---- gradients -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [-1.0, -0.5, 0.5, 2.0])
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
    _, g0, _ = autograd(AlphaDivergence(0.0), s, t, torch.float64)
    r = np.log(q / p)
    expected = q * (r - (q * r).sum(1, keepdims=True)) / s.shape[0]  # ∇ KL(q‖p)
    np.testing.assert_allclose(g0.numpy(), expected, rtol=1e-6, atol=1e-10)


# ---- the reference implementation's rules, re-derived in float64 ---------------------------------------
# The reference (AlphaNet's AdaptiveLossSoft, which produced the paper's numbers) trains each branch with
# a surrogate −Σ_i q_i ρ_i log q_i (q and ρ held constant) and compares per-sample values computed with
# clipped ratios r = p/q.  Both are written here from those formulas, in probability space.
def ref_clipped_value(s: np.ndarray, t: np.ndarray, alpha: float, clip: float) -> np.ndarray:
    q, p = softmax(s), softmax(t)
    r = p / q
    if alpha == 0.0:
        return (q * -np.log(np.minimum(r, clip))).sum(1)
    if alpha == 1.0:
        return (q * r * np.log(r)).sum(1)  # never clipped
    return (q * (np.minimum(r**alpha, clip) - 1.0)).sum(1) / (alpha * (alpha - 1.0))


def ref_surrogate_grad(s: np.ndarray, t: np.ndarray, alpha: float, clip: float | None) -> np.ndarray:
    """Per-sample d/ds of −Σ_i q_i ρ_i log q_i(s), with ∇_s log q_i = e_i − q."""
    q, p = softmax(s), softmax(t)
    r = p / q
    big = np.inf if clip is None else clip
    if alpha == 0.0:
        rho = np.log(np.minimum(r, big)) - 1.0
    elif alpha == 1.0:
        rho = r
    else:
        rho = np.minimum(r**alpha, big) / alpha + 1.0 / (alpha * (alpha - 1.0))
    c = q * rho
    return -(c - q * c.sum(1, keepdims=True))


@pytest.fixture
def noisy():
    """Noisy students of a 1000-class teacher (logits ×3): student = teacher + noise whose scale grows
    from 0.5 to 3 over the 512 rows, so that both branches are chosen in every pair tested below."""
    rng = np.random.default_rng(1)
    teacher = rng.normal(size=(512, 1000)) * 3.0
    return teacher + np.linspace(0.5, 3.0, 512)[:, None] * rng.normal(size=(512, 1000)), teacher


REFERENCE_ALPHAS = [-1.0, -0.5, 0.0, 0.5, 1.0, 2.0]


@pytest.mark.parametrize("alpha", REFERENCE_ALPHAS)
@pytest.mark.parametrize("clip", [None, 5.0])
def test_gradient_matches_the_reference_rule(noisy, alpha, clip):
    s, t = noisy
    _, grad, _ = autograd(AlphaDivergence(alpha, clip), s, t, torch.float64)
    np.testing.assert_allclose(grad.numpy(), ref_surrogate_grad(s, t, alpha, clip) / len(s), rtol=1e-6, atol=1e-12)
    if clip is not None and alpha != 1.0:  # the clip must have bitten for the comparison to mean anything
        q, p = softmax(s), softmax(t)
        assert ((p / q) ** alpha > clip).any() if alpha != 0.0 else (p / q > clip).any()


@pytest.mark.parametrize("alpha", REFERENCE_ALPHAS)
def test_clipped_value_matches_the_reference(noisy, alpha):
    s, t = noisy
    got = AlphaDivergence(alpha, 5.0).clipped_divergence(torch.tensor(s), torch.tensor(t)).numpy()
    np.testing.assert_allclose(got, ref_clipped_value(s, t, alpha, 5.0), rtol=1e-9, atol=1e-9)


def test_alpha_one_is_plain_kl_whatever_the_clip(logits):
    s, t = logits
    s = s * 2.5
    q, p = softmax(s), softmax(t)
    assert (p / q > 1.5).any()  # a clip at 1.5 would change the gradient if it were applied
    _, grad, _ = autograd(AlphaDivergence(1.0, clip=1.5), s, t, torch.float64)
    np.testing.assert_allclose(grad.numpy(), (q - p) / s.shape[0], rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("alpha_minus, alpha_plus", [(-1.0, 1.0), (-0.5, 0.5), (0.0, 1.0), (-1.0, 2.0), (0.5, 2.0)])
def test_adaptive_reference_choice_equals_the_reference(noisy, alpha_minus, alpha_plus):
    s, t = noisy
    loss = AdaptiveAlphaDivergence(alpha_minus, alpha_plus, 5.0)  # choice="reference" is the default
    value_minus = ref_clipped_value(s, t, alpha_minus, 5.0)
    value_plus = ref_clipped_value(s, t, alpha_plus, 5.0)
    minus = value_minus > value_plus  # strictly larger; ties go to α+
    assert minus.any() and (~minus).any()
    np.testing.assert_array_equal(loss.picks_minus(torch.tensor(s), torch.tensor(t)).numpy(), minus)
    value, grad, _ = autograd(loss, s, t, torch.float64)
    grad_ref = np.where(
        minus[:, None], ref_surrogate_grad(s, t, alpha_minus, 5.0), ref_surrogate_grad(s, t, alpha_plus, 5.0)
    )
    np.testing.assert_allclose(grad.numpy(), grad_ref / len(s), rtol=1e-6, atol=1e-12)
    assert value.item() == pytest.approx(np.where(minus, value_minus, value_plus).mean(), rel=1e-9)


def test_reference_and_exact_choices_differ_on_noisy_students(noisy):
    """The exact divergences pick α− far more often than the reference's clipped values do."""
    s, t = (torch.tensor(x) for x in noisy)
    reference = AdaptiveAlphaDivergence(-1.0, 1.0, 5.0, choice="reference").picks_minus(s, t).double().mean().item()
    exact = AdaptiveAlphaDivergence(-1.0, 1.0, 5.0, choice="exact").picks_minus(s, t).double().mean().item()
    print(
        f"α− chosen for {100 * reference:.1f} % (reference rule) and {100 * exact:.1f} % (exact rule) of {len(s)} samples"
    )
    assert 0.1 < reference < 0.5 and exact > 0.8


def test_adaptive_ties_go_to_alpha_plus():
    # A student equal to its teacher gives both clipped values exactly 0: a tie, so α+ everywhere.
    t = torch.randn(8, 10, dtype=torch.float64)
    loss = AdaptiveAlphaDivergence(-1.0, 1.0, 5.0)
    assert not loss.picks_minus(t.clone(), t).any()
    assert (loss.minus.clipped_divergence(t.clone(), t) == 0).all() and (
        loss.plus.clipped_divergence(t.clone(), t) == 0
    ).all()


def test_adaptive_gradient_follows_the_chosen_branch(logits):
    s, t = logits
    _, grad, _ = autograd(AdaptiveAlphaDivergence(-1.0, 1.0, 5.0, choice="exact"), s, t, torch.float64)
    plus = ref_alpha_div(s, t, 1.0) >= ref_alpha_div(s, t, -1.0)
    q, p = softmax(s), softmax(t)
    expected = np.where(plus[:, None], (q - p) / s.shape[0], ref_eq5_grad(s, t, -1.0, 5.0))
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
@given(t=logit_rows, shift=st.floats(-50, 50), name=st.sampled_from(kd_loss_names()))
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
    assert build_kd_loss(LossConfig()).choice == "reference"
    assert build_kd_loss(LossConfig(adaptive_choice="exact")).choice == "exact"
    built = {name: build_kd_loss(LossConfig(kd_loss=name, alpha=-0.5, temperature=2.0)) for name in kd_loss_names()}
    assert isinstance(built["alpha"], AlphaDivergence) and built["alpha"].alpha == -0.5
    assert isinstance(built["kl"], KLDivergence) and built["kl"].temperature == 2.0
    assert isinstance(built["reverse_kl"], ReverseKLDivergence)
    assert isinstance(built["symmetric_kl"], SymmetricKLDivergence)
    with pytest.raises(ValueError, match="alpha_minus"):
        LossConfig(alpha_minus=1.0, alpha_plus=1.0)


def test_every_loss_is_registered_once_under_its_config_name():
    assert kd_loss_names() == ["adaptive_alpha", "alpha", "kl", "reverse_kl", "symmetric_kl"]
    assert KD_LOSSES.get("reverse_kl") is ReverseKLDivergence
    assert build_kd_loss(LossConfig(kd_loss="none")) is None
    # reverse KL is the α = 0 alpha-divergence, never clipped: loss.alpha and loss.clip do not reach it
    reverse = build_kd_loss(LossConfig(kd_loss="reverse_kl", alpha=0.5, clip=2.0))
    assert (reverse.alpha, reverse.clip) == (0.0, None)


def test_an_unknown_kd_loss_is_one_line_listing_the_registered_names():
    with pytest.raises(ValueError) as err:
        LossConfig(kd_loss="alpha_beta")
    names = "adaptive_alpha, alpha, kl, reverse_kl, symmetric_kl"
    assert (
        str(err.value) == f"loss.kd_loss: unknown KD loss 'alpha_beta'; registered: {names} (or none: no distillation)"
    )
    from trainer.teachers.voted import VotedConfig

    assert VotedConfig(kd_loss="symmetric_kl").kd_loss == "symmetric_kl"
    with pytest.raises(ValueError, match=rf"^task.teacher.kd_loss: unknown KD loss 'none'; registered: {names}$"):
        VotedConfig(kd_loss="none")  # the vote term is a KD loss: "none" is no choice there
    assert from_mapping(LossConfig, {"kd_loss": "none"}).kd_loss == "none"  # the YAML value stays a plain string
