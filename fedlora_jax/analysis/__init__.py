"""Analyses of trained adapters (the FedLoRA-Optimizer sensitivity study)."""
