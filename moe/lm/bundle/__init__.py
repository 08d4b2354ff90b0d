"""The saved model folder (`saved_model/`): its files, writing it safely,
saving and loading it.
"""
