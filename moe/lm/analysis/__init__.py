"""What a trained model does: expert load, the words each expert takes,
the training pictures, and n-gram baselines to compare with.
"""
