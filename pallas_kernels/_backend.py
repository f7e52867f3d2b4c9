"""Backend choice shared by every op: "auto" picks the real kernel on GPU / TPU and the Pallas
interpreter on CPU."""

import jax


def resolve_backend(backend: str, allowed: tuple[str, ...]) -> str:
    if backend not in allowed:
        raise ValueError(f"backend: got {backend!r}, expected one of {allowed}")
    if backend == "auto":
        return {"gpu": "gpu", "tpu": "tpu"}.get(jax.default_backend(), "interpret")
    return backend
