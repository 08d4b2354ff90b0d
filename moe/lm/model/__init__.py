"""The next-word Keras models: builders and their defaults, metrics,
quantization, upcycling, and walking a model's routed layers.
"""
