"""Bayesian core: KFAC Laplace posteriors of the CLIP projections, similarity moments,
the refit linear head and acquisition scores. Tensors in, tensors out."""
