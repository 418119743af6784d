"""fedlora-jax: federated LoRA fine-tuning of LLaMA-family models under non-IID data."""

__version__ = "0.1.0"
