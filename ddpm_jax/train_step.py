"""The pure training and evaluation steps, and their data-parallel forms.

``train_step(state, schedule, batch)`` is one pure function; :class:`Parallel` runs it either
under ``jax.jit`` with the batch sharded over a 1-D device mesh (the default: ``jax.shard_map``,
each device on its slice) or under ``jax.pmap``. Either way the gradients and the loss are
averaged over the devices by one ``lax.pmean`` of a single flat vector (:func:`pmean_flat`).

Randomness is drawn per example from ``fold_in(fold_in(state.rng, state.step), example_id)``,
where ``example_id`` is the example's position in the *global* batch; a network with dropout
(a ``train`` argument, :func:`ddpm_jax.models.takes_train`) draws each example's dropout from
``fold_in(fold_in(fold_in(state.rng, state.step), DROPOUT_STREAM), example_id)``, in
``train_step`` only (evaluation and sampling are deterministic). The noise and dropout an example
sees therefore do not depend on how the batch is split, and every parallel form computes the same
update as one device on the same global batch (up to float reduction order).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding, PartitionSpec as P

from ddpm_jax import data, rng
from ddpm_jax.models import make_model_fn, takes_train
from ddpm_jax.schedules import Schedule
from ddpm_jax.train_state import TrainState, ema_decay_at, ema_update

__all__ = ["StepConfig", "train_step", "pmean_flat", "eval_step", "Parallel", "DROPOUT_STREAM"]

#: Folded into the step's key to derive the dropout keys, apart from the noise keys.
DROPOUT_STREAM = 0x64726F70


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static pieces of the step (hashable, closed over; not traced).

    apply_fn: the network's ``apply``; loss_fn: an objective from ``objectives.get_objective``;
    tx: the optimiser; ema_decay: target EMA decay; time_input: 'index' | 'fraction'.
    """

    apply_fn: Callable
    loss_fn: Callable
    tx: optax.GradientTransformation
    ema_decay: float
    time_input: str = "index"


def _loss_and_grads(cfg: StepConfig, params, schedule: Schedule, batch, keys, dropout_keys=None):
    def loss(p):
        model_fn = make_model_fn(cfg.apply_fn, p, time_input=cfg.time_input, num_steps=schedule.num_steps,
                                 dropout_key=dropout_keys)
        return cfg.loss_fn(model_fn, schedule, batch, keys)

    (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, aux, grads


def pmean_flat(tree, axis_name: str):
    """``lax.pmean`` of a pytree of arrays as one flat vector: a single all-reduce of
    sum(leaf sizes) values instead of one per leaf.

    Same values as ``lax.pmean(tree, axis_name)`` (each entry is the same sum over devices). XLA
    combines per-leaf all-reduces into one of a tuple of buffers, which is not the same on every
    backend: on CPU devices a tuple of the U-Net's ~40 gradient buffers is slower than one flat
    vector (docs/performance.md), and over the gloo collectives of several CPU processes each
    buffer costs a round trip. Leaves of
    different dtypes are promoted to a common one for the all-reduce and cast back
    (``ravel_pytree``). The price is one concatenated copy of the tree (for the small U-Net's
    166k gradients, 0.7 MB; for a model of N parameters, 4N bytes more at the step's peak).
    """
    flat, unravel = ravel_pytree(tree)
    n = jax.lax.axis_size(axis_name)
    # divided after the split: XLA fuses each leaf's slice of the sum into that leaf's consumers,
    # and a division of the whole vector would be fused into (and costed in) every one of them
    return jax.tree_util.tree_map(lambda x: x / n, unravel(jax.lax.psum(flat, axis_name)))


def train_step(cfg: StepConfig, state: TrainState, schedule: Schedule, batch, *, axis_name: Optional[str] = None) -> Tuple[TrainState, Dict[str, jnp.ndarray]]:
    """One optimiser update on a batch ``(B, H, W, C)`` (the global batch, or under ``shard_map``
    or ``pmap`` this device's slice, with ``axis_name`` naming the device axis).

    A step whose loss or gradient is not finite (NaN/Inf) applies no update: params, optimiser
    state and EMA stay as they were and only ``step`` advances (so the next step sees the next
    batch); ``metrics['finite']`` is 0 for such a step. The loop counts these and stops a run
    that keeps producing them (``train.max_nonfinite_steps``).

    Returns the new state and metrics {'loss', 'grad_norm', 'finite'} (scalars).
    """
    b = batch.shape[0]
    offset = jax.lax.axis_index(axis_name) * b if axis_name else 0
    step_key = jax.random.fold_in(state.rng, state.step)
    keys = rng.per_example_keys(step_key, offset + jnp.arange(b))
    dropout_keys = None
    if takes_train(cfg.apply_fn):
        dropout_keys = rng.per_example_keys(jax.random.fold_in(step_key, DROPOUT_STREAM), offset + jnp.arange(b))
    loss, _, grads = _loss_and_grads(cfg, state.params, schedule, batch, keys, dropout_keys)
    if axis_name:
        grads, loss = pmean_flat((grads, loss), axis_name)
    grad_norm = optax.tree_utils.tree_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # any NaN/Inf entry (or overflow) makes the norm non-finite
    updates, opt_state = cfg.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, params, ema_decay_at(state.step, cfg.ema_decay))
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state), ema_params=keep(ema, state.ema_params))
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}


def eval_step(cfg: StepConfig, params, schedule: Schedule, batch, mask, key, example_ids) -> Dict[str, jnp.ndarray]:
    """Sum of per-example losses over the examples with ``mask`` 1, and their count.

    ``key`` is fixed across evaluations, with one key per example (``example_ids`` = the
    examples' indices in the evaluation set), so the same example always sees the same t and
    noise and validation losses are comparable between epochs.
    """
    keys = rng.per_example_keys(key, example_ids)
    model_fn = make_model_fn(cfg.apply_fn, params, time_input=cfg.time_input, num_steps=schedule.num_steps)
    _, aux = cfg.loss_fn(model_fn, schedule, batch, keys)
    return {"loss_sum": jnp.sum(aux["per_example"] * mask), "count": jnp.sum(mask)}


def _is_global(x, sharding) -> bool:
    return isinstance(x, jax.Array) and x.sharding == sharding


class Parallel:
    """Runs the steps over all devices: ``mode='jit'`` (sharded batch on a 1-D mesh, replicated
    state) or ``mode='pmap'`` (state replicated with a leading device axis).

    Host-side code deals only with global NumPy batches and with state in its plain (jit) form;
    this class places them on devices and back.
    """

    def __init__(self, cfg: StepConfig, *, mode: str = "jit", mesh=None):
        if mode not in ("jit", "pmap"):
            raise ValueError(f"unknown parallel mode {mode!r}; expected 'jit' or 'pmap'")
        self.cfg = cfg
        self.mode = mode
        self.mesh = mesh if mesh is not None else data.make_mesh()
        self.num_devices = self.mesh.devices.size
        self.replicated = NamedSharding(self.mesh, P())
        self.sharded = NamedSharding(self.mesh, P(data.DATA_AXIS))
        if mode == "jit":
            # Each device runs the step on its slice of the batch (the state replicated), meeting
            # in train_step's one flat all-reduce; the SPMD partitioner's per-leaf all-reduces
            # (plain jit of the global step) are slower on CPU devices (pmean_flat). As under
            # pmap, gradients are per-device until that pmean: check_vma=False, since with it
            # autodiff would sum them itself, and the convolutions' custom VJPs return
            # per-device cotangents for replicated kernels, which it rejects.
            per_device = jax.shard_map(functools.partial(train_step, cfg, axis_name=data.DATA_AXIS), mesh=self.mesh,
                                       in_specs=(P(), P(), P(data.DATA_AXIS)), out_specs=(P(), P()), check_vma=False)
            self._train = jax.jit(per_device, donate_argnums=(0,), out_shardings=(self.replicated, self.replicated))
        else:
            self._train = jax.pmap(
                functools.partial(train_step, cfg, axis_name=data.DATA_AXIS),
                axis_name=data.DATA_AXIS, in_axes=(0, None, 0), donate_argnums=(0,),
            )
        self._eval = jax.jit(functools.partial(eval_step, cfg), out_shardings=self.replicated)

    # -- placement -----------------------------------------------------------------------------
    def put_state(self, state: TrainState):
        """Host or device state -> the form the step takes (replicated). The step donates its
        state, so arrays passed here may be consumed: keep a host copy to reuse them."""
        if self.mode == "jit":
            return self.put_replicated(state)
        devices = jax.local_devices()
        stacked = NamedSharding(jax.sharding.Mesh(np.array(devices), ("replica",)), P("replica"))
        return jax.tree_util.tree_map(
            lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (len(devices),) + np.shape(x)), stacked), state
        )

    def get_state(self, state) -> TrainState:
        """The step's form -> plain state (for checkpoints, sampling, evaluation)."""
        if self.mode == "jit":
            return state
        return jax.tree_util.tree_map(lambda x: x[0], state)

    def put_batch(self, local_batch: np.ndarray):
        if self.mode == "jit":
            return data.shard_batch(local_batch, self.mesh)
        return data.shard_for_pmap(local_batch, jax.local_device_count())

    def put_replicated(self, tree):
        """A pytree replicated on every device of the mesh. With several processes each passes the
        same host values, which become one global array (arrays already placed so are kept)."""
        if jax.process_count() > 1:
            tree = jax.tree_util.tree_map(lambda x: x if _is_global(x, self.replicated) else np.asarray(x), tree)
        return jax.device_put(tree, self.replicated)

    # -- steps ---------------------------------------------------------------------------------
    def train(self, state, schedule: Schedule, batch) -> Tuple[Any, Dict[str, jnp.ndarray]]:
        """One step on a placed batch; metrics are device scalars (no host sync here)."""
        state, metrics = self._train(state, schedule, batch)
        if self.mode == "pmap":
            metrics = jax.tree_util.tree_map(lambda x: x[0], metrics)
        return state, metrics

    def compile_train(self, state, schedule: Schedule, batch):
        """The step lowered and compiled for these (placed) arguments, without running it: a
        ``jax.stages.Compiled`` with ``cost_analysis()`` and ``as_text()``, called like
        :meth:`train`'s jitted step (``compiled(state, schedule, batch) -> (state, metrics)``;
        under pmap the metrics keep their device axis). For benchmarks and profiles."""
        return self._train.lower(state, schedule, batch).compile()

    def evaluate(self, params, schedule: Schedule, images: np.ndarray, key, batch_size: int) -> float:
        """Mean per-example loss over ``images`` (N, H, W, C), in padded, masked batches of the
        global ``batch_size``; with several processes each feeds its slice of every batch."""
        n = images.shape[0]
        if n == 0:
            return float("nan")
        params = self.put_replicated(params)
        pc, pi = jax.process_count(), jax.process_index()
        lb = batch_size // pc
        sums = []
        for start in range(0, n, batch_size):
            chunk = images[start:start + batch_size]
            m = chunk.shape[0]
            pad = batch_size - m
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
            mask = np.concatenate([np.ones(m, np.float32), np.zeros(pad, np.float32)])
            ids = np.arange(start, start + batch_size, dtype=np.int32)
            mine = slice(pi * lb, (pi + 1) * lb)
            out = self._eval(params, schedule, *(data.shard_batch(a[mine], self.mesh) for a in (chunk, mask)), key,
                             data.shard_batch(ids[mine], self.mesh))
            # One batch in flight at a time. These programs do not depend on each other, so
            # without the wait several run at once, and on CPU devices sharing one small thread
            # pool each can hold a thread blocked in its all-reduce waiting for another device's
            # part that has no thread left: XLA aborts the process after 40 s (seen with two CPU
            # devices on two cores). Training steps are chained through the state and never overlap.
            sums.append(jax.block_until_ready(out))
        tot = jax.device_get(sums)
        return float(sum(o["loss_sum"] for o in tot) / sum(o["count"] for o in tot))
