"""Knowledge-distillation divergences between a teacher p = softmax(t) and a student q = softmax(s).

Every loss has two faces:

* ``forward(student_logits, teacher_logits)`` → the batch-mean *training* loss.  Its value is the
  divergence itself and its gradient with respect to the student logits is the one the method
  prescribes (for the clipped alpha-divergence, the paper's Eq. 5).  The teacher never gets a gradient.
* ``divergence(student_logits, teacher_logits)`` → the per-sample divergence value, for logging.

All arithmetic runs in at least float32 (bf16/fp16 inputs are upcast) and in log space: a probability that
underflows to zero gives a zero term, never NaN or inf.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_LOG_FLOAT32_MAX = math.log(torch.finfo(torch.float32).max)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log q with gradient, log p without) in float32, or float64 for float64 inputs."""
    log_q = F.log_softmax(_upcast(student_logits), dim=1)
    log_p = F.log_softmax(_upcast(teacher_logits.detach()), dim=1)
    return log_q, log_p


def _safe_exp_cap(num_classes: int) -> float:
    """Largest exponent whose exp, summed over the classes, stays finite in float32."""
    return _LOG_FLOAT32_MAX - math.log(num_classes) - 1.0


def kl_per_sample(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a‖b) = Σ a (log a − log b) per row; rows where a underflows contribute exactly 0."""
    return (log_a.exp() * (log_a - log_b)).sum(dim=1)


def alpha_divergence_per_sample(log_q: torch.Tensor, log_p: torch.Tensor, alpha: float) -> torch.Tensor:
    """D_α(p‖q) = 1/(α(α−1)) (Σ p^α q^(1−α) − 1) per row; KL(p‖q) at α=1, KL(q‖p) at α=0.

    The sum is a log-sum-exp; values beyond float32 saturate at its largest finite number.
    """
    if alpha == 1.0:
        value = kl_per_sample(log_p, log_q)
    elif alpha == 0.0:
        value = kl_per_sample(log_q, log_p)
    else:
        log_sum = torch.logsumexp(alpha * log_p + (1.0 - alpha) * log_q, dim=1)
        value = torch.expm1(log_sum.clamp(max=_LOG_FLOAT32_MAX - 1.0)) / (alpha * (alpha - 1.0))
    return value.clamp(min=0.0, max=torch.finfo(torch.float32).max)


def clipped_alpha_gradient(log_q: torch.Tensor, log_p: torch.Tensor, alpha: float, clip: float | None) -> torch.Tensor:
    """Per-sample gradient w.r.t. the student logits of −(1/α) E_q[min((p/q)^α, β) ∇log q] (Eq. 5).

    With c_i = q_i·min((p_i/q_i)^α, β) and ∇_s log q_i = e_i − q this is −(1/α)(c − q Σc).  The
    importance weights are computed in log space and capped so that the sum stays finite in float32
    (an unclipped weight beyond that range saturates instead of becoming inf).
    """
    log_ratio = alpha * (log_p - log_q)
    if clip is not None:
        log_ratio = log_ratio.clamp(max=math.log(clip))
    cap = _safe_exp_cap(log_q.shape[1]) - max(0.0, math.log(1.0 / abs(alpha)))
    weight = (log_q + log_ratio).clamp(max=cap).exp()
    return -(weight - log_q.exp() * weight.sum(dim=1, keepdim=True)) / alpha


class _ValueWithGradient(torch.autograd.Function):
    """Returns a precomputed per-sample ``value``; backpropagates a precomputed gradient to ``logits``.

    This realises "a loss whose value is the divergence and whose gradient is Eq. 5" without a
    surrogate expression, whose intermediate products could overflow where the true values do not.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, value: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gradient)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (gradient,) = ctx.saved_tensors
        return grad_output[:, None] * gradient, None, None


class KDLoss(nn.Module):
    """Base class: subclasses implement ``per_sample_loss`` (training) and ``divergence`` (logging)."""

    def per_sample_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
            raise ValueError(
                f"expected student and teacher logits of one (batch, classes) shape, got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
            )
        return self.per_sample_loss(student_logits, teacher_logits).mean()


class AlphaDivergence(KDLoss):
    """D_α(p‖q) trained with clipped importance weights min((p/q)^α, β) when ``clip`` = β is set."""

    def __init__(self, alpha: float, clip: float | None = None):
        super().__init__()
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be positive, got {clip}")
        self.alpha = float(alpha)
        self.clip = clip

    def divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_q, log_p = _log_probs(student_logits, teacher_logits)
        return alpha_divergence_per_sample(log_q.detach(), log_p, self.alpha)

    def per_sample_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if self.alpha == 0.0:
            # The α → 0 limit of Eq. 5 is the exact gradient of KL(q‖p) (the clip is inactive: (p/q)^0 = 1).
            log_q, log_p = _log_probs(student_logits, teacher_logits)
            return kl_per_sample(log_q, log_p)
        logits = _upcast(student_logits)
        with torch.no_grad():
            log_q, log_p = _log_probs(logits, teacher_logits)
            value = alpha_divergence_per_sample(log_q, log_p, self.alpha)
            gradient = clipped_alpha_gradient(log_q, log_p, self.alpha, self.clip)
        return _ValueWithGradient.apply(logits, value, gradient)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, clip={self.clip}"


class AdaptiveAlphaDivergence(KDLoss):
    """Per sample, the larger of D_{α−} and D_{α+} (AlphaNet §3.3), each trained with clipped weights."""

    def __init__(self, alpha_minus: float = -1.0, alpha_plus: float = 1.0, clip: float | None = 5.0):
        super().__init__()
        if not alpha_minus < alpha_plus:
            raise ValueError(f"need alpha_minus < alpha_plus, got {alpha_minus} and {alpha_plus}")
        self.minus = AlphaDivergence(alpha_minus, clip)
        self.plus = AlphaDivergence(alpha_plus, clip)

    def divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return torch.maximum(
            self.minus.divergence(student_logits, teacher_logits), self.plus.divergence(student_logits, teacher_logits)
        )

    def per_sample_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        loss_minus = self.minus.per_sample_loss(student_logits, teacher_logits)
        loss_plus = self.plus.per_sample_loss(student_logits, teacher_logits)
        # The values of the training losses are the divergences, so the larger value picks the branch.
        return torch.where(loss_plus.detach() >= loss_minus.detach(), loss_plus, loss_minus)


class KLDivergence(KDLoss):
    """KL(p_T‖q_T) at temperature T; the training loss is scaled by T² (Hinton et al., 2015)."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_q, log_p = _log_probs(student_logits / self.temperature, teacher_logits / self.temperature)
        return kl_per_sample(log_p, log_q.detach())

    def per_sample_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_q, log_p = _log_probs(student_logits / self.temperature, teacher_logits / self.temperature)
        return kl_per_sample(log_p, log_q) * self.temperature**2


class ReverseKLDivergence(AlphaDivergence):
    """KL(q‖p): mode-seeking; the α → 0 limit of the alpha-divergence."""

    def __init__(self):
        super().__init__(alpha=0.0)


class SymmetricKLDivergence(KDLoss):
    """Jeffreys divergence KL(p‖q) + KL(q‖p)."""

    def divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_q, log_p = _log_probs(student_logits, teacher_logits)
        log_q = log_q.detach()
        return kl_per_sample(log_p, log_q) + kl_per_sample(log_q, log_p)

    def per_sample_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_q, log_p = _log_probs(student_logits, teacher_logits)
        return kl_per_sample(log_p, log_q) + kl_per_sample(log_q, log_p)
