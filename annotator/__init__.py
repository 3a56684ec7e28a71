"""annotator: active-learning image labelling ranked by BayesVLM epistemic uncertainty."""

__version__ = "0.1.0"
