"""reptile_gen: gradient-based meta-learning (MAML, first-order MAML, Reptile) as a
generative sequence model, on Hydra and PyTorch Lightning."""

__version__ = "0.1.0"
