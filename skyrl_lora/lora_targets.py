"""The modules a tenant's LoRA may adapt: one list for the trainer, the servers and the API.

vLLM serves LoRA on the projections (q/k/v packed as qkv_proj, gate/up as gate_up_proj) and on the
output layer: Tinker's ``train_unembed`` (the SDK's default) adds a LoRA on lm_head. vLLM's own lm_head
LoRA path mapped prompt-logprob rows to the wrong adapter (one index per request against one row per
prompt token; it crashed the CPU engine); ``vllm_compat`` gives those rows their request's adapter.
The servers are started with exactly these targets.
"""

from __future__ import annotations

ATTENTION_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES: tuple[str, ...] = ("lm_head",)
PROJECTION_MODULES: tuple[str, ...] = ATTENTION_MODULES + MLP_MODULES  # inside every decoder layer
SERVED_MODULES: tuple[str, ...] = PROJECTION_MODULES + UNEMBED_MODULES
