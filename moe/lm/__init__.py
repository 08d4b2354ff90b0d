"""Next-word prediction on top of the `moe` layers: train, save, serve.

`tokenizer` (words <-> ids), `corpus` (text files -> token stream), `data`
(token stream -> tf.data examples), `architectures` (the Keras models and
their defaults), `training_config` (the settings and their checks),
`training` (`train()`), `cli` (what the two scripts share), `bundle`
(`saved_model/` I/O; its folder safety in `bundle_folder`, file names and
errors in `bundle_layout`), `predictor` (`NextWordPredictor`; its
generation limits in `generation`), `server` (HTTP; its parts
`server_config`, `server_requests`, `batcher`), `export` (TF SavedModel).
`model.py` and `serve.py` are command lines over these; `moe` itself never
imports `moe.lm`.

Example:
    from moe.lm import NextWordPredictor, TrainingConfig, train

    summary = train(TrainingConfig(epochs=5, output="saved_model"))
    NextWordPredictor.load("saved_model").predict_next("how are")

The names below are imported on first use, as in `moe`, so importing a
light module such as `moe.lm.training` does not load TensorFlow.
"""

from moe._lazy import exports

# Public name -> the module that defines it.
_PUBLIC = {
    "Bundle": "moe.lm.bundle",
    "BundleError": "moe.lm.bundle",
    "ConfigError": "moe.lm.training_config",
    "CorpusError": "moe.lm.corpus",
    "ExportError": "moe.lm.export",
    "NextWordPredictor": "moe.lm.predictor",
    "ServerConfig": "moe.lm.server_config",
    "Tokenizer": "moe.lm.tokenizer",
    "TrainingConfig": "moe.lm.training_config",
    "create_app": "moe.lm.server",
    "export_saved_model": "moe.lm.export",
    "load_bundle": "moe.lm.bundle",
    "save_bundle": "moe.lm.bundle",
    "train": "moe.lm.training",
}

__all__ = sorted(_PUBLIC)


__getattr__, __dir__ = exports(__name__, _PUBLIC)
