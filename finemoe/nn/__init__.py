"""Torch modules: the fine-grained MoE layer and the Transformer around it (no CLI code here)."""
