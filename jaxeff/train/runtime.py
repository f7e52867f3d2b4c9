"""The runtime of a run: config -> mesh, model, method, optimizer, shardings and jitted steps.

``Trainer`` holds what does not change from step to step; ``jaxeff.train.loop.run_training`` drives
it. Tools that only need a run's model (eval, generate, export) use ``load_params`` (or build a
``Trainer(cfg, purpose="load")``): its method then reads no training-only input (a teacher).

The trainer works out the model's abstract parameters, logical axes and base shardings once and
hands them to the method's factory in a :class:`jaxeff.train.methods.MethodContext`, whose
``base_params()`` (``train.init_from``, else the seeded init) is read at most once per trainer:
shared by the factory (QLoRA's base) and the fresh train state (``init_state``).
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxeff.data.loader import eval_batches, process_slice
from jaxeff.data.packing import PACKED_KEYS
from jaxeff.errors import ConfigError
from jaxeff.models import Transformer, init_params, logical_axes
from jaxeff.train import sharding as shd
from jaxeff.train.checkpoint import Checkpointer, abstract_with_shardings, check_same_model
from jaxeff.train.methods import MethodContext, make_method
from jaxeff.train.optim import make_optimizer, make_schedule
from jaxeff.train.step import TrainState, init_state, make_eval_step, make_train_step

if TYPE_CHECKING:  # the schema is built from the method registry on first use
    from jaxeff.config import ExperimentConfig

# dense bf16 peak FLOP/s per device, by jax device_kind (for MFU)
PEAK_FLOPS = {
    "NVIDIA H200": 989e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def peak_flops_per_device(cfg: ExperimentConfig) -> float | None:
    if cfg.train.peak_flops:
        return cfg.train.peak_flops
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


class Trainer:
    """Everything about a run that does not change from step to step."""

    def __init__(self, cfg: ExperimentConfig, *, devices=None, purpose: str = "train"):
        self.cfg = cfg
        self.mesh = shd.build_mesh(cfg.mesh, devices)
        self.rules = cfg.mesh.rules
        div = shd.batch_divisor(self.mesh, self.rules)
        if cfg.data.batch_size % div:
            raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is not divisible by the {div} batch shards of the mesh")
        per_micro = cfg.data.batch_size // cfg.optim.grad_accum
        if cfg.optim.grad_accum > 1 and per_micro % div:
            raise ConfigError(f"optim.grad_accum: micro-batches of {per_micro} rows do not split over {div} batch shards")
        self.model = Transformer(cfg.model)
        seq = cfg.data.seq_len
        key = jax.random.PRNGKey(cfg.seed)
        self.base_abstract = jax.eval_shape(lambda: init_params(self.model, key, (1, seq)))
        model_axes = logical_axes(self.model, (1, seq))
        self.base_shardings = shd.param_shardings(model_axes, self.base_abstract, self.mesh, self.rules)
        self.context = MethodContext(cfg, self.model, self.base_abstract, model_axes, purpose, read_base=self._read_base)
        try:
            self.method = make_method(self.context)
        except KeyError as e:
            raise ConfigError(str(e.args[0])) from None
        abstract_params = jax.eval_shape(self.method.prepare_params, self.base_abstract, key)
        trainable = self.method.trainable(abstract_params)
        make_tx = self.method.optimizer or make_optimizer
        self.tx = make_tx(cfg.optim, cfg.train.steps, trainable)
        self.schedule = self.method.schedule or make_schedule(cfg.optim, cfg.train.steps)  # what train/lr logs
        self.param_shardings = shd.param_shardings(self.method.logical_axes(model_axes), abstract_params, self.mesh, self.rules)
        abstract_state = jax.eval_shape(self._init_fn, self.base_abstract)
        self.state_shardings = shd.shardings_like_params(abstract_state, abstract_params, self.param_shardings, self.mesh)
        self.state_shardings = self.state_shardings.replace(params=self.param_shardings)
        self.abstract_state = abstract_with_shardings(abstract_state, self.state_shardings)
        self.batch_sharding = shd.batch_sharding(self.mesh, self.rules)
        replicated = NamedSharding(self.mesh, P())
        frozen = self.method.frozen if self.context.training else None  # a trainer that only reads a run needs none
        if callable(frozen):
            frozen = frozen()
        if frozen is None:
            self.frozen, frozen_shardings = None, None
        else:
            if self.method.frozen_logical_axes is not None:
                frozen_shardings = shd.param_shardings(self.method.frozen_logical_axes, frozen, self.mesh, self.rules)
            else:
                frozen_shardings = jax.tree.map(lambda _: replicated, frozen)
            self.frozen = jax.device_put(frozen, frozen_shardings)
        step_fn = make_train_step(
            self.method,
            self.tx,
            cfg.optim.grad_accum,
            nonfinite=cfg.train.nonfinite,
            max_skips=cfg.train.max_skips,
            inject_nan_at=cfg.train.inject_nan_at_step,
        )
        self._train_step = jax.jit(
            step_fn,
            in_shardings=(self.state_shardings, self.batch_sharding, frozen_shardings),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,),
        )
        self._eval_step = jax.jit(
            make_eval_step(self.model, self.method), in_shardings=(self.param_shardings, self.batch_sharding), out_shardings=(replicated, replicated)
        )
        self.n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))
        self.n_trainable = sum(int(np.prod(x.shape)) for x, t in zip(jax.tree.leaves(abstract_params), jax.tree.leaves(trainable)) if t)
        # optimizer state bytes (frozen leaves have none); trainable share of the model's parameters
        self.opt_state_bytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_state.opt_state))
        self.trainable_pct = 100.0 * self.n_trainable / cfg.model.param_count()

    def _init_fn(self, base_params=None):
        key = jax.random.PRNGKey(self.cfg.seed)
        if base_params is None:
            base_params = init_params(self.model, key, (1, self.cfg.data.seq_len))
        params = self.method.prepare_params(base_params, jax.random.fold_in(key, 1))
        return init_state(params, self.tx, self.method, self.cfg.seed)

    @contextlib.contextmanager
    def _context(self):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def init_state(self, base_params=None) -> TrainState:
        """A fresh train state; ``base_params`` (model parameters, e.g. from ``train.init_from``)
        replace the random initialisation."""
        with self._context():
            if base_params is None:
                return jax.jit(self._init_fn, out_shardings=self.state_shardings)()
            return jax.jit(self._init_fn, in_shardings=(self.base_shardings,), out_shardings=self.state_shardings)(base_params)

    def load_base_params(self, path) -> Any:
        """Model parameters of another run's checkpoint (same architecture) for ``train.init_from``;
        ``hf:PATH`` reads a Hugging Face folder whose config.json must match the ``model`` section.
        Reads every call; the run's own base is :meth:`base_params` (read once)."""
        return read_base_params(self.cfg, path, self.base_abstract, self.base_shardings)

    def base_params(self) -> Any:
        """The model parameters this run starts from (``train.init_from``, else the seeded init),
        placed with ``base_shardings``; read on the first call (shared with the method's factory)."""
        return self.context.base_params()

    def _read_base(self):
        if self.cfg.train.init_from:
            return self.load_base_params(self.cfg.train.init_from)
        key, shape = jax.random.PRNGKey(self.cfg.seed), (1, self.cfg.data.seq_len)
        with self._context():
            return jax.jit(lambda: init_params(self.model, key, shape), out_shardings=self.base_shardings)()

    def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Global numpy batch -> global jax arrays; each process contributes its own rows."""
        local = process_slice({k: batch[k] for k in PACKED_KEYS}, jax.process_index(), jax.process_count())
        global_rows = batch["inputs"].shape[0]
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v, (global_rows,) + v.shape[1:]) for k, v in local.items()}

    def train_step(self, state: TrainState, batch: dict[str, np.ndarray]):
        if not self.context.training:
            raise RuntimeError(f"this Trainer was built to load a run (purpose={self.context.purpose!r}), not to train; build Trainer(cfg)")
        with self._context():
            return self._train_step(state, self.shard_batch(batch), self.frozen)

    def evaluate(self, params, eval_sets: dict[str, dict[str, np.ndarray]], max_batches: int) -> dict[str, float]:
        """Mean loss over real tokens per domain (``eval/loss/<domain>``) and their mean (``eval/loss``)."""
        out = {}
        with self._context():
            for name, arrays in eval_sets.items():
                tot, n = 0.0, 0.0
                for i, batch in enumerate(eval_batches(arrays, self.cfg.data.batch_size)):
                    if i >= max_batches:
                        break
                    s, c = self._eval_step(params, self.shard_batch(batch))
                    tot, n = tot + float(s), n + float(c)
                out[f"eval/loss/{name}"] = tot / max(n, 1.0)
        if out:
            out["eval/loss"] = float(np.mean(list(out.values())))
            out["eval/perplexity"] = float(np.exp(min(out["eval/loss"], 50.0)))
        return out

    def restore(self, ckpt: Checkpointer, step: int | None = None):
        check_same_model(ckpt.read_config(step), self.cfg.to_dict()["model"], ckpt.directory)
        return ckpt.restore(self.abstract_state, step)


def setup_distributed(cfg: ExperimentConfig) -> None:
    """``jax.distributed.initialize`` from the config (``distributed.*``), else from the environment
    (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``), else JAX's own
    auto-detection (SLURM, Open MPI, Cloud TPU) when ``distributed.enabled=true``. Must run
    before any other JAX call."""
    d = cfg.distributed
    env = os.environ
    address = d.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    num = d.num_processes if d.num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    pid = d.process_id if d.process_id is not None else _env_int("JAX_PROCESS_ID")
    enabled = bool(address) if d.enabled == "auto" else d.enabled
    if enabled and not jax.distributed.is_initialized():
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}: expected an integer (got {raw!r})") from None


def load_params(cfg: ExperimentConfig, checkpoint_dir, step: int | None = None, devices=None):
    """``(trainer, params)``: the parameters of a checkpoint (only those: no optimizer state is read,
    so the config's optimizer need not match), placed with the run's shardings (eval / generate).
    The trainer is built to load (``purpose="load"``): it cannot train, and its method reads no
    training-only input, so e.g. a distilled student loads without its teacher (its prepared tree is
    then the student alone: parameters only the training loss uses are not read)."""
    trainer = Trainer(cfg, devices=devices, purpose="load")
    with Checkpointer(checkpoint_dir, create=False) as ckpt:
        check_same_model(ckpt.read_config(step), cfg.to_dict()["model"], ckpt.directory)
        params = ckpt.restore_params(abstract_with_shardings(trainer.abstract_state.params, trainer.param_shardings), step)
    trainer.context.release_base()
    return trainer, params


def read_base_params(cfg: ExperimentConfig, path, abstract, shardings) -> Any:
    """Model parameters of the run (or ``hf:`` folder) at ``path`` for a run of config ``cfg``
    (same ``model`` section), read with ``abstract``'s shapes and placed with ``shardings``."""
    from jaxeff.train.checkpoint import find_checkpoint_dir

    if str(path).startswith("hf:"):
        from jaxeff.interop.hf import load_for_run

        return load_for_run(str(path)[3:], cfg.model, abstract, shardings)
    with Checkpointer(find_checkpoint_dir(path), create=False) as ckpt:
        check_same_model(ckpt.read_config(), cfg.to_dict()["model"], ckpt.directory)
        return ckpt.restore_params(abstract_with_shardings(abstract, shardings))


__all__ = ["Trainer", "load_params", "read_base_params", "setup_distributed", "peak_flops_per_device", "PEAK_FLOPS"]
