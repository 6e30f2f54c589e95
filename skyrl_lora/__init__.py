"""skyrl_lora: multi-tenant LoRA RL on one shared base model, where a weight sync pauses only its tenant."""

__version__ = "0.1.0"
