"""Training a next-word model: the settings and their checks, resolving
them, the optimiser recipe, fine-tuning, data parallelism, `train()`.
"""
