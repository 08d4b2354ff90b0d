"""Text -> tokens -> examples: the tokenizer, reading corpora, the book
split, the `tf.data` next-word examples, and the built-in corpus.
"""
