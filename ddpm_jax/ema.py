"""Power-function EMA and post-hoc EMA reconstruction (Karras et al. 2024, "Analyzing and improving
the training dynamics of diffusion models", Section 3 and Appendix C).

A power-function EMA of the params θ_t (θ_t: the params after t updates) is updated with

    ema_t = β_t · ema_{t−1} + (1 − β_t) · θ_t,      β_t = (1 − 1/t)^(γ+1),   t = 1, 2, …

so that ema_t weighs θ_k about in proportion to k^γ: its averaging window grows with training.
γ is given through the window's relative width σ_rel, the standard deviation of the weights
divided by their extent: σ_rel² = (γ+1) / ((γ+2)² (γ+3)) (EDM2 eq. 3); σ_rel 0.05 is γ ≈ 16.97,
σ_rel 0.10 is γ ≈ 6.94.

Post-hoc EMA: a run stores a few power EMAs ("tracks", e.g. σ_rel 0.05 and 0.10) at every
checkpoint ("snapshots"). Each snapshot is a known weighted sum Σ_k w_k θ_k (:func:`ema_weights`),
so an EMA of another σ_rel at a step S is approximated by the combination of snapshots whose
weights come closest to its own (:func:`solve_posthoc`, a least-squares fit over the steps) and
computed from the stored params (:func:`reconstruct`), after training, without retraining.

    coeffs, info = solve_posthoc([(s["step"], g, s["start_step"]) for s in snaps for g in s["gammas"]],
                                 gamma_from_sigma_rel(0.07), target_step)
    params = reconstruct([t for s in snaps for t in s["tracks"]], coeffs)

The weights and the least squares are NumPy float64; :func:`power_decay` and
:func:`power_update_weight` also work on (traced) JAX scalars, for the training step.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import numpy as np

__all__ = ["GAMMA_MIN", "SIGMA_REL_MAX", "SNAPSHOT_DIR", "gamma_from_sigma_rel", "sigma_rel_from_gamma", "power_decay",
           "power_update_weight", "ema_weights", "constant_ema_weights", "solve_posthoc", "reconstruct",
           "snapshot_path", "write_snapshot", "read_snapshot", "read_snapshots"]

#: σ_rel(γ) rises on (−1, GAMMA_MIN] and falls on [GAMMA_MIN, ∞): γ = (√5 − 3)/2, where
#: d/dγ of σ_rel² is 0. :func:`gamma_from_sigma_rel` returns γ ≥ GAMMA_MIN (EDM2's root).
GAMMA_MIN = (math.sqrt(5.0) - 3.0) / 2.0
#: The largest σ_rel a power EMA has, σ_rel(GAMMA_MIN) ≈ 0.3003.
SIGMA_REL_MAX = math.sqrt((GAMMA_MIN + 1.0) / ((GAMMA_MIN + 2.0) ** 2 * (GAMMA_MIN + 3.0)))
#: Where a run keeps its snapshots: ``<workdir>/ema_snapshots/<step>.msgpack``.
SNAPSHOT_DIR = "ema_snapshots"

#: Entries of W held at once by :func:`solve_posthoc` (16 MiB of float64).
_BLOCK_ENTRIES = 2 ** 21
_SNAPSHOT_NAME = re.compile(r"^(\d+)\.msgpack$")
#: The message's tail when a run has no snapshots: how to get them.
_HOW_TO_SNAPSHOT = ("a run writes them with each checkpoint when its config sets train.ema_snapshot_sigma_rels, "
                    "e.g. --config.train.ema_snapshot_sigma_rels=(0.05,0.10)")


# ------------------------------------------------------------------------------------------------
# σ_rel ↔ γ
# ------------------------------------------------------------------------------------------------


def _real(x, name: str) -> float:
    try:
        value = float(x)
    except (TypeError, ValueError):
        raise ValueError(f"{name} = {x!r}: must be a real number") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} = {value}: must be finite")
    return value


def sigma_rel_from_gamma(gamma) -> float:
    """σ_rel = √((γ+1) / ((γ+2)² (γ+3))) (EDM2 eq. 3), for γ > −1; ValueError otherwise."""
    g = _real(gamma, "gamma")
    if g <= -1.0:
        raise ValueError(f"gamma = {g}: a power EMA needs gamma > -1")
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The γ ≥ :data:`GAMMA_MIN` with :func:`sigma_rel_from_gamma` (γ) = σ_rel: the largest real root
    of (γ+2)²(γ+3) − (γ+1)/σ_rel² = γ³ + 7γ² + (16 − τ)γ + (12 − τ) with τ = σ_rel⁻² (as EDM2's
    ``std_to_exp``), refined by Newton steps on that cubic. ValueError (one line) unless
    0 < σ_rel ≤ :data:`SIGMA_REL_MAX` ≈ 0.3003 (a power EMA is never wider)."""
    s = _real(sigma_rel, "sigma_rel")
    if not 0.0 < s <= SIGMA_REL_MAX * (1 + 1e-12):
        raise ValueError(f"sigma_rel = {s}: must be in (0, {SIGMA_REL_MAX:.4f}], the widths a power EMA can have")
    tau = s ** -2.0
    coeffs = [1.0, 7.0, 16.0 - tau, 12.0 - tau]
    g = float(np.max(np.roots(coeffs).real))
    for _ in range(3):  # np.roots' eigenvalues are accurate to ~1e-16·τ; Newton brings g to rounding
        d = 3.0 * g * g + 14.0 * g + 16.0 - tau
        if d == 0.0:
            break
        step = np.polyval(coeffs, g) / d
        if not math.isfinite(step) or g - step < GAMMA_MIN:
            break
        g -= step
    return float(max(g, GAMMA_MIN))


# ------------------------------------------------------------------------------------------------
# The update
# ------------------------------------------------------------------------------------------------


def _is_jax(x) -> bool:
    import sys

    jax = sys.modules.get("jax")
    return jax is not None and isinstance(x, jax.Array)  # tracers are jax.Arrays too


def power_decay(t, gamma):
    """β_t = (1 − 1/t)^(γ+1) = exp((γ+1) · log1p(−1/t)), t ≥ 1 the number of updates applied after
    this one (β_1 = 0: the EMA after the first update is the params). A JAX scalar or array
    ``t`` (traced or not, int or float) gives float32; anything else NumPy float64."""
    if _is_jax(t):
        import jax.numpy as jnp

        t = jnp.asarray(t, jnp.float32)
        return jnp.exp((gamma + 1.0) * jnp.log1p(-1.0 / t))
    t = np.asarray(t, np.float64)
    with np.errstate(divide="ignore"):  # t = 1: log(0) = −inf, β = 0
        return np.exp((gamma + 1.0) * np.log1p(-1.0 / t))


def power_update_weight(t, gamma):
    """1 − β_t = −expm1((γ+1) · log1p(−1/t)), the weight of θ_t in ema_t, accurate to rounding also
    where β_t is close to 1 (in float32, 1 − β_t as a difference loses ~8 of its bits at t = 10⁶).
    The training step applies it as ``ema + w · (θ − ema)``. Types as :func:`power_decay`."""
    if _is_jax(t):
        import jax.numpy as jnp

        t = jnp.asarray(t, jnp.float32)
        return -jnp.expm1((gamma + 1.0) * jnp.log1p(-1.0 / t))
    t = np.asarray(t, np.float64)
    with np.errstate(divide="ignore"):
        return -np.expm1((gamma + 1.0) * np.log1p(-1.0 / t))


# ------------------------------------------------------------------------------------------------
# The weights of θ_0 … θ_end in an EMA
# ------------------------------------------------------------------------------------------------


def _steps(end_step, start_step) -> Tuple[int, int]:
    try:
        end, start = int(end_step), int(start_step)
    except (TypeError, ValueError):
        raise ValueError(f"steps must be integers, got end_step={end_step!r}, start_step={start_step!r}") from None
    if end != end_step or start != start_step or not 0 <= start <= end:
        raise ValueError(f"need integers 0 <= start_step <= end_step, got start_step={start_step!r}, end_step={end_step!r}")
    return end, start


def _power_weights(gamma: float, end: int, start: int, lo: int, hi: int) -> np.ndarray:
    """The entries k = lo..hi−1 of :func:`ema_weights` (zero outside start..end), float64."""
    k = np.arange(lo, hi, dtype=np.float64)
    out = np.zeros(hi - lo)
    a = gamma + 1.0
    live = (k > start) & (k <= end)
    kl = k[live]
    # Σ_{j=k+1}^{end} log β_j = (γ+1) Σ (log(j−1) − log j) = (γ+1) (log k − log end): the sum telescopes.
    with np.errstate(divide="ignore"):  # k = 1: log1p(−1) = −inf, β_1 = 0
        out[live] = np.exp(a * np.log(kl / end)) * -np.expm1(a * np.log1p(-1.0 / kl))
    if lo <= start < hi:
        out[start - lo] = 1.0 if start == end else (start / end) ** a
    return out


def ema_weights(gamma, end_step, start_step=0) -> np.ndarray:
    """The weight w_k of θ_k (k = 0..end_step) in a power EMA at step ``end_step`` that was set to
    θ_{start_step} at ``start_step`` and updated with β_t = :func:`power_decay` (t, γ) for
    t = start_step+1..end_step. Shape ``(end_step + 1,)``, float64:

        w_k = 0                                       k < start_step
        w_start = ∏_{j=start+1}^{end} β_j = (start/end)^(γ+1)
        w_k = (1 − β_k) ∏_{j=k+1}^{end} β_j = (1 − β_k) (k/end)^(γ+1)      k > start_step

    (the sum of log β_j telescopes to (γ+1) log(k/end); β_1 = 0 gives w_0 = 0 when start = 0 < end).
    The weights sum to 1 (to float64 rounding).
    """
    g = _real(gamma, "gamma")
    if g <= -1.0:
        raise ValueError(f"gamma = {g}: a power EMA needs gamma > -1")
    end, start = _steps(end_step, start_step)
    return _power_weights(g, end, start, 0, end + 1)


def constant_ema_weights(decay, end_step, start_step=0) -> np.ndarray:
    """As :func:`ema_weights` for the trainer's constant EMA: update t (from step t − 1 to t) uses
    d_t = min(decay, t / (t + 9)) in float32, exactly as ``ddpm_jax.train_state.ema_decay_at(t − 1,
    decay)`` with ``ema_update`` (weight 1 − d_t of θ_t, also float32); the products in float64.
    Shape ``(end_step + 1,)``; the weights sum to 1 up to the float32 rounding of 1 − d_t."""
    d = _real(decay, "decay")
    if not 0.0 <= d < 1.0:
        raise ValueError(f"decay = {d}: must be in [0, 1)")
    end, start = _steps(end_step, start_step)
    t = np.arange(start + 1, end + 1, dtype=np.float32)
    dt = np.minimum(np.float32(d), (np.float32(1.0) + (t - 1)) / (np.float32(10.0) + (t - 1)))
    one_minus = (np.float32(1.0) - dt).astype(np.float64)
    logd = np.log(dt.astype(np.float64))
    suffix = np.concatenate([np.cumsum(logd[::-1])[::-1], [0.0]])  # suffix[i] = Σ_{j>start+i} log d_j
    w = np.zeros(end + 1)
    w[start] = math.exp(suffix[0])
    w[start + 1:] = one_minus * np.exp(suffix[1:])
    return w


# ------------------------------------------------------------------------------------------------
# Post-hoc reconstruction
# ------------------------------------------------------------------------------------------------


def _check_snapshot(i: int, snap) -> Tuple[int, float, int]:
    try:
        step, gamma, start = snap
    except (TypeError, ValueError):
        raise ValueError(f"snapshot {i}: {snap!r} is not (step, gamma, start_step)") from None
    g = _real(gamma, f"snapshot {i}'s gamma")
    if g <= -1.0:
        raise ValueError(f"snapshot {i}: gamma = {g}: a power EMA needs gamma > -1")
    end, start = _steps(step, start)
    return end, g, start


def solve_posthoc(snapshots: Sequence[Tuple[int, float, int]], target_gamma, target_step, *,
                  sum_to_one: bool = True) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Coefficients x that make Σ_i x_i · snapshot_i the closest combination to the power EMA of
    ``target_gamma`` at ``target_step`` (started at step 0).

    ``snapshots[i] = (step, gamma, start_step)`` describes a stored EMA with the weights
    w⁽ⁱ⁾ = :func:`ema_weights` (gamma, step, start_step) over θ_0..θ_step. With W the matrix whose
    columns are the w⁽ⁱ⁾ of the usable snapshots (step ≤ target_step; the others get x_i = 0), all
    of length target_step + 1, and w = ema_weights(target_gamma, target_step):

        x = argmin ‖W x − w‖₂  subject to Σ_i x_i = 1     (np.linalg.lstsq, float64)

    The constraint (``sum_to_one``; False: the plain least squares) makes the residual weights sum
    to 0, as every column and w sum to 1: a parameter that stays constant in training (the
    ScoreNet's fixed Fourier features) is reconstructed exactly. Without it Σ x_i misses 1 by
    ~1e-4, which moves those features' phases (2π·W·t, |W|·t up to ~10⁴) by radians. It is solved
    in the null space of Σ: x = 1/n + Z y, Z an orthonormal basis of {Σ_i z_i = 0}, y by lstsq
    (minimum norm if W is rank-deficient).

    W is reduced block by block of steps to its R factor (QR of [W | w]), so memory is
    O(block · snapshots), not O(target_step · snapshots); lstsq then solves R's system, the same
    minimiser. The residual r = W x − w is then computed exactly, block by block.

    Returns ``(x, info)``: x of shape ``(len(snapshots),)``, float64; info = {"residual_l1": ‖r‖₁,
    "residual_l2": ‖r‖₂, "num_snapshots": the number of usable snapshots, "coefficients_sum": Σ x_i}.
    The reconstruction differs from the EMA it approximates by Σ_k r_k θ_k, so per parameter
    |reconstruction − EMA| ≤ residual_l1 · max_k |θ_k| (plus the rounding of the stored snapshots,
    about Σ|x_i| · their ulp); with Σ r_k = 0 also ≤ residual_l1 / 2 · (max_k θ_k − min_k θ_k).

    Raises:
      ValueError: a malformed snapshot or target, or no snapshot at or before ``target_step``.
    """
    g_t = _real(target_gamma, "target_gamma")
    if g_t <= -1.0:
        raise ValueError(f"target_gamma = {g_t}: a power EMA needs gamma > -1")
    end, _ = _steps(target_step, 0)
    snaps = [_check_snapshot(i, s) for i, s in enumerate(snapshots)]
    usable = [i for i, (step, _, _) in enumerate(snaps) if step <= end]
    if not usable:
        first = min((s[0] for s in snaps), default=None)
        raise ValueError(f"no EMA snapshot at or before step {end}" + (f" (the first is at step {first})" if snaps else ""))
    n = len(usable)
    block = max(64, _BLOCK_ENTRIES // (n + 1))

    def columns(lo, hi):
        cols = [_power_weights(snaps[i][1], snaps[i][0], snaps[i][2], lo, hi) for i in usable]
        return np.stack(cols, axis=1), _power_weights(g_t, end, 0, lo, hi)

    r = np.zeros((0, n + 1))
    for lo in range(0, end + 1, block):
        w_blk, t_blk = columns(lo, min(end + 1, lo + block))
        r = np.linalg.qr(np.vstack([r, np.concatenate([w_blk, t_blk[:, None]], axis=1)]), mode="r")
    r = np.vstack([r, np.zeros((max(0, n + 1 - r.shape[0]), n + 1))])
    r11, c = r[:n, :n], r[:n, n]
    if not sum_to_one:
        x_used = np.linalg.lstsq(r11, c, rcond=None)[0]
    else:
        x0 = np.full(n, 1.0 / n)
        z = np.linalg.qr(np.ones((n, 1)), mode="complete")[0][:, 1:]  # (n, n − 1), orthogonal to the ones
        x_used = x0 + z @ np.linalg.lstsq(r11 @ z, c - r11 @ x0, rcond=None)[0] if n > 1 else x0

    l1 = l2sq = 0.0
    for lo in range(0, end + 1, block):
        w_blk, t_blk = columns(lo, min(end + 1, lo + block))
        res = w_blk @ x_used - t_blk
        l1 += float(np.abs(res).sum())
        l2sq += float(res @ res)
    x = np.zeros(len(snaps))
    x[usable] = x_used
    return x, {"residual_l1": l1, "residual_l2": math.sqrt(l2sq), "num_snapshots": n,
               "coefficients_sum": float(x_used.sum())}


def reconstruct(trees: Iterable[Any], coeffs):
    """Σ_i coeffs_i · tree_i leaf by leaf (``jax.tree_util``; every tree of the same structure and
    shapes), accumulated in float64 and cast back to the leaves' dtype; NumPy leaves.

    ``trees`` is consumed once, one tree at a time (a generator that reads snapshot files keeps
    one in memory). ``coeffs`` of shape ``(n,)`` gives one tree; of shape ``(m, n)``, a list of m
    trees (row j's combination), from the same single pass. A tree whose coefficients are all 0
    is not read beyond its structure.
    """
    import jax

    c = np.asarray(coeffs, np.float64)
    if c.ndim not in (1, 2) or not np.all(np.isfinite(c)):
        raise ValueError(f"coeffs must be a finite vector (n,) or matrix (m, n), got shape {c.shape}")
    single = c.ndim == 1
    c = c[None] if single else c
    m, n = c.shape
    treedef = shapes = dtypes = acc = None
    count = 0
    for i, tree in enumerate(trees):
        if i >= n:
            raise ValueError(f"more trees than the {n} coefficients")
        leaves, td = jax.tree_util.tree_flatten(tree)
        if treedef is None:
            treedef = td
            shapes = [tuple(np.shape(x)) for x in leaves]
            dtypes = [np.dtype(getattr(x, "dtype", np.float64)) for x in leaves]
            acc = [[np.zeros(s) for s in shapes] for _ in range(m)]
        elif td != treedef or [tuple(np.shape(x)) for x in leaves] != shapes:
            raise ValueError(f"tree {i} differs in structure or shapes from tree 0")
        count += 1
        if not np.any(c[:, i]):
            continue
        for j, leaf in enumerate(leaves):
            x = np.asarray(leaf, np.float64)
            for row in range(m):
                if c[row, i] != 0.0:
                    acc[row][j] += c[row, i] * x
    if count != n:
        raise ValueError(f"{count} trees for {n} coefficients")
    out = [treedef.unflatten([a.astype(dt) for a, dt in zip(row, dtypes)]) for row in acc]
    return out[0] if single else out


# ------------------------------------------------------------------------------------------------
# Snapshot files
# ------------------------------------------------------------------------------------------------


def snapshot_path(workdir: str, step: int) -> str:
    """``<workdir>/ema_snapshots/<step>.msgpack``."""
    return os.path.join(workdir, SNAPSHOT_DIR, f"{int(step)}.msgpack")


def write_snapshot(workdir: str, step: int, start_step: int, sigma_rels: Sequence[float], trees: Sequence[Any]) -> str:
    """Writes the power EMAs ``trees`` (one params tree per σ_rel, started at ``start_step``) of
    ``step`` to :func:`snapshot_path` atomically (a reader sees the old file or the new one; the
    same step's file is replaced). The file is ``flax.serialization.msgpack_serialize`` of

        {"step": int, "start_step": int, "sigma_rels": [float], "gammas": [float],
         "tracks": {"0": state dict of trees[0], "1": …}}

    with NumPy leaves (γ from :func:`gamma_from_sigma_rel`). Returns the path."""
    import flax.serialization
    import jax

    from ddpm_jax.files import atomic_path

    end, start = _steps(step, start_step)
    sigma_rels = [_real(s, "sigma_rel") for s in sigma_rels]
    trees = list(trees)
    if len(trees) != len(sigma_rels):
        raise ValueError(f"{len(trees)} trees for {len(sigma_rels)} sigma_rels")
    payload = {
        "step": end, "start_step": start, "sigma_rels": sigma_rels,
        "gammas": [float(gamma_from_sigma_rel(s)) for s in sigma_rels],
        "tracks": {str(i): jax.tree_util.tree_map(np.asarray, jax.device_get(flax.serialization.to_state_dict(t)))
                   for i, t in enumerate(trees)},
    }
    data = flax.serialization.msgpack_serialize(payload)
    path = snapshot_path(workdir, end)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _read_header(path: str) -> Dict[str, Any]:
    """The entries of a snapshot's top-level map before "tracks" (``msgpack_serialize`` writes the
    keys sorted, so all the others), without reading the arrays; {} where that cannot be done."""
    import flax.serialization
    import msgpack

    ext_hook = getattr(flax.serialization, "_msgpack_ext_unpack", msgpack.ExtType)  # NumPy values as flax wrote them
    try:
        with open(path, "rb") as f:
            unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False, ext_hook=ext_hook)
            out = {}
            for _ in range(unpacker.read_map_header()):
                key = unpacker.unpack()
                if key == "tracks":
                    break
                out[key] = unpacker.unpack()
            return out
    except Exception:  # noqa: BLE001  (damaged: the full read names the problem)
        return {}


def read_snapshot(path: str, tracks: bool = True) -> Dict[str, Any]:
    """One snapshot file as ``{"step", "start_step", "sigma_rels", "gammas", "tracks", "path"}``:
    ``tracks`` a list of state dicts (nested dicts of NumPy arrays), one per σ_rel. With
    ``tracks=False`` only the entries before the arrays are read (a damaged array part shows at the
    full read). ValueError (one line naming the file) if it is not a complete snapshot."""
    import flax.serialization

    obj = _read_header(path) if not tracks else {}
    if not {"step", "start_step", "sigma_rels", "gammas"} <= set(obj):
        with open(path, "rb") as f:
            data = f.read()
        try:
            obj = flax.serialization.msgpack_restore(data)
        except Exception as e:  # noqa: BLE001  (msgpack raises several types for a torn file)
            raise ValueError(f"{path} is not a readable EMA snapshot ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'damaged'}); move it away") from None
    else:
        obj["tracks"] = {str(i): None for i in range(len(obj["sigma_rels"]))} if isinstance(obj["sigma_rels"], list) else None

    def bad(why):
        return ValueError(f"{path} is not a valid EMA snapshot: {why}; move it away")

    if not isinstance(obj, dict) or not {"step", "start_step", "sigma_rels", "gammas", "tracks"} <= set(obj):
        raise bad("it lacks step, start_step, sigma_rels, gammas or tracks")
    step, start = obj["step"], obj["start_step"]
    if not (_is_int(step) and _is_int(start) and 0 <= start <= step):
        raise bad(f"step {step!r}, start_step {start!r}")
    sig, gam, trk = obj["sigma_rels"], obj["gammas"], obj["tracks"]
    if not (isinstance(sig, list) and isinstance(gam, list) and isinstance(trk, dict)
            and len(sig) == len(gam) == len(trk) and set(trk) == {str(i) for i in range(len(sig))}):
        raise bad("sigma_rels, gammas and tracks do not match")
    try:
        sig, gam = [float(s) for s in sig], [float(g) for g in gam]
    except (TypeError, ValueError):
        raise bad("sigma_rels and gammas must be numbers") from None
    if not all(math.isfinite(g) and g > -1.0 for g in gam):
        raise bad(f"gammas {gam}")
    out = {"step": int(step), "start_step": int(start), "sigma_rels": sig, "gammas": gam, "path": path}
    if tracks:
        out["tracks"] = [trk[str(i)] for i in range(len(sig))]
    return out


def read_snapshots(workdir: str, tracks: bool = True) -> List[Dict[str, Any]]:
    """The run's snapshots (:func:`read_snapshot` of each ``<workdir>/ema_snapshots/<step>.msgpack``),
    sorted by step. ``tracks=False`` leaves the arrays out and does not read them.

    Raises:
      FileNotFoundError: no snapshot directory or no snapshot in it (one line saying how a run
        gets them).
      ValueError: a damaged file, or one whose step differs from its name (naming it).
    """
    directory = os.path.join(os.path.abspath(workdir), SNAPSHOT_DIR)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"the run in {os.path.abspath(workdir)} has no EMA snapshots ({directory} does not "
                                f"exist): {_HOW_TO_SNAPSHOT}")
    named = sorted((int(m.group(1)), name) for name in os.listdir(directory) if (m := _SNAPSHOT_NAME.match(name)))
    if not named:
        raise FileNotFoundError(f"{directory} holds no EMA snapshots (<step>.msgpack): {_HOW_TO_SNAPSHOT}")
    out = []
    for step, name in named:
        snap = read_snapshot(os.path.join(directory, name), tracks=tracks)
        if snap["step"] != step:
            raise ValueError(f"{snap['path']} holds step {snap['step']}, not the {step} of its name; move it away")
        out.append(snap)
    return out
