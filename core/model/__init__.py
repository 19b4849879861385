"""MoE model code: one file per family on shared layers, loaded from Hugging Face checkpoints."""
