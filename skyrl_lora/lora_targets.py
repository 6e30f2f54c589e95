"""The projections a tenant's LoRA may adapt: one list for the trainer, the servers and the API.

vLLM serves LoRA on these (q/k/v packed as qkv_proj, gate/up as gate_up_proj). The output layer is
left out on purpose: a LoRA on lm_head puts vLLM's logits processor on a path whose prompt-logprob
mapping was wrong (one adapter index per request against one row per prompt token; it crashed the
CPU engine), and the servers are started with exactly these targets.
"""

from __future__ import annotations

ATTENTION_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
SERVED_MODULES: tuple[str, ...] = ATTENTION_MODULES + MLP_MODULES
