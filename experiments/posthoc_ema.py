"""Post-hoc EMA: power-function EMAs of any width, reconstructed from a run's EMA snapshots.

    python -m experiments.posthoc_ema --workdir runs/mnist --sigma_rel 0.03,0.05,0.1
    python -m experiments.posthoc_ema --workdir runs/mnist --sigma_rel 0.07 --step 20000 --out_dir runs/mnist_phema

A run trained with ``train.ema_snapshot_sigma_rels`` (e.g. ``(0.05, 0.10)``) stores those power
EMAs with each checkpoint in ``<workdir>/ema_snapshots/<step>.msgpack`` (``ddpm_jax.ema``). For
each ``--sigma_rel`` this finds the combination of every stored EMA (each snapshot's each width is
one basis function) closest to the power EMA of that width at step ``--step`` (default: the newest
snapshot's; only snapshots up to it are used), by least squares over the steps
(``ddpm_jax.ema.solve_posthoc``), and writes the combined params as a run of their own:

    <out_dir>/sigma_rel_<v>/config.json        the run's config with train.ema = 'power',
                                               train.ema_sigma_rel = v, no snapshots
    <out_dir>/sigma_rel_<v>/checkpoints/<S>/   params = EMA params = the reconstruction,
                                               a fresh optimiser; meta["posthoc_ema"]: the fit
    <out_dir>/posthoc_ema.json                 the fits of this command and its provenance

``<out_dir>`` defaults to ``<workdir>/posthoc_ema``. ``experiments.sample``, ``experiments.evaluate``
and ``experiments.score_checkpoints`` read each ``sigma_rel_<v>`` as any run. The fit's
``residual_l1`` bounds the reconstruction's error: per parameter, at most residual_l1 times the
largest magnitude the parameter had in training.

Every check (the run, its snapshots, the widths, ``--step``, free output directories) is made
before anything is written; a failure is one ``error:`` line and exit code 2 (4 when an output
cannot be written). Each run directory is written whole or not at all; an existing non-empty one
is replaced only with ``--overwrite``.
"""

import os

from absl import app, flags, logging

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A run directory whose config set train.ema_snapshot_sigma_rels.")
flags.DEFINE_string("sigma_rel", None, "Comma-separated relative EMA widths to reconstruct, e.g. 0.03,0.05,0.1 "
                    "(each in (0, 0.3003]).")
flags.DEFINE_integer("step", None, "The training step to reconstruct the EMAs at (default: the newest snapshot's); "
                     "only snapshots up to it are used.", lower_bound=0)
flags.DEFINE_string("out_dir", None, "Where the runs go (default: <workdir>/posthoc_ema).")
flags.DEFINE_boolean("overwrite", False, "Replace existing non-empty sigma_rel_<v> run directories.")
flags.mark_flags_as_required(["workdir", "sigma_rel"])


def parse_sigma_rels(text: str):
    """``'0.03,0.05,0.1'`` (or ``'(0.05, 0.1)'``) → ``[0.03, 0.05, 0.1]``, each checked by
    ``ddpm_jax.ema.gamma_from_sigma_rel``; ValueError (one line) otherwise."""
    from ddpm_jax import ema

    parts = [p.strip() for p in text.strip().strip("()[]").split(",") if p.strip()]
    if not parts:
        raise ValueError(f"--sigma_rel {text!r}: give one or more widths, e.g. 0.05,0.1")
    out = []
    for p in parts:
        try:
            value = float(p)
        except ValueError:
            raise ValueError(f"--sigma_rel {text!r}: {p!r} is not a number") from None
        try:
            ema.gamma_from_sigma_rel(value)
        except ValueError as e:
            raise ValueError(f"--sigma_rel: {e}") from None
        out.append(value)
    names = [run_name(v) for v in out]
    if len(set(names)) != len(names):
        raise ValueError(f"--sigma_rel {text!r} names a width twice")
    return out


def run_name(sigma_rel: float) -> str:
    """``sigma_rel_0.05`` for 0.05: the shortest decimal that reads back as the same float."""
    return f"sigma_rel_{float(sigma_rel)!r}"


def plan(workdir: str, sigma_rels, step, out_dir: str, overwrite: bool):
    """Reads and checks everything, writes nothing: the config, the snapshots (no arrays), the
    step S, the image shape and the source checkpoint's meta, and per width its γ, coefficients and
    fit. ValueError / FileNotFoundError / CheckpointError (one line) for bad input."""
    from ddpm_jax import ema, run_writer
    from ddpm_jax.checkpointing import Checkpointer, read_config_json

    config = read_config_json(workdir)
    if config is None:
        raise FileNotFoundError(f"no training run in {workdir} (no config.json)")
    snaps = ema.read_snapshots(workdir, tracks=False)
    newest = snaps[-1]["step"]
    step = newest if step is None else int(step)
    usable = [s for s in snaps if s["step"] <= step]
    if not usable:
        raise ValueError(f"--step {step} is earlier than every EMA snapshot (the first is at step {snaps[0]['step']})")
    if step > newest:
        raise ValueError(f"--step {step} is after the newest EMA snapshot (step {newest}): the params after it are "
                         "in no snapshot")
    basis = [(s["step"], g, s["start_step"]) for s in usable for g in s["gammas"]]
    if not basis:
        raise ValueError(f"the EMA snapshots in {workdir} up to step {step} hold no tracks")

    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoints in {workdir}: the image shape of the run is unknown")
    ckpt = Checkpointer(ckpt_dir, every_steps=1, keep=10**6)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir}: the image shape of the run is unknown")
        source_meta = ckpt.read_meta(step) if step in steps else {}
        image_shape = source_meta.get("image_shape") or ckpt.read_meta().get("image_shape")
    finally:
        ckpt.close()
    if not image_shape:
        raise ValueError(f"the checkpoints in {ckpt_dir} do not record the image shape (meta 'image_shape')")

    targets = []
    for v in sigma_rels:
        path = os.path.join(out_dir, run_name(v))
        if not overwrite and not run_writer.is_free(path):
            raise ValueError(f"{path} is not empty: give another --out_dir or --overwrite")
        gamma = ema.gamma_from_sigma_rel(v)
        coeffs, info = ema.solve_posthoc(basis, gamma, step)
        targets.append({"sigma_rel": v, "gamma": gamma, "path": path, "coefficients": coeffs, **info})
    return {"config": config, "snapshots": usable, "basis": basis, "step": step, "image_shape": list(image_shape),
            "source_meta": source_meta, "targets": targets}


def tracks(snapshots):
    """Every track of every snapshot, in the order of the basis, one file in memory at a time."""
    from ddpm_jax import ema

    for s in snapshots:
        yield from ema.read_snapshot(s["path"])["tracks"]


def shown(path: str) -> str:
    """``path`` relative to the current directory when it lies below it, else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def state_for(config, params, step: int, spe: int):
    """The TrainState of ``step`` with params = EMA params = ``params``, a fresh optimiser state and
    the run's training key, as ``ddpm_jax.pretrained.initial_state`` builds one."""
    import jax.numpy as jnp

    from ddpm_jax import rng
    from ddpm_jax.train_state import create_train_state, make_optimizer

    tx = make_optimizer(config.optim, steps_per_epoch=spe, params=params)
    state = create_train_state(params, tx, rng.run_keys(int(config.seed))[1])
    return state.replace(step=jnp.asarray(step, jnp.int32))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    import copy

    import flax.serialization
    import jax
    import jax.numpy as jnp
    import ml_collections

    from ddpm_jax import data, ema, provenance, run_writer
    from ddpm_jax.checkpointing import CheckpointError
    from ddpm_jax.files import check_writable, os_error_line, write_json
    from ddpm_jax.models import model_from_config

    workdir = os.path.abspath(os.path.expanduser(FLAGS.workdir))
    out_dir = os.path.abspath(os.path.expanduser(FLAGS.out_dir or os.path.join(workdir, "posthoc_ema")))
    try:
        sigma_rels = parse_sigma_rels(FLAGS.sigma_rel)
        p = plan(workdir, sigma_rels, FLAGS.step, out_dir, FLAGS.overwrite)
        config = ml_collections.ConfigDict(p["config"])
        step, meta0 = p["step"], p["source_meta"]
        spe = int(meta0.get("steps_per_epoch") or data.steps_per_epoch(int(config.data.train_size),
                                                                       int(config.train.batch_size)))
        model = model_from_config(config.model, tuple(p["image_shape"]))
        abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *p["image_shape"]), jnp.float32),
                                  jnp.ones((1,), jnp.float32))["params"]
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        cli.fail(e)
    try:
        check_writable(out_dir, "--out_dir", need_bytes=2**20)
    except OSError as e:
        cli.fail(os_error_line(e), cli.EXIT_WRITE_FAILED)

    try:
        recons = ema.reconstruct(tracks(p["snapshots"]), [t["coefficients"] for t in p["targets"]])
        expected = flax.serialization.to_state_dict(abstract)
        want = [(tuple(x.shape), jnp.dtype(x.dtype)) for x in jax.tree_util.tree_leaves(expected)]
        got = [(tuple(x.shape), jnp.dtype(x.dtype)) for x in jax.tree_util.tree_leaves(recons[0])]
        if jax.tree_util.tree_structure(recons[0]) != jax.tree_util.tree_structure(expected) or got != want:
            raise ValueError(f"the EMA snapshots in {os.path.join(workdir, ema.SNAPSHOT_DIR)} do not hold this run's "
                             f"network ({len(got)} arrays; the config's model has {len(want)} of other names or shapes)")
        recons = [flax.serialization.from_state_dict(abstract, r) for r in recons]
    except ValueError as e:
        cli.fail(e)

    rows = []
    for target, params in zip(p["targets"], recons):
        cfg = copy.deepcopy(p["config"])
        cfg["train"].update(ema="power", ema_sigma_rel=target["sigma_rel"], ema_snapshot_sigma_rels=[],
                            t_sampling="uniform")
        state = state_for(config, jax.tree_util.tree_map(jnp.asarray, params), step, spe)
        fit = {"sigma_rel": target["sigma_rel"], "gamma": target["gamma"],
               "coefficients": [float(c) for c in target["coefficients"]],
               "snapshot_steps": [b[0] for b in p["basis"]],
               "snapshot_sigma_rels": [s for snap in p["snapshots"] for s in snap["sigma_rels"]],
               "residual_l1": target["residual_l1"], "residual_l2": target["residual_l2"],
               "source_workdir": provenance.relative(workdir)}
        meta = {"step": step, "epoch": meta0.get("epoch", step // spe),
                "step_in_epoch": meta0.get("step_in_epoch", step % spe), "steps_per_epoch": spe,
                "image_shape": p["image_shape"], "posthoc_ema": fit}
        if "wall_seconds" in meta0:
            meta["wall_seconds"] = meta0["wall_seconds"]
        try:
            path = run_writer.write_run(target["path"], cfg, state, meta, overwrite=FLAGS.overwrite)
        except OSError as e:
            cli.fail(os_error_line(e), cli.EXIT_WRITE_FAILED)
        except ValueError as e:
            cli.fail(e)
        rows.append({**{k: v for k, v in fit.items() if k != "source_workdir"},
                     "step": step, "path": provenance.relative(path)})
        print(f"sigma_rel {target['sigma_rel']:g} (gamma {target['gamma']:.3f}) at step {step}: "
              f"{target['num_snapshots']} snapshot EMAs, residual l1 {target['residual_l1']:.2e}, "
              f"l2 {target['residual_l2']:.2e} -> {shown(path)}", flush=True)
    report = {"workdir": provenance.relative(workdir), "step": step, "rows": rows, "provenance": provenance.record()}
    try:
        write_json(os.path.join(out_dir, "posthoc_ema.json"), report)
    except OSError as e:
        cli.fail(os_error_line(e), cli.EXIT_WRITE_FAILED)
    print(f"sample with: python -m experiments.sample --workdir {shown(p['targets'][0]['path'])}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
