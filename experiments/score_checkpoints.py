"""Score the checkpoints a run kept: sample quality against training time.

    python -m experiments.score_checkpoints --workdir runs/mnist_unet --num 2000

For each kept checkpoint (or ``--steps``; a params run such as ``pretrained/mnist_unet`` has one)
this draws ``--num`` samples from the EMA params with the run's configured sampler (or ``--method``
/ ``--num_steps`` / ``--eta``) and scores them against the test split (``ddpm_jax.evaluation``:
pixel and classifier FID with their real-vs-real floors at the same N, the lecture's table).
Training time is the checkpoint's ``wall_seconds`` (the trainer's wall clock up to that step,
compilation and in-run evaluation included). With a constant learning rate after warm-up, the
checkpoint at minute m stands for a run stopped at minute m.

Writes, atomically after every checkpoint (an interrupted call keeps the rows it finished, and a
rerun with the same sampler, N and seed adds to them), ``<out_dir>/checkpoints_<sampler>_n<N>.json``
and ``fid_vs_minutes_<sampler>_n<N>.png`` (``_seed<S>`` added for a seed other than 0;
``--out_dir`` defaults to ``<workdir>/eval``). Reading checkpoints needs no lock: it works beside a
running trainer.
"""

import os
import time

from absl import app, flags

from experiments import cli

FLAGS = flags.FLAGS
cli.define_scoring_flags("checkpoint")
flags.DEFINE_string("steps", "", "Comma-separated checkpoint steps (default: every kept checkpoint).")
flags.DEFINE_string("method", None, "Sampler (default: the run's config.sampling.method).")
flags.DEFINE_integer("num_steps", None, "DDIM steps (default: the run's config.sampling.num_steps, else T).")
flags.DEFINE_float("eta", None, "DDIM eta in [0, 1] (default: the run's config.sampling.eta, else 0).")


def _steps(workdir: str):
    """The checkpoint steps to score: --steps, each checked to exist, else every kept one (a params
    run, ``ddpm_jax.run_writer.write_params_run``, has one)."""
    from ddpm_jax.checkpointing import CheckpointError
    from ddpm_jax.runs import saved_steps

    try:
        kept = saved_steps(workdir)
    except CheckpointError as e:
        cli.fail(e)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not FLAGS.steps:
        if not kept:
            cli.fail(f"no checkpoint in {ckpt_dir}")
        return kept
    try:
        asked = sorted({int(s) for s in FLAGS.steps.split(",") if s.strip()})
    except ValueError:
        cli.fail(f"--steps={FLAGS.steps!r}: expected comma-separated integers")
    missing = [s for s in asked if s not in kept]
    if missing:
        cli.fail(f"--steps: {ckpt_dir} has no checkpoint of step {', '.join(map(str, missing))} "
                 f"(it has: {', '.join(map(str, kept)) or 'none'})")
    return asked


def _row(report, run) -> dict:
    wall = run.meta.get("wall_seconds")
    return {"step": run.step, "epoch": run.step / run.meta["steps_per_epoch"],
            "wall_minutes": None if wall is None else wall / 60.0, "report": report}


def _plot(out: dict, path: str) -> None:
    from ddpm_jax import plots

    rows = [r for r in out["rows"] if r["wall_minutes"] is not None]
    if not rows:
        return
    x = [r["wall_minutes"] for r in rows]
    series, floors = {}, {}
    for key, name in (("fid_classifier", "classifier"), ("fid_pixel", "pixel")):
        if rows[-1]["report"].get(key):
            series[f"{name} FID vs test"] = (x, [r["report"][key]["test"] for r in rows])
            floors[f"{name} FID floor (real vs real)"] = rows[-1]["report"][key]["floor_train_vs_test"]
    plots.save_line_plot(series, path, xlabel="training minutes (wall clock)", ylabel=f"FID (N={out['num_samples']})",
                         logy=True, title=f"{os.path.basename(out['workdir'])}: {out['sampler_tag']}", hlines=floors)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from experiments import sampler_flags

    sampler_flags.quiet_logs()
    from ddpm_jax import platform_profile

    platform_profile.setup(FLAGS.platform, cpu_devices=FLAGS.cpu_devices, batch_sizes=[FLAGS.batch_size])
    import jax
    import numpy as np

    from ddpm_jax import provenance, sampling
    from ddpm_jax.checkpointing import CheckpointError
    from ddpm_jax.evaluation import evaluate_samples
    from ddpm_jax.files import os_error_line, write_json
    from ddpm_jax.runs import load_run, sampling_tag

    steps = _steps(os.path.abspath(FLAGS.workdir))
    workdir, out_dir, run, splits, opts = cli.load_scoring_run(
        steps[0], lambda run: run.sampler_options(FLAGS.method, num_steps=FLAGS.num_steps, eta=FLAGS.eta))
    tag = sampling_tag(opts)
    name = f"{tag}_n{FLAGS.num}" + (f"_seed{FLAGS.seed}" if FLAGS.seed else "")
    json_path = os.path.join(out_dir, f"checkpoints_{name}.json")
    sampler = {k: v for k, v in opts.items() if k != "clip_x0"}
    out = {"workdir": provenance.relative(workdir), "sampler": sampler, "sampler_tag": tag, "clip_x0": opts["clip_x0"],
           "num_samples": FLAGS.num, "seed": FLAGS.seed, "rows": []}
    out["rows"] = cli.earlier_rows(json_path, out, ("workdir", "sampler", "num_samples", "seed"))  # kept, not sampled again
    done = {r["step"] for r in out["rows"]} & set(steps)
    key = jax.random.PRNGKey(FLAGS.seed)
    print(f"{workdir}: steps {', '.join(map(str, steps))}; {tag}, N={FLAGS.num}"
          + (f" (reusing {', '.join(map(str, sorted(done)))})" if done else ""), flush=True)
    for step in steps:
        if step in done:
            continue
        try:
            run = load_run(workdir, step)
        except (FileNotFoundError, CheckpointError) as e:
            cli.fail(e)
        t0 = time.time()
        x = sampling.sample_in_batches(run.make_sampler(FLAGS.batch_size, opts), FLAGS.num, FLAGS.batch_size, key)
        seconds = time.time() - t0
        report = evaluate_samples(np.asarray(x), splits, scale=run.data_scale, seed=FLAGS.seed)
        report["sample_seconds"] = seconds
        row = _row(report, run)
        row["provenance"] = provenance.record(wall_s=seconds)
        out["rows"] = sorted(out["rows"] + [row], key=lambda r: r["step"])
        out["provenance"] = provenance.record()
        try:
            write_json(json_path, out)
            _plot(out, os.path.join(out_dir, f"fid_vs_minutes_{name}.png"))
        except OSError as e:
            cli.fail(os_error_line(e), cli.EXIT_WRITE_FAILED)
        minutes = "?" if row["wall_minutes"] is None else f"{row['wall_minutes']:.1f}"
        fids = ", ".join(f"{name} FID {report[key]['test']:.3f} [floor {report[key]['floor_train_vs_test']:.3f}]"
                         for key, name in (("fid_classifier", "classifier"), ("fid_pixel", "pixel")) if report.get(key))
        print(f"step {step:6d} (epoch {row['epoch']:.1f}, {minutes} min): {fids}, "
              f"div/real {report['sample_quality']['div_real']:.3f} ({seconds:.0f}s to sample)", flush=True)
    print(f"-> {json_path}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
