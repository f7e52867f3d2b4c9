"""The sharded trainer: pure jitted steps, a loop with logging and checkpoints, and the method interface."""

from jaxeff.train.losses import cross_entropy
from jaxeff.train.methods import Method, make_method, register_method

__all__ = ["Method", "cross_entropy", "make_method", "register_method"]
