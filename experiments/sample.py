"""Draw samples from a trained run.

    python -m experiments.sample --workdir runs/mnist --method eps_ddpm --num 1000
    python -m experiments.sample --workdir runs/mnist --method ddim --num_steps 50 --num 1000
    python -m experiments.sample --workdir runs/mnist_cond --class 7 --guidance 2.0 --num 100   # class-conditional runs
    python -m experiments.sample --workdir runs/mnist_cond --class all --num 100                # ten of each digit

Restores the latest checkpoint (EMA params unless ``--params=raw``), samples in batches (one
compiled ``lax.scan`` serves every batch) with a progress bar, and writes
``<out>/samples.npz`` (``samples``: (N, H, W, C) in the data's scale; ``images``: the same mapped
to [0, 1] and clipped; ``meta``: the sampler's options, seed, step, params and the command's
provenance, which ``experiments.evaluate --samples`` reports) and ``<out>/grid.png`` (the first 100). ``<out>`` defaults to
``<workdir>/samples/<tag>`` with ``ddpm_jax.runs.sampling_tag``'s name for the options
(e.g. ``eps_ddpm``, ``eps_ddpm_posterior``, ``ddim_steps50_eta0``). A class-conditional run draws
the classes of ``--class`` (one, a comma-separated list, or ``all``; the samples are split into
equal blocks, one per class, and the grid shows a row of each) with guidance ``--guidance``;
``samples.npz`` then also holds ``labels``, and the tag names the classes and w. A student written
by ``experiments.distill`` samples with the DDIM steps on the grid it was distilled for; any other
sampler or step count is refused in one line (``ddpm_jax.config.check_distilled_sampler``).

The output directory is checked writable (with room for the file) before sampling starts, and
both files are written to a temporary name and renamed: an interrupted run leaves the earlier
``samples.npz`` and ``grid.png`` as they were. Sampling needs no lock and works beside a running
trainer (it reads the newest complete checkpoint).
"""

import math
import os
import time

from absl import app, flags

from experiments import cli, sampler_flags

FLAGS = flags.FLAGS
sampler_flags.define(num=1000, batch_size=250)
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("out", None, "Output directory (default under <workdir>/samples/).")
flags.DEFINE_string("class", None, "Class-conditional runs: the class to draw, a comma-separated list, or 'all' "
                    "(default: no class, i.e. unconditional samples).")


def class_labels(spec, num: int, num_classes: int):
    """(classes, labels (num,) int32) for ``--class``: sample i gets ``classes[i * len(classes) // num]``
    (equal blocks in order); (None, None) without ``--class``. ValueError (one line) for a bad spec."""
    import numpy as np

    if spec is None:
        return None, None
    if not num_classes:
        raise ValueError("--class: this run's model is unconditional (model.num_classes = 0)")
    try:
        classes = list(range(num_classes)) if spec == "all" else [int(c) for c in spec.split(",")]
    except ValueError:
        raise ValueError(f"--class={spec!r}: give a class, a comma-separated list, or 'all'") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--class={spec!r}: class {bad[0]} is not in 0..{num_classes - 1}")
    if num < len(classes):
        raise ValueError(f"--num={num} is fewer than the {len(classes)} classes asked for")
    return classes, np.asarray([classes[i * len(classes) // num] for i in range(num)], np.int32)


def _devices(batch_size: int) -> str:
    import jax

    from ddpm_jax import data

    sharding = data.batch_sharding(batch_size)  # the split make_sampler uses
    return f"{1 if sharding is None else len(sharding.device_set)} {jax.devices()[0].platform} device(s)"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    sampler_flags.quiet_logs()
    import jax
    import numpy as np

    from ddpm_jax import data, plots, provenance, sampling
    from ddpm_jax.checkpointing import CheckpointError
    from ddpm_jax.files import check_writable, os_error_line
    from ddpm_jax.runs import sampling_tag
    from ddpm_jax.sample_files import save_samples

    try:
        run, opts = sampler_flags.run_and_options()
        classes, labels = class_labels(FLAGS["class"].value, FLAGS.num, run.num_classes)
        if opts.get("guidance") and labels is None:
            raise ValueError(f"--guidance={opts['guidance']:g} needs --class (the classes to draw)")
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        cli.fail(str(e))

    method, clip = opts["method"], opts["clip_x0"] is not None
    tag = sampling_tag(opts) + ("" if classes is None else "_class" + ("all" if FLAGS["class"].value == "all"
                                                                         else "-".join(map(str, classes))))
    out = os.path.abspath(FLAGS.out or os.path.join(run.workdir, "samples", tag))
    # samples and their [0, 1] copy, float32, uncompressed at worst, plus the grid: room for twice that
    need = 2 * 2 * FLAGS.num * math.prod(run.image_shape) * 4 + 2**20
    try:
        check_writable(out, "--out" if FLAGS.out else "the samples directory", need_bytes=need)
    except OSError as e:
        cli.fail(os_error_line(e), cli.EXIT_WRITE_FAILED)
    batch_size = min(FLAGS.batch_size, FLAGS.num)  # a batch never holds more than the samples asked for
    one_batch = run.make_sampler(batch_size, opts, ema=FLAGS.params == "ema")

    grid = f" on the distilled grid {run.distilled_grid}" if run.distilled_grid else ""
    print(f"run {run.workdir} step {run.step} ({FLAGS.params} params); {method}{' (x̂_0 clipped)' if clip else ''}, "
          f"{opts['num_steps'] or run.schedule.num_steps} steps{grid}; {FLAGS.num} samples in batches of {batch_size}"
          f" on {_devices(batch_size)}", flush=True)
    t0 = time.time()
    y0 = None if labels is None else labels[:batch_size]
    if y0 is not None and y0.shape[0] < batch_size:
        y0 = np.resize(y0, batch_size)
    compiled = one_batch.compile(jax.random.PRNGKey(0), y0)  # one program per batch, compiled once
    t_compile = time.time() - t0
    t0 = time.time()
    x = sampling.sample_in_batches(compiled, FLAGS.num, batch_size, jax.random.PRNGKey(FLAGS.seed), labels=labels)
    dt = time.time() - t0
    meta = {"sampler": opts, "sampler_tag": tag, "seed": FLAGS.seed, "step": run.step, "params": FLAGS.params,
            "workdir": provenance.relative(run.workdir), "num": FLAGS.num, "batch_size": batch_size,
            "classes": classes, "sample_seconds": round(dt, 3), "compile_seconds": round(t_compile, 3),
            "provenance": provenance.record()}
    try:
        save_samples(os.path.join(out, "samples.npz"), np.asarray(x), scale=run.data_scale, labels=labels, meta=meta)
        title = f"{method}, step {run.step}"
        if classes is None:
            images, ncol = x[:100], 0
        else:  # a row per class (up to 10 of each)
            images = np.concatenate([x[labels == c][:10] for c in classes])
            ncol = min(10, int(np.min([np.sum(labels == c) for c in classes])))
            title += f", classes {FLAGS['class'].value}, guidance {opts['guidance']:g}"
        plots.save_image_grid(np.asarray(data.unscale_images(images, run.data_scale)), os.path.join(out, "grid.png"),
                              ncol=ncol, title=title)
    except OSError as e:
        cli.fail(os_error_line(e), cli.EXIT_WRITE_FAILED)
    print(f"{FLAGS.num} samples in {dt:.1f}s ({FLAGS.num / dt:.1f} images/s; compile {t_compile:.1f}s) -> "
          f"{out}/samples.npz, {out}/grid.png", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
