"""The pure training and evaluation steps, and their data-parallel forms.

``train_step(state, schedule, batch)`` is one pure function. A batch is a dict of arrays with a
leading batch axis (:func:`as_batch`): ``'image'`` ``(B, H, W, C)``, ``'example_id'`` ``(B,)``
int32 (the example's position in the global batch) and ``'weight'`` ``(B,)`` float32 (its share
of the batch loss: 1/B for each of the B real examples, 0 for padding), so the loss is
``Σ_i weight_i · ℓ_i`` and padded examples change nothing. :class:`Parallel` pads each batch to a
multiple of the device count (so any batch size runs on any number of devices) and runs the step
under ``jax.jit`` with the batch sharded over a 1-D device mesh (``NamedSharding``; XLA inserts
the gradient reduction), under ``jax.shard_map`` with one flat all-reduce (:func:`psum_flat`; the
CPU profile's choice, faster on XLA:CPU's devices), or under ``jax.pmap``.

Randomness is drawn per example from ``fold_in(fold_in(state.rng, state.step), example_id)``; a
network with dropout (a ``train`` argument, :func:`ddpm_jax.models.takes_train`) draws each
example's dropout from ``fold_in(fold_in(fold_in(state.rng, state.step), DROPOUT_STREAM),
example_id)``, in ``train_step`` only (evaluation and sampling are deterministic). The noise, the
dropout and the weight an example gets therefore do not depend on how the batch is split or
padded, and every parallel form, on any device count, computes the same update as one device on
the same global batch (up to float summation order). With ``accum_steps = k`` the step sums the
gradients of k micro-batches of B/k examples (one ``lax.scan``), the same update as the whole
batch at once, with the activations of one micro-batch in memory.
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

from ddpm_jax import ema as ema_lib
from ddpm_jax import guidance, rng, sharding, timestep_sampling
from ddpm_jax.models import make_model_fn, takes_train
from ddpm_jax.schedules import Schedule
from ddpm_jax.train_state import TrainState, ema_decay_at, ema_update

__all__ = ["StepConfig", "as_batch", "train_step", "psum_flat", "eval_step", "Parallel", "DROPOUT_STREAM",
           "padded_size"]

#: Folded into the step's key to derive the dropout keys, apart from the noise keys.
DROPOUT_STREAM = 0x64726F70


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static pieces of the step (hashable, closed over; not traced).

    apply_fn: the network's ``apply``; loss_fn: an objective from ``objectives.get_objective``;
    tx: the optimiser; ema_decay: target EMA decay; time_input: one of models.TIME_INPUTS;
    accum_steps: micro-batches per step (``train.grad_accum_steps``; the batch must divide into them);
    label_dropout: the probability of training a class-conditional network on "no class" instead
    of an example's label (``train.label_dropout``, :func:`ddpm_jax.guidance.drop_labels`);
    t_sampling, t_log_normal (mean, std of ln σ), t_importance_uniform: how t is drawn
    (:mod:`ddpm_jax.timestep_sampling`); ema_gamma: None for the constant (warmed-up) ``ema_decay``,
    else the power EMA's γ (:func:`ddpm_jax.ema.power_decay`); ema_track_gammas: ``(key, γ)`` of
    each power EMA tracked in ``state.ema_tracks``.
    """

    apply_fn: Callable
    loss_fn: Callable
    tx: optax.GradientTransformation
    ema_decay: float
    time_input: str = "index"
    accum_steps: int = 1
    label_dropout: float = 0.0
    t_sampling: str = "uniform"
    t_log_normal: Tuple[float, float] = (-1.2, 1.2)
    t_importance_uniform: float = 1e-3
    ema_gamma: Optional[float] = None
    ema_track_gammas: Tuple[Tuple[str, float], ...] = ()


def as_batch(images, *, first_id=0, total: Optional[int] = None) -> Dict[str, Any]:
    """A bare ``(B, H, W, C)`` image array as a batch dict: ids ``first_id + [0, B)`` and every
    weight ``1 / total`` (default ``1 / B``). A dict is returned as it is."""
    if isinstance(images, dict):
        return images
    b = images.shape[0]
    return {"image": images, "example_id": first_id + jnp.arange(b, dtype=jnp.int32),
            "weight": jnp.full((b,), 1.0 / (total or b), jnp.float32)}


def _loss_and_grads(cfg: StepConfig, params, schedule: Schedule, batch, step_key, probs=None):
    """((Σ_i weight_i c_i ℓ_i, (ℓ, t)), its gradient) on one (micro-)batch dict: ℓ ``(B,)`` the
    objective's terms and t ``(B,)`` their time steps; c_i = 1 and t drawn by the objective when
    ``probs`` is None, else t ~ ``probs`` with the sampler's factor c (:mod:`ddpm_jax.timestep_sampling`)."""
    ids = batch["example_id"]
    keys = rng.per_example_keys(step_key, ids)
    t, factor = None, None
    if probs is not None:
        t, factor = timestep_sampling.draw(keys, ids.shape[0], probs, correct=cfg.t_sampling == "importance")
    dropout_keys = None
    if takes_train(cfg.apply_fn):
        dropout_keys = rng.per_example_keys(jax.random.fold_in(step_key, DROPOUT_STREAM), ids)

    labels = None
    if "label" in batch:  # a class-conditional network
        labels = guidance.drop_labels(batch["label"], step_key, ids, cfg.label_dropout)

    def loss(p):
        net = make_model_fn(cfg.apply_fn, p, time_input=cfg.time_input, num_steps=schedule.num_steps,
                            dropout_key=dropout_keys)
        _, aux = cfg.loss_fn(guidance.with_labels(net, labels), schedule, batch["image"], keys, t=t)
        terms = aux["per_example"]
        weighted = terms if factor is None else terms * factor
        return jnp.sum(weighted * batch["weight"]), (jax.lax.stop_gradient(terms), aux["t"])

    return jax.value_and_grad(loss, has_aux=True)(params)


def _accumulated_loss_and_grads(cfg: StepConfig, params, schedule: Schedule, batch, step_key, probs=None):
    """:func:`_loss_and_grads` summed over ``cfg.accum_steps`` micro-batches: micro-batch j holds
    examples j, j + k, j + 2k, ... of the (device's) batch, so each device keeps its share of each.
    The terms and time steps come back in the batch's order."""
    k = cfg.accum_steps
    if k == 1:
        return _loss_and_grads(cfg, params, schedule, batch, step_key, probs)
    b = batch["image"].shape[0]
    if b % k:
        raise ValueError(f"a batch of {b} examples does not split into {k} micro-batches (train.grad_accum_steps)")
    micro = jax.tree_util.tree_map(lambda a: jnp.swapaxes(a.reshape((b // k, k) + a.shape[1:]), 0, 1), batch)

    def body(carry, mb):
        (loss, aux), grads = _loss_and_grads(cfg, params, schedule, mb, step_key, probs)
        return (carry[0] + loss, jax.tree_util.tree_map(jnp.add, carry[1], grads)), aux

    zero = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, params))
    (loss, grads), aux = jax.lax.scan(body, zero, micro)
    # (k, b/k) per micro-batch -> (b,) in the batch's order (example j·... of micro-batch j)
    aux = jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1).reshape((b,)), aux)
    return (loss, aux), grads


def psum_flat(tree, axis_name: str):
    """``lax.psum`` of a pytree of arrays as one flat vector: a single all-reduce of
    sum(leaf sizes) values instead of one per leaf.

    Same values as ``lax.psum(tree, axis_name)``. XLA combines per-leaf all-reduces into one of a
    tuple of buffers, which is not the same on every backend: on CPU devices a tuple of the
    U-Net's ~40 gradient buffers is slower than one flat vector (docs/performance.md), and over
    the gloo collectives of several CPU processes each buffer costs a round trip. Leaves of
    different dtypes are promoted to a common one for the all-reduce and cast back
    (``ravel_pytree``). The price is one concatenated copy of the tree (4N bytes for N parameters).
    """
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.lax.psum(flat, axis_name))


def train_step(cfg: StepConfig, state: TrainState, schedule: Schedule, batch, *, axis_name: Optional[str] = None) -> Tuple[TrainState, Dict[str, jnp.ndarray]]:
    """One optimiser update on a batch (the global batch, or under ``shard_map``/``pmap`` this
    device's slice, with ``axis_name`` naming the device axis): a dict (:func:`as_batch`), or bare
    images ``(B, H, W, C)``, each weighted 1/(B · devices) with ids by position.

    Loss ``L = Σ_i weight_i ℓ_i`` over the global batch (with ``axis_name``, each device's sum and
    gradient are added up by :func:`psum_flat`).

    A step whose loss or gradient is not finite (NaN/Inf) applies no update: params, optimiser
    state and EMA stay as they were and only ``step`` advances (so the next step sees the next
    batch); ``metrics['finite']`` is 0 for such a step. The loop counts these and stops a run
    that keeps producing them (``train.max_nonfinite_steps``).

    Returns the new state and metrics {'loss', 'grad_norm', 'finite'} (scalars).
    """
    if not isinstance(batch, dict):
        b = batch.shape[0]
        n = jax.lax.axis_size(axis_name) if axis_name else 1
        first = jax.lax.axis_index(axis_name) * b if axis_name else 0
        batch = as_batch(batch, first_id=first, total=b * n)
    step_key = jax.random.fold_in(state.rng, state.step)
    lo_mean, lo_std = cfg.t_log_normal
    probs = timestep_sampling.probs_for(cfg.t_sampling, schedule, state.t_history, log_normal_mean=lo_mean,
                                        log_normal_std=lo_std, uniform_share=cfg.t_importance_uniform)
    (loss, (terms, t)), grads = _accumulated_loss_and_grads(cfg, state.params, schedule, batch, step_key, probs)
    if axis_name:
        grads, loss = psum_flat((grads, loss), axis_name)
    grad_norm = optax.tree_utils.tree_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # any NaN/Inf entry (or overflow) makes the norm non-finite
    updates, opt_state = cfg.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    done = state.step + 1  # updates applied after this one
    keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_params = keep(params, state.params)
    if cfg.ema_gamma is None:
        ema = keep(ema_update(state.ema_params, params, ema_decay_at(state.step, cfg.ema_decay)), state.ema_params)
    else:  # a power EMA averages every step, a skipped one with the unchanged params, so its profile stays exact
        ema = _power_update(state.ema_params, new_params, done, cfg.ema_gamma)
    new_state = state.replace(step=done, params=new_params, opt_state=keep(opt_state, state.opt_state), ema_params=ema)
    if cfg.ema_track_gammas:
        new_state = new_state.replace(ema_tracks={k: _power_update(state.ema_tracks[k], new_params, done, g)
                                                  for k, g in cfg.ema_track_gammas})
    if cfg.t_sampling == "importance":
        valid = batch["weight"] > 0
        if axis_name:  # every device appends the whole global batch, in example order
            terms, t, valid = (jax.lax.all_gather(a, axis_name, tiled=True) for a in (terms, t, valid))
        history = timestep_sampling.update_history(state.t_history, t, terms, valid & finite)
        new_state = new_state.replace(t_history=history)
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}


def _power_update(ema, params, t, gamma):
    """ema + (1 − β_t)(θ − ema), β_t = (1 − 1/t)^(γ+1) (:func:`ddpm_jax.ema.power_update_weight`:
    1 − β_t computed directly, exact where β_t is close to 1)."""
    w = ema_lib.power_update_weight(t, gamma)
    return jax.tree_util.tree_map(lambda e, p: e + w * (p - e), ema, params)


def padded_size(batch: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``batch``."""
    return -(-batch // multiple) * multiple


def eval_step(cfg: StepConfig, params, schedule: Schedule, batch, mask, key, example_ids, labels=None) -> Dict[str, jnp.ndarray]:
    """Sum of per-example losses over the examples with ``mask`` 1, and their count.

    ``key`` is fixed across evaluations, with one key per example (``example_ids`` = the
    examples' indices in the evaluation set), so the same example always sees the same t and
    noise and validation losses are comparable between epochs. ``labels``: the examples' classes,
    for a class-conditional network (no label dropout here).
    """
    keys = rng.per_example_keys(key, example_ids)
    net = make_model_fn(cfg.apply_fn, params, time_input=cfg.time_input, num_steps=schedule.num_steps)
    _, aux = cfg.loss_fn(guidance.with_labels(net, labels), schedule, batch, keys)
    return {"loss_sum": jnp.sum(aux["per_example"] * mask), "count": jnp.sum(mask)}


def _is_global(x, sharding) -> bool:
    return isinstance(x, jax.Array) and x.sharding == sharding


class Parallel:
    """Runs the steps over all devices: ``mode='jit'`` (sharded batch on a 1-D mesh, replicated
    state) or ``mode='pmap'`` (state replicated with a leading device axis).

    ``flat_allreduce`` (default: the platform profile's, :mod:`ddpm_jax.platform_profile`) picks
    how the jit mode reduces the gradients: False, plain ``jax.jit`` of the global step with the
    batch's ``NamedSharding`` (XLA inserts the reduction); True, ``jax.shard_map`` with each device
    on its slice, meeting in one all-reduce of a flat vector (:func:`psum_flat`).

    Host-side code deals only with each process's NumPy batches and with state in its plain (jit)
    form; this class pads batches (:meth:`put_batch`) and places them and the state on devices.
    """

    def __init__(self, cfg: StepConfig, *, mode: str = "jit", mesh=None, flat_allreduce: Optional[bool] = None):
        if mode not in ("jit", "pmap"):
            raise ValueError(f"unknown parallel mode {mode!r}; expected 'jit' or 'pmap'")
        if flat_allreduce is None:
            from ddpm_jax import platform_profile

            flat_allreduce = platform_profile.current().flat_allreduce
        self.cfg = cfg
        self.mode = mode
        self.flat_allreduce = bool(flat_allreduce)
        self.mesh = mesh if mesh is not None else sharding.make_mesh()
        self.num_devices = self.mesh.devices.size
        self.num_local_devices = len(self.mesh.local_devices) if mode == "jit" else jax.local_device_count()
        self.replicated = NamedSharding(self.mesh, P())
        self.sharded = NamedSharding(self.mesh, P(sharding.DATA_AXIS))
        step = functools.partial(train_step, cfg)
        if mode == "pmap":
            self._train = jax.pmap(functools.partial(step, axis_name=sharding.DATA_AXIS), axis_name=sharding.DATA_AXIS,
                                   in_axes=(0, None, 0), donate_argnums=(0,))
        elif self.flat_allreduce:
            # As under pmap, gradients are per-device until psum_flat: check_vma=False, since with
            # it autodiff would sum them itself, and the convolutions' custom VJPs return
            # per-device cotangents for replicated kernels, which it rejects.
            per_device = jax.shard_map(functools.partial(step, axis_name=sharding.DATA_AXIS), mesh=self.mesh,
                                       in_specs=(P(), P(), P(sharding.DATA_AXIS)), out_specs=(P(), P()), check_vma=False)
            self._train = jax.jit(per_device, donate_argnums=(0,), out_shardings=(self.replicated, self.replicated))
        else:
            self._train = jax.jit(step, donate_argnums=(0,), out_shardings=(self.replicated, self.replicated))
        self._eval = jax.jit(functools.partial(eval_step, cfg), out_shardings=self.replicated)

    # -- placement -----------------------------------------------------------------------------
    def padded_batch(self, global_batch: int) -> int:
        """The global batch the step runs on: ``global_batch`` padded with zero-weight examples to
        a multiple of (devices × ``accum_steps``), per process."""
        pc = jax.process_count()
        return pc * padded_size(global_batch // pc, self.num_local_devices * self.cfg.accum_steps)

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

    def pad_batch(self, local_batch) -> Dict[str, np.ndarray]:
        """This process's slice of the global batch — images ``(b, H, W, C)`` or a dict of arrays
        with ``'image'`` (and e.g. ``'label'``) — as the step's batch dict: ``example_id`` = the
        position in the global batch of b × processes, ``weight`` = 1/(b × processes), padded with
        zero-weight examples (zeros, ids past the global batch) to :meth:`padded_batch`'s share."""
        tree = dict(local_batch) if isinstance(local_batch, dict) else {"image": np.asarray(local_batch)}
        b = int(np.shape(tree["image"])[0])
        pc, pi = jax.process_count(), jax.process_index()
        total = b * pc
        lp = padded_size(b, self.num_local_devices * self.cfg.accum_steps)
        pad = lp - b
        tree["example_id"] = np.concatenate([pi * b + np.arange(b), total + pi * pad + np.arange(pad)]).astype(np.int32)
        tree["weight"] = np.concatenate([np.full(b, 1.0 / total), np.zeros(pad)]).astype(np.float32)
        for k in tree:
            a = np.asarray(tree[k])
            if a.shape[0] == b and pad:
                tree[k] = np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)])
        return tree

    def put_batch(self, local_batch):
        """:meth:`pad_batch`, placed for the step (sharded over the mesh, or split for pmap)."""
        tree = self.pad_batch(local_batch)
        if self.mode == "jit":
            return sharding.shard_batch(tree, self.mesh)
        return sharding.shard_for_pmap(tree, jax.local_device_count())

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

    def evaluate(self, params, schedule: Schedule, images: np.ndarray, key, batch_size: int, labels=None) -> float:
        """Mean per-example loss over ``images`` (N, H, W, C) (with ``labels`` (N,) for a
        class-conditional network), in padded, masked batches of the global ``batch_size`` (itself
        padded to a multiple of the device count); with several processes each feeds its slice of
        every batch."""
        from ddpm_jax import platform_profile

        n = images.shape[0]
        if n == 0:
            return float("nan")
        params = self.put_replicated(params)
        pc, pi = jax.process_count(), jax.process_index()
        per_batch = pc * padded_size(padded_size(batch_size, pc) // pc, len(self.mesh.local_devices))
        lb = per_batch // pc
        # Under the CPU profile with several CPU devices, one batch in flight at a time: these
        # programs do not depend on each other, so several would run at once, and devices sharing
        # XLA:CPU's small thread pool can each hold a thread blocked in an all-reduce waiting for
        # another's part that has no thread left (XLA aborts after 40 s; cpu_devices.DispatchWindow).
        wait = platform_profile.dispatch_window().enabled
        sums = []
        for start in range(0, n, per_batch):
            chunk = images[start:start + per_batch]
            m = chunk.shape[0]
            pad = per_batch - m
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
            mask = np.concatenate([np.ones(m, np.float32), np.zeros(pad, np.float32)])
            ids = np.arange(start, start + per_batch, dtype=np.int32)
            mine = slice(pi * lb, (pi + 1) * lb)
            y = None
            if labels is not None:
                y = np.concatenate([labels[start:start + per_batch], np.zeros(pad, np.int32)]).astype(np.int32)
                y = sharding.shard_batch(y[mine], self.mesh)
            out = self._eval(params, schedule, *(sharding.shard_batch(a[mine], self.mesh) for a in (chunk, mask)), key,
                             sharding.shard_batch(ids[mine], self.mesh), y)
            sums.append(jax.block_until_ready(out) if wait else out)
        tot = jax.device_get(sums)
        return float(sum(o["loss_sum"] for o in tot) / sum(o["count"] for o in tot))
