"""Training of the Gaussian head avatar (densification strategy, optimisation loop)."""
