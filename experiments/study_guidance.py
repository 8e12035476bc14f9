"""Study: fidelity against diversity under classifier-free guidance, for a class-conditional run.

    python -m experiments.study_guidance --workdir runs/mnist_cond --num 2000 [--guidance 0,0.5,1,2,4]

For each guidance w this draws ``--num`` samples, ``--num / K`` of each of the K classes, with the
run's config sampler, and reports (``ddpm_jax.evaluation`` and the project's MNIST classifier):

- ``accuracy``: the fraction of samples the classifier assigns to the class they were drawn for
  (and per class);
- per class: classifier FID of that class's samples against as many test images of that class,
  beside the same-N floor (training images of the class against those test images);
- overall: the scores of ``evaluate_samples`` on all samples (FIDs against the test split with
  their floors, and the lecture's table, diversity ``div_real`` included).

Writes, atomically after each w (a rerun adds the missing ones), ``<out_dir>/guidance_n<N>.json``,
``guidance_n<N>.png`` (classifier FIDs against w, with floors), ``guidance_accuracy_n<N>.png``
(accuracy and div/real against w) and
``guidance_grid_w<w>.png`` (a row of ten samples per class).
"""

import os
import time

from absl import app, flags

from experiments import cli

FLAGS = flags.FLAGS
cli.define_scoring_flags("guidance value")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("guidance", "0,0.5,1,2,4", "Comma-separated guidance values w >= 0.")


def _parse_guidance(text: str):
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        cli.fail(f"--guidance={text!r}: expected comma-separated numbers, e.g. 0,0.5,1,2,4")
    if not values or any(not w >= 0 for w in values):
        cli.fail(f"--guidance={text!r}: every value must be >= 0")
    return values


def per_class_scores(samples01, labels, predicted, test01, test_labels, train01, train_labels, num_classes: int, seed: int):
    """{class: {accuracy, fid_classifier, floor_train_vs_test, n}}: each class's samples (in [0, 1])
    against an equal number of that class's test images (random, ``seed``), the floor from as many
    training images of the class against the same test images."""
    import numpy as np

    from ddpm_jax.metrics import classifier, fid

    rng = np.random.default_rng(seed)
    out = {}
    for c in range(num_classes):
        gen = samples01[labels == c]
        test_c, train_c = test01[test_labels == c], train01[train_labels == c]
        n = min(len(gen), len(test_c), len(train_c))
        if n < 2:
            continue
        real = classifier.features(test_c[rng.permutation(len(test_c))[:n]])
        out[str(c)] = {"n": int(n), "accuracy": float(np.mean(predicted[labels == c] == c)),
                       "fid_classifier": fid.fid_from_features(classifier.features(gen[:n]), real),
                       "floor_train_vs_test": fid.fid_from_features(
                           classifier.features(train_c[rng.permutation(len(train_c))[:n]]), real)}
    return out


def _plots(out: dict, out_dir: str, suffix: str) -> None:
    """``guidance_<suffix>.png``: classifier FIDs against w (log scale) with their real-vs-real
    floors; ``guidance_accuracy_<suffix>.png``: accuracy and div/real against w."""
    from ddpm_jax import plots

    rows = sorted(out["rows"], key=lambda r: r["guidance"])
    ws = [r["guidance"] for r in rows]
    title = f"{os.path.basename(out['workdir'])}, step {out['step']}, N={out['num_samples']}"
    fids = {"per-class classifier FID, mean": (ws, [r["mean_class_fid"] for r in rows]),
            "per-class classifier FID, max": (ws, [r["max_class_fid"] for r in rows]),
            "classifier FID, all samples": (ws, [r["report"]["fid_classifier"]["test"] for r in rows])}
    floors = {"per-class floor, mean": rows[0]["mean_class_floor"],
              "floor, all samples": rows[0]["report"]["fid_classifier"]["floor_train_vs_test"]}
    plots.save_line_plot(fids, os.path.join(out_dir, f"guidance_{suffix}.png"), xlabel="guidance w",
                         ylabel="classifier FID", title=title, logy=True, hlines=floors)
    shares = {"accuracy (drawn as asked)": (ws, [r["accuracy"] for r in rows]),
              "div/real": (ws, [r["report"]["sample_quality"]["div_real"] for r in rows])}
    plots.save_line_plot(shares, os.path.join(out_dir, f"guidance_accuracy_{suffix}.png"), xlabel="guidance w",
                         ylabel="fraction", title=title, hlines={"accuracy bar": 0.99, "real data's diversity": 1.0})


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from experiments import sampler_flags

    sampler_flags.quiet_logs()
    values = _parse_guidance(FLAGS.guidance)
    from ddpm_jax import platform_profile

    platform_profile.setup(FLAGS.platform, cpu_devices=FLAGS.cpu_devices, batch_sizes=[FLAGS.batch_size])
    import jax
    import numpy as np

    from ddpm_jax import data, plots, provenance, sampling
    from ddpm_jax.evaluation import evaluate_samples
    from ddpm_jax.files import os_error_line, write_json
    from ddpm_jax.metrics import classifier

    def prepare(run):
        k = run.num_classes
        if not k:
            raise ValueError(f"{run.workdir} holds an unconditional model (model.num_classes = 0): nothing to guide")
        if FLAGS.num % k:
            raise ValueError(f"--num={FLAGS.num} is not a multiple of the {k} classes")
        if tuple(run.image_shape) != (28, 28, 1):
            raise ValueError(f"the classifier scores 28x28x1 images; this run draws {run.image_shape}")
        return {w: run.sampler_options(guidance=w) for w in values}

    workdir, out_dir, run, splits, options = cli.load_scoring_run(FLAGS.step, prepare)
    k = run.num_classes

    suffix = f"n{FLAGS.num}" + (f"_seed{FLAGS.seed}" if FLAGS.seed else "")
    json_path = os.path.join(out_dir, f"guidance_{suffix}.json")
    sampler = {key: v for key, v in options[values[0]].items() if key not in ("clip_x0", "guidance")}
    out = {"workdir": provenance.relative(workdir), "step": run.step, "num_samples": FLAGS.num, "seed": FLAGS.seed, "sampler": sampler, "rows": []}
    out["rows"] = cli.earlier_rows(json_path, out, ("workdir", "step", "num_samples", "seed", "sampler"))
    done = {r["guidance"] for r in out["rows"]}
    labels = np.repeat(np.arange(k, dtype=np.int32), FLAGS.num // k)
    to01 = lambda x: np.asarray(data.unscale_images(x, run.data_scale), np.float32)  # noqa: E731
    test01, train01 = to01(splits.test), to01(splits.train)
    key = jax.random.PRNGKey(FLAGS.seed)
    print(f"{workdir} step {run.step}: guidance {values}, {FLAGS.num // k} samples of each of {k} classes", flush=True)
    for w in values:
        if w in done:
            continue
        t0 = time.time()
        fn = run.make_sampler(FLAGS.batch_size, options[w]).compile(key, np.resize(labels, FLAGS.batch_size))
        x = np.asarray(sampling.sample_in_batches(fn, FLAGS.num, FLAGS.batch_size, key, labels=labels, progress=False))
        seconds = time.time() - t0
        x01 = to01(x)
        predicted = classifier.predict(x01)
        report = evaluate_samples(x, splits, scale=run.data_scale, seed=FLAGS.seed)
        classes = per_class_scores(x01, labels, predicted, test01, splits.test_labels, train01, splits.train_labels, k,
                                   FLAGS.seed)
        row = {"guidance": w, "accuracy": float(np.mean(predicted == labels)), "seconds": seconds,
               "mean_class_fid": float(np.mean([c["fid_classifier"] for c in classes.values()])),
               "max_class_fid": float(np.max([c["fid_classifier"] for c in classes.values()])),
               "mean_class_floor": float(np.mean([c["floor_train_vs_test"] for c in classes.values()])),
               "classes": classes, "report": report, "provenance": provenance.record(wall_s=seconds)}
        out["rows"].append(row)
        out["provenance"] = provenance.record()
        grid = np.concatenate([x01[labels == c][:10] for c in range(k)])
        try:
            write_json(json_path, out)
            _plots(out, out_dir, suffix)
            plots.save_image_grid(grid, os.path.join(out_dir, f"guidance_grid_w{w:g}.png"), ncol=10,
                                  title=f"guidance w = {w:g}, a row per class")
        except OSError as e:
            cli.fail(os_error_line(e), cli.EXIT_WRITE_FAILED)
        print(f"w {w:4g}: accuracy {row['accuracy']:.4f}, per-class classifier FID mean {row['mean_class_fid']:.2f} "
              f"(max {row['max_class_fid']:.2f}, floor {row['mean_class_floor']:.2f}), overall classifier FID "
              f"{report['fid_classifier']['test']:.2f}, div/real {report['sample_quality']['div_real']:.3f} ({seconds:.0f}s)",
              flush=True)
    print(f"-> {json_path}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
