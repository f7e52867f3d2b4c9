"""Decoding beyond one token per target pass: speculative decoding with a draft model
(:mod:`jaxeff.decode.speculative`; the ``jaxeff speculate`` verb in :mod:`jaxeff.decode.cli`).
No jax import here: the CLI imports this package for every command."""
