"""Next-word prediction on top of the `moe` layers.

`tokenizer` (words <-> ids), `corpus` (text files -> token stream), `data`
(token stream -> tf.data contexts), `architectures` (the Keras model),
`bundle` (saved_model/ I/O) and `predictor` (`NextWordPredictor`). Used by
`model.py` (train) and `serve.py` (predict); never imported by `moe` itself.
"""
