"""What a bundle folder holds: its files' names and limits.

Shared by `save_load` (what each file holds: save, load, validation) and
`folder` (how a folder is written safely).
"""

MODEL_FILE = "model.keras"
TOKENIZER_FILE = "tokenizer.json"
MAX_SEQ_LEN_FILE = "max_seq_len.txt"
TRAINING_FILE = "training.json"
TRAINING_FIGURE = "training.png"
EXPERTS_FIGURE = "experts.png"
EXPERT_WORDS_FIGURE = "expert_words.png"
FIGURES = (TRAINING_FIGURE, EXPERTS_FIGURE, EXPERT_WORDS_FIGURE)
# What serving needs; training.json and the pictures are for people.
REQUIRED_FILES = (MODEL_FILE, TOKENIZER_FILE, MAX_SEQ_LEN_FILE)
OPTIONAL_FILES = (TRAINING_FILE, *FIGURES)
BUNDLE_FILES = REQUIRED_FILES + OPTIONAL_FILES
# Files of the user's that a bundle folder may also hold: never written by a
# save, carried over into the new bundle by each one.
KEPT_FILES = ("README.md",)
# The longest context a model takes, in words (what `MAX_SEQ_LEN_FILE` may
# say). The Transformer's attention grows with its square, and a window
# dataset's epoch cuts windows at every offset below it.
MAX_SEQ_LEN = 1024
# How long a load waits for a bundle another process is swapping in.
SWAP_WAIT_S = 5.0
