"""Serving a bundle: the predictor and its generation limits, the HTTP
server (settings, requests, micro-batching), and the TF SavedModel
export.
"""
