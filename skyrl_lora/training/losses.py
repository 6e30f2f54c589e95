"""Tinker's built-in losses, by name, on per-token log-probabilities of the target tokens.

Each loss sees one datum at a time and returns the *sum* over its tokens (Tinker reports ``loss:sum``).
Definitions follow Tinker's loss documentation; where it leaves something open (defaults of the
thresholds, ``stable_reinforce``, whose server-side formula is not published, and our own ``distill``)
the choice is written next to the code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from skyrl_lora.errors import SkyrlError


@dataclass(frozen=True)
class LossInputs:
    target_logprobs: Tensor  # (N,), differentiable
    inputs: Mapping[str, Tensor]  # loss_fn_inputs of this datum, on the model's device
    config: Mapping[str, float]
    logits: Tensor | None = None  # (N, V), only for losses that need the whole distribution


@dataclass(frozen=True)
class LossResult:
    loss: Tensor  # scalar, sum over tokens
    outputs: dict[str, Tensor] = field(default_factory=dict)  # extra per-token outputs
    metrics: dict[str, Tensor] = field(default_factory=dict)  # "name:reduction" -> scalar


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[[LossInputs], LossResult]
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    config_defaults: Mapping[str, float] = field(default_factory=dict)
    needs_logits: bool = False
    two_d: tuple[str, ...] = ()  # inputs with one row of k values per token


def _ratio(x: LossInputs) -> Tensor:
    return torch.exp(x.target_logprobs - x.inputs["logprobs"])


def _clip_bounds(x: LossInputs) -> tuple[float, float]:
    return float(x.config["clip_low_threshold"]), float(x.config["clip_high_threshold"])


def cross_entropy(x: LossInputs) -> LossResult:
    weights = x.inputs.get("weights")
    w = torch.ones_like(x.target_logprobs) if weights is None else weights
    elementwise = -x.target_logprobs * w
    return LossResult(elementwise.sum(), outputs={"elementwise_loss": elementwise.detach()})


def importance_sampling(x: LossInputs) -> LossResult:
    return LossResult(-(_ratio(x) * x.inputs["advantages"]).sum())


def ppo(x: LossInputs) -> LossResult:
    lo, hi = _clip_bounds(x)
    ratio = _ratio(x)
    adv = x.inputs["advantages"]
    objective = torch.minimum(ratio * adv, ratio.clamp(lo, hi) * adv)
    clipped = ((ratio < lo) | (ratio > hi)).float().sum()
    return LossResult(-objective.sum(), metrics={"clipped_tokens:sum": clipped})


def cispo(x: LossInputs) -> LossResult:
    lo, hi = _clip_bounds(x)
    ratio = _ratio(x)
    weight = ratio.clamp(lo, hi).detach()
    clipped = ((ratio < lo) | (ratio > hi)).float().sum()
    return LossResult(-(weight * x.target_logprobs * x.inputs["advantages"]).sum(),
                      metrics={"clipped_tokens:sum": clipped.detach()})


def dro(x: LossInputs) -> LossResult:
    beta = float(x.config["beta"])
    quadratic = (x.target_logprobs - x.inputs["logprobs"]) ** 2
    return LossResult(-(x.target_logprobs * x.inputs["advantages"] - 0.5 * beta * quadratic).sum())


def gspo(x: LossInputs) -> LossResult:
    """GSPO-token: every token carries the sequence ratio's value and its own log-probability's gradient."""
    lo, hi = _clip_bounds(x)
    lp = x.target_logprobs
    mask = x.inputs.get("sequence_ratio_mask")
    in_ratio = torch.ones_like(lp, dtype=torch.bool) if mask is None else mask != 0
    if not bool(in_ratio.any()):
        raise SkyrlError(400, "loss_fn_inputs.sequence_ratio_mask marks no token", "loss_fn_inputs.sequence_ratio_mask")
    log_ratio = (lp.detach() - x.inputs["logprobs"])[in_ratio].mean()
    ratio = torch.exp(log_ratio + lp - lp.detach())
    adv = x.inputs["advantages"]
    objective = torch.minimum(ratio * adv, ratio.clamp(lo, hi) * adv)
    return LossResult(-objective.sum(), metrics={"sequence_ratio:mean": torch.exp(log_ratio).detach()})


def stable_reinforce(x: LossInputs) -> LossResult:
    """Off-policy-robust REINFORCE, our reading (Tinker's own formula is not published).

    The importance weight is taken out of the gradient and tokens whose ratio left
    [clip_low_threshold, clip_high_threshold] are masked out entirely (they carry sampler/learner
    mismatch, not signal); ``kl_coeff`` adds the k3 estimate of KL(learner || sampler).
    """
    lo, hi = _clip_bounds(x)
    lp = x.target_logprobs
    log_ratio = lp - x.inputs["logprobs"]
    ratio = torch.exp(log_ratio).detach()
    keep = ((ratio >= lo) & (ratio <= hi)).to(lp.dtype)
    pg = -(keep * ratio * lp * x.inputs["advantages"]).sum()
    kl = (torch.exp(-log_ratio) + log_ratio - 1.0).sum()
    loss = pg + float(x.config["kl_coeff"]) * kl
    return LossResult(loss, metrics={"masked_tokens:sum": (1.0 - keep).sum().detach(), "kl:sum": kl.detach()})


def distill(x: LossInputs) -> LossResult:
    """Forward KL from the teacher's top-k (renormalised over those k) to the student, per token.

    A token whose KL exceeds ``clip`` is scaled down to ``clip`` *with* its gradient direction kept (a
    hard clamp would zero exactly the gradients of the tokens furthest from the teacher). Tokens are
    weighted by ``weights`` (0 on the prompt); ``ce_weight`` optionally adds cross-entropy on the targets.
    """
    assert x.logits is not None
    student = torch.log_softmax(_upcast(x.logits), dim=-1).gather(-1, x.inputs["teacher_topk_ids"].long())
    teacher = x.inputs["teacher_topk_logprobs"]
    teacher = teacher - torch.logsumexp(teacher, dim=-1, keepdim=True)
    kl = (teacher.exp() * (teacher - student)).sum(-1)
    scale = torch.clamp(float(x.config["clip"]) / kl.detach().clamp(min=1e-12), max=1.0)
    weights = x.inputs.get("weights")
    w = torch.ones_like(kl) if weights is None else weights
    per_token = w * (float(x.config["kl_weight"]) * kl * scale - float(x.config["ce_weight"]) * x.target_logprobs)
    return LossResult(per_token.sum(), outputs={"kl": kl.detach()}, metrics={"kl:sum": (w * kl).sum().detach()})


_CLIP = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
_RL = ("logprobs", "advantages")

LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(cross_entropy, required=(), optional=("weights",)),
    "importance_sampling": LossSpec(importance_sampling, required=_RL),
    "ppo": LossSpec(ppo, required=_RL, config_defaults=_CLIP),
    "cispo": LossSpec(cispo, required=_RL, config_defaults=_CLIP),
    "dro": LossSpec(dro, required=_RL, config_defaults={"beta": 0.05}),
    # GSPO's ratio is a per-sequence geometric mean: the paper's thresholds are ~1e-3 wide.
    "gspo": LossSpec(gspo, required=_RL, optional=("sequence_ratio_mask",),
                     config_defaults={"clip_low_threshold": 1 - 3e-4, "clip_high_threshold": 1 + 4e-4}),
    "stable_reinforce": LossSpec(stable_reinforce, required=_RL,
                                 config_defaults={"clip_low_threshold": 0.5, "clip_high_threshold": 2.0, "kl_coeff": 0.0}),
    "distill": LossSpec(distill, required=("teacher_topk_ids", "teacher_topk_logprobs"), optional=("weights",),
                        config_defaults={"kl_weight": 1.0, "ce_weight": 0.0, "clip": float("inf")},
                        needs_logits=True, two_d=("teacher_topk_ids", "teacher_topk_logprobs")),
}


def resolve(loss_fn: str, config: Mapping[str, float]) -> tuple[LossSpec, dict[str, float]]:
    """The loss and its full config; unknown names and config keys are refused, naming the field."""
    spec = LOSSES.get(loss_fn)
    if spec is None:
        raise SkyrlError(400, f"loss_fn: unknown loss '{loss_fn}'; known: {sorted(LOSSES)}", "loss_fn")
    unknown = set(config) - set(spec.config_defaults)
    if unknown:
        raise SkyrlError(400, f"loss_fn_config: {sorted(unknown)} not used by '{loss_fn}' "
                              f"(accepted: {sorted(spec.config_defaults)})", "loss_fn_config")
    merged = {**spec.config_defaults, **{k: float(v) for k, v in config.items()}}
    if "clip_low_threshold" in merged and not merged["clip_low_threshold"] <= merged["clip_high_threshold"]:
        raise SkyrlError(400, "loss_fn_config: clip_low_threshold must not exceed clip_high_threshold", "loss_fn_config")
    return spec, merged


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) per position without materialising the whole log-softmax."""
    return -F.cross_entropy(_upcast(logits), targets.long(), reduction="none")


def _upcast(x: Tensor) -> Tensor:
    """Losses are computed in at least fp32 (bf16 logits lose the small differences RL ratios need)."""
    return x if x.dtype == torch.float64 else x.float()
