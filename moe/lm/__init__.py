"""Next-word prediction on top of the `moe` layers: train, save, serve.

One subpackage per role; imports run one way, text -> model -> bundle ->
analysis -> training / serving, and training and serving never import each
other:

- `text`: words <-> ids (`tokenizer`), text files -> token stream
  (`corpus`, `book_split`), token stream -> `tf.data` next-word examples
  (`examples`), and the built-in corpus (`default_corpus.txt`).
- `model`: the Keras models and their defaults (`architectures`),
  `metrics`, `quantize_model`, `upcycle`, the routed layers of a model
  (`routed_layers`) and which experts a query went to (`explain`).
- `bundle`: the `saved_model/` folder: its file names and errors
  (`layout`), writing it safely (`folder`), `save_load`.
- `analysis`: what a trained model does: `expert_load`, `expert_words`,
  the pictures (`plots`), n-gram `baselines`.
- `training`: the settings (`config`), from the flags to the run's
  settings (`resolve`), the optimiser `recipe`, `finetune`,
  `data_parallel`, the run's `datasets`, `train()` (`train`) and its
  `summary` line.
- `serving`: `NextWordPredictor` (`predictor`; its limits in
  `generation`), the HTTP server (`server`, `server_config`, `requests`,
  `batcher`) and the TF SavedModel `export`.

`errors` holds `UserError`, the base of every error a user can cause;
`cli` is what the two scripts, `model.py` and `serve.py`, share. `moe`
itself never imports `moe.lm`.

Example:
    from moe.lm import NextWordPredictor, TrainingConfig, train

    summary = train(TrainingConfig(epochs=5, output="saved_model"))
    NextWordPredictor.load("saved_model").predict_next("how are")

The names below are imported on first use, as in `moe`, so importing a
light module such as `moe.lm.training.config` does not load TensorFlow.
"""

from moe._lazy import exports

# Public name -> the module that defines it.
_PUBLIC = {
    "Bundle": "moe.lm.bundle.save_load",
    "BundleError": "moe.lm.errors",
    "ConfigError": "moe.lm.errors",
    "CorpusError": "moe.lm.errors",
    "ExportError": "moe.lm.errors",
    "NextWordPredictor": "moe.lm.serving.predictor",
    "ServerConfig": "moe.lm.serving.server_config",
    "Tokenizer": "moe.lm.text.tokenizer",
    "TrainingConfig": "moe.lm.training.config",
    "UserError": "moe.lm.errors",
    "create_app": "moe.lm.serving.server",
    "export_saved_model": "moe.lm.serving.export",
    "load_bundle": "moe.lm.bundle.save_load",
    "save_bundle": "moe.lm.bundle.save_load",
    "train": "moe.lm.training.train",
}

__all__ = sorted(_PUBLIC)


__getattr__, __dir__ = exports(__name__, _PUBLIC)
