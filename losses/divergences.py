"""Knowledge-distillation divergences between a teacher p = softmax(t) and a student q = softmax(s).

Every loss has two faces:

* ``forward(student_logits, teacher_logits)`` → the batch-mean *training* loss.  Its value is the
  divergence itself and its gradient with respect to the student logits is the one the method
  prescribes (for the clipped alpha-divergence, the paper's Eq. 5).  The teacher never gets a gradient.
* ``divergence(student_logits, teacher_logits)`` → the per-sample divergence value, for logging.

All arithmetic runs in at least float32 (bf16/fp16 inputs are upcast) and in log space: a probability that
underflows to zero gives a zero term, never NaN or inf.

Each loss is registered in :data:`losses.registry.KD_LOSSES` under the name ``loss.kd_loss`` takes, and builds
itself from the ``loss:`` section with ``from_config``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from losses.config import AdaptiveChoice, LossConfig
from losses.registry import KD_LOSSES

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


def clipped_alpha_divergence_per_sample(
    log_q: torch.Tensor, log_p: torch.Tensor, alpha: float, clip: float | None
) -> torch.Tensor:
    """The per-sample value the reference implementation computes with clipped ratios r = p/q.

    α ∉ {0, 1}: Σ q (min(r^α, β) − 1)/(α(α−1)); α = 0: Σ q (−log min(r, β)); α = 1: KL(p‖q), never
    clipped.  Without a clip this is the exact divergence.  Unlike the divergence it can be negative
    (clipping removes mass), which is what the reference compares when adaptive KD picks a branch.
    """
    if clip is None or alpha == 1.0:
        return alpha_divergence_per_sample(log_q, log_p, alpha)
    log_clip = math.log(clip)
    if alpha == 0.0:
        return (log_q.exp() * (log_q - log_p).clamp(min=-log_clip)).sum(dim=1)
    # Σ q (min(r^α, β) − 1) summed term by term: bounded by β, and exactly 0 where p = q.
    return (log_q.exp() * torch.expm1((alpha * (log_p - log_q)).clamp(max=log_clip))).sum(dim=1) / (
        alpha * (alpha - 1.0)
    )


def alpha_gradient(log_q: torch.Tensor, log_p: torch.Tensor, alpha: float, clip: float | None) -> torch.Tensor:
    """Per-sample gradient w.r.t. the student logits of the training rule of D_α with clip β.

    Every case has the form −Σ_i c_i ∇_s log q_i = −(c − q Σc), since ∇_s log q_i = e_i − q:
    * α ∉ {0, 1}: c = q·min((p/q)^α, β)/α, the paper's Eq. 5;
    * α = 1: c = p, the plain KL(p‖q) gradient q − p (the reference never clips here);
    * α = 0: c = q·log min(p/q, β), the KL(q‖p) gradient with the ratio clipped at β.
    Importance weights are computed in log space and capped so that the sum stays finite in float32
    (an unclipped weight beyond that range saturates instead of becoming inf).
    """
    if alpha == 1.0:
        c = log_p.exp()
    elif alpha == 0.0:
        log_ratio = log_p - log_q
        if clip is not None:
            log_ratio = log_ratio.clamp(max=math.log(clip))
        c = log_q.exp() * log_ratio
    else:
        log_ratio = alpha * (log_p - log_q)
        if clip is not None:
            log_ratio = log_ratio.clamp(max=math.log(clip))
        cap = _safe_exp_cap(log_q.shape[1]) - max(0.0, math.log(1.0 / abs(alpha)))
        c = (log_q + log_ratio).clamp(max=cap).exp() / alpha
    return -(c - log_q.exp() * c.sum(dim=1, keepdim=True))


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
    """Base class: subclasses implement ``per_sample_loss`` (training) and ``divergence`` (logging), and
    ``from_config`` when they take parameters from the ``loss:`` section."""

    @classmethod
    def from_config(cls, config: LossConfig) -> KDLoss:
        """The loss with its parameters from the ``loss:`` section (none by default)."""
        return cls()

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


@KD_LOSSES.register("alpha")
class AlphaDivergence(KDLoss):
    """D_α(p‖q) trained with clipped importance weights min((p/q)^α, β) when ``clip`` = β is set.

    The training loss's value is the exact divergence; its gradient is :func:`alpha_gradient` (Eq. 5,
    with the reference's rules at α = 1 and α = 0).  :meth:`clipped_divergence` is the value the
    reference computes with clipped ratios (what its adaptive KD compares).
    """

    def __init__(self, alpha: float, clip: float | None = None):
        super().__init__()
        if clip is not None and clip <= 0:
            raise ValueError(f"clip must be positive, got {clip}")
        self.alpha = float(alpha)
        self.clip = clip

    @classmethod
    def from_config(cls, config: LossConfig) -> AlphaDivergence:
        return cls(config.alpha, config.clip)

    def divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_q, log_p = _log_probs(student_logits, teacher_logits)
        return alpha_divergence_per_sample(log_q.detach(), log_p, self.alpha)

    def clipped_divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_q, log_p = _log_probs(student_logits, teacher_logits)
        return clipped_alpha_divergence_per_sample(log_q.detach(), log_p, self.alpha, self.clip)

    def value_and_gradient(self, log_q: torch.Tensor, log_p: torch.Tensor, *, clipped_value: bool = False):
        """(per-sample value, per-sample logit gradient) from detached log-probabilities."""
        if clipped_value:
            value = clipped_alpha_divergence_per_sample(log_q, log_p, self.alpha, self.clip)
        else:
            value = alpha_divergence_per_sample(log_q, log_p, self.alpha)
        return value, alpha_gradient(log_q, log_p, self.alpha, self.clip)

    def per_sample_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        logits = _upcast(student_logits)
        with torch.no_grad():
            value, gradient = self.value_and_gradient(*_log_probs(logits, teacher_logits))
        return _ValueWithGradient.apply(logits, value, gradient)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, clip={self.clip}"


@KD_LOSSES.register("adaptive_alpha")
class AdaptiveAlphaDivergence(KDLoss):
    """Per sample, the α− or the α+ branch, whichever value is larger (AlphaNet §3.3).

    ``choice="reference"`` compares what the reference implementation (``AdaptiveLossSoft``, which
    produced the paper's numbers) compares: the *clipped* value of each branch
    (:func:`clipped_alpha_divergence_per_sample`).  ``choice="exact"`` compares the exact divergences.
    α− is taken only when its value is strictly larger; ties go to α+.  The chosen branch trains with
    its :func:`alpha_gradient`; the loss's value (and :meth:`divergence`, for logging) is the value
    that drove the choice.
    """

    def __init__(
        self,
        alpha_minus: float = -1.0,
        alpha_plus: float = 1.0,
        clip: float | None = 5.0,
        choice: AdaptiveChoice = "reference",
    ):
        super().__init__()
        if not alpha_minus < alpha_plus:
            raise ValueError(f"need alpha_minus < alpha_plus, got {alpha_minus} and {alpha_plus}")
        if choice not in ("reference", "exact"):
            raise ValueError(f"choice must be 'reference' or 'exact', got {choice!r}")
        self.minus = AlphaDivergence(alpha_minus, clip)
        self.plus = AlphaDivergence(alpha_plus, clip)
        self.choice = choice

    @classmethod
    def from_config(cls, config: LossConfig) -> AdaptiveAlphaDivergence:
        return cls(config.alpha_minus, config.alpha_plus, config.clip, config.adaptive_choice)

    def _branches(self, log_q: torch.Tensor, log_p: torch.Tensor):
        """(picks α− per sample, chosen value, chosen gradient)."""
        clipped = self.choice == "reference"
        value_minus, grad_minus = self.minus.value_and_gradient(log_q, log_p, clipped_value=clipped)
        value_plus, grad_plus = self.plus.value_and_gradient(log_q, log_p, clipped_value=clipped)
        minus = value_minus > value_plus
        return minus, torch.where(minus, value_minus, value_plus), torch.where(minus[:, None], grad_minus, grad_plus)

    def picks_minus(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Boolean per sample: True where the α− branch is chosen."""
        log_q, log_p = _log_probs(student_logits.detach(), teacher_logits)
        return self._branches(log_q, log_p)[0]

    def divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_q, log_p = _log_probs(student_logits.detach(), teacher_logits)
        return self._branches(log_q, log_p)[1]

    def per_sample_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        logits = _upcast(student_logits)
        with torch.no_grad():
            _, value, gradient = self._branches(*_log_probs(logits, teacher_logits))
        return _ValueWithGradient.apply(logits, value, gradient)

    def extra_repr(self) -> str:
        return (
            f"alpha_minus={self.minus.alpha}, alpha_plus={self.plus.alpha}, clip={self.plus.clip}, choice={self.choice}"
        )


@KD_LOSSES.register("kl")
class KLDivergence(KDLoss):
    """KL(p_T‖q_T) at temperature T; the training loss is scaled by T² (Hinton et al., 2015)."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    @classmethod
    def from_config(cls, config: LossConfig) -> KLDivergence:
        return cls(config.temperature)

    def divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_q, log_p = _log_probs(student_logits / self.temperature, teacher_logits / self.temperature)
        return kl_per_sample(log_p, log_q.detach())

    def per_sample_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_q, log_p = _log_probs(student_logits / self.temperature, teacher_logits / self.temperature)
        return kl_per_sample(log_p, log_q) * self.temperature**2


@KD_LOSSES.register("reverse_kl")
class ReverseKLDivergence(AlphaDivergence):
    """KL(q‖p): mode-seeking; the α → 0 limit of the alpha-divergence (never clipped)."""

    def __init__(self):
        super().__init__(alpha=0.0)

    @classmethod
    def from_config(cls, config: LossConfig) -> ReverseKLDivergence:
        return cls()  # not AlphaDivergence's: neither loss.alpha nor loss.clip applies


@KD_LOSSES.register("symmetric_kl")
class SymmetricKLDivergence(KDLoss):
    """Jeffreys divergence KL(p‖q) + KL(q‖p)."""

    def divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_q, log_p = _log_probs(student_logits, teacher_logits)
        log_q = log_q.detach()
        return kl_per_sample(log_p, log_q) + kl_per_sample(log_q, log_p)

    def per_sample_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        log_q, log_p = _log_probs(student_logits, teacher_logits)
        return kl_per_sample(log_p, log_q) + kl_per_sample(log_q, log_p)
