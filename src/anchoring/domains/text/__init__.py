"""Text domain: corpora, splits, tokenizers and weak concept labels for language-model experiments.

No model code lives here, and no torch: everything is plain Python and numpy so the data side
can be built, cached and tested without touching a network.
"""
