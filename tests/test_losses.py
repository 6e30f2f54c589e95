"""Each Tinker loss, loss value and gradient, against a plain per-token reference written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from skyrl_lora.errors import SkyrlError
from skyrl_lora.training.losses import LOSSES, LossInputs, resolve, token_logprobs

N, V, K = 7, 13, 4


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (N,), generator=g)
    sampler = torch.log_softmax(logits + 0.3 * torch.randn(N, V, generator=g, dtype=torch.float64), -1)
    inputs = {
        "logprobs": sampler.gather(1, targets[:, None])[:, 0],
        "advantages": torch.randn(N, generator=g, dtype=torch.float64),
        "weights": torch.tensor([0, 0, 1, 1, 1, 0.5, 1], dtype=torch.float64),
        "sequence_ratio_mask": torch.tensor([0, 1, 1, 1, 1, 1, 0], dtype=torch.float64),
        "teacher_topk_ids": torch.randint(0, V, (N, K), generator=g),
        "teacher_topk_logprobs": torch.log_softmax(torch.randn(N, K, generator=g, dtype=torch.float64), -1) - 0.2,
    }
    return logits, targets, inputs


def _ref_loss(name: str, logits: torch.Tensor, targets: torch.Tensor, inp: dict, cfg: dict) -> torch.Tensor:
    """Token by token, with scalars: deliberately not vectorised like the implementation."""
    total = logits.new_zeros(())
    logp_rows = [row - torch.logsumexp(row, 0) for row in logits]
    lp = [logp_rows[t][targets[t]] for t in range(N)]
    q = [inp["logprobs"][t] for t in range(N)]
    a = [inp["advantages"][t] for t in range(N)]
    lo, hi = cfg.get("clip_low_threshold"), cfg.get("clip_high_threshold")
    if name == "cross_entropy":
        for t in range(N):
            total = total - lp[t] * inp["weights"][t]
    elif name == "importance_sampling":
        for t in range(N):
            total = total - torch.exp(lp[t] - q[t]) * a[t]
    elif name == "ppo":
        for t in range(N):
            r = torch.exp(lp[t] - q[t])
            total = total - torch.minimum(r * a[t], torch.clamp(r, lo, hi) * a[t])
    elif name == "cispo":
        for t in range(N):
            r = torch.exp(lp[t] - q[t]).detach()
            total = total - min(max(float(r), lo), hi) * lp[t] * a[t]
    elif name == "dro":
        for t in range(N):
            total = total - (lp[t] * a[t] - 0.5 * cfg["beta"] * (lp[t] - q[t]) ** 2)
    elif name == "gspo":
        marked = [t for t in range(N) if inp["sequence_ratio_mask"][t] != 0]
        s = math.exp(sum(float(lp[t].detach()) - float(q[t]) for t in marked) / len(marked))
        for t in range(N):
            r = s * torch.exp(lp[t] - lp[t].detach())  # value s, gradient of this token's logprob
            total = total - torch.minimum(r * a[t], torch.clamp(r, lo, hi) * a[t])
    elif name == "stable_reinforce":
        for t in range(N):
            r = float(torch.exp(lp[t] - q[t]).detach())
            if lo <= r <= hi:
                total = total - r * lp[t] * a[t]
            d = q[t] - lp[t]
            total = total + cfg["kl_coeff"] * (torch.exp(d) - d - 1)
    elif name == "distill":
        for t in range(N):
            tl = inp["teacher_topk_logprobs"][t]
            tl = tl - torch.logsumexp(tl, 0)
            kl = sum(torch.exp(tl[j]) * (tl[j] - logp_rows[t][inp["teacher_topk_ids"][t, j]]) for j in range(K))
            if float(kl.detach()) > cfg["clip"]:
                kl = kl * (cfg["clip"] / float(kl.detach()))  # scaled down, direction kept
            total = total + inp["weights"][t] * (cfg["kl_weight"] * kl - cfg["ce_weight"] * lp[t])
    else:
        raise AssertionError(name)
    return total


CONFIGS = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1},
    "cispo": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05},
    "dro": {"beta": 0.3},
    "gspo": {"clip_low_threshold": 0.95, "clip_high_threshold": 1.02},
    "stable_reinforce": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.3, "kl_coeff": 0.1},
    "distill": {"kl_weight": 0.7, "ce_weight": 0.2, "clip": 1.5},
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_gradient_match_reference(name: str, seed: int) -> None:
    spec, cfg = resolve(name, CONFIGS[name])
    logits, targets, inp = _case(seed)
    keys = set(spec.required) | set(spec.optional)
    ours_logits = logits.clone().requires_grad_(True)
    lp = token_logprobs(ours_logits, targets)
    result = spec.fn(LossInputs(lp, {k: v for k, v in inp.items() if k in keys}, cfg,
                                ours_logits if spec.needs_logits else None))
    result.loss.backward()
    ref_logits = logits.clone().requires_grad_(True)
    ref = _ref_loss(name, ref_logits, targets, inp, cfg)
    ref.backward()
    assert float(ref.detach()) != 0.0
    torch.testing.assert_close(result.loss.detach(), ref.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ours_logits.grad, ref_logits.grad, rtol=1e-9, atol=1e-9)
    assert ours_logits.grad.abs().sum() > 0


def test_clipping_actually_clips() -> None:
    """A ratio far outside the band: PPO's gradient is zero for that token, importance sampling's is not."""
    logits, targets, inp = _case(3)
    inp = dict(inp, logprobs=token_logprobs(logits, targets) - 1.0, advantages=torch.ones(N, dtype=torch.float64))
    grads = {}
    for name in ("ppo", "importance_sampling"):
        spec, cfg = resolve(name, {})
        x = logits.clone().requires_grad_(True)
        spec.fn(LossInputs(token_logprobs(x, targets), inp, cfg)).loss.backward()
        grads[name] = x.grad
    assert grads["ppo"].abs().sum() == 0
    assert grads["importance_sampling"].abs().sum() > 0


@pytest.mark.parametrize(("loss", "config", "field"), [
    ("nope", {}, "loss_fn"),
    ("ppo", {"beta": 1.0}, "loss_fn_config"),
    ("ppo", {"clip_low_threshold": 1.5, "clip_high_threshold": 1.2}, "loss_fn_config"),
])
def test_bad_loss_requests_name_the_field(loss: str, config: dict, field: str) -> None:
    with pytest.raises(SkyrlError) as err:
        resolve(loss, config)
    assert err.value.status == 400 and err.value.field == field
