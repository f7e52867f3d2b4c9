"""Pallas kernels for jaxeff, importable on their own (they depend on jax only).

One folder per op: ``api.py`` (public function + backend dispatch), ``reference.py`` (pure jnp,
same signature), one file per backend and its backward.
"""
