"""Self-distillation payloads (prompt, response, teacher top-k per response token) as ``distill`` datums."""

from __future__ import annotations

from skyrl_lora.errors import SkyrlError
from skyrl_lora.training.protocol import Datum, DistillPayload


def distill_datums(payload: DistillPayload, vocab: int) -> list[Datum]:
    """One datum per sample: the student reads prompt + response and is pulled towards the teacher on
    the response positions only (weight 0 on the prompt)."""
    k_max = payload.settings.teacher_top_k
    data: list[Datum] = []
    for i, s in enumerate(payload.samples):
        k = min(k_max, *(len(row) for row in s.teacher_topk_ids))
        full = s.prompt_token_ids + s.response_token_ids
        n_prompt = len(s.prompt_token_ids)
        n = len(full) - 1
        targets = full[1:]
        ids: list[list[int]] = []
        lps: list[list[float]] = []
        for pos in range(n):
            r = pos - (n_prompt - 1)
            if r >= 0:
                ids.append(s.teacher_topk_ids[r][:k])
                lps.append(s.teacher_topk_logprobs[r][:k])
            else:  # prompt position: a placeholder row, weighted out
                ids.append([targets[pos]] * k)
                lps.append([0.0] * k)
        if any(t < 0 or t >= vocab for t in full):
            raise SkyrlError(400, f"samples[{i}]: token ids outside the vocabulary [0, {vocab})", f"samples[{i}]")
        weights = [0.0] * (n_prompt - 1) + [1.0] * len(s.response_token_ids)
        data.append(Datum(model_input=full[:-1], loss_fn_inputs={
            "target_tokens": targets, "weights": weights, "teacher_topk_ids": ids, "teacher_topk_logprobs": lps}))
    return data
