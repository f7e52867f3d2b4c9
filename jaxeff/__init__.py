"""jaxeff: efficient training and inference of transformer language models in JAX/Flax."""

__version__ = "0.1.0"
