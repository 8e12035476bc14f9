"""Study: training recipes side by side at equal training compute.

    python -m experiments.study_training --root runs/study_training --num_steps 2436 --score_steps 2436 \\
        --recipes baseline,min_snr,p2,log_normal_edm,importance --out_dir docs/results/study_training/screen
    python -m experiments.study_training --root runs/study_training --num_steps 9750 \\
        --score_steps 2436,4872,7308,9750 --recipes baseline,min_snr --posthoc_sigma_rels 0.05,0.1,0.2 \\
        --out_dir docs/results/study_training/full
    (offline: add --data_path DIR, a directory of the MNIST IDX files)

Every recipe is ``configs/mnist_unet.py`` (or its ``--variant=conditional``) with the overrides
named in that file's ``RECIPES``: the same network, data, batch and seed, so the same training images in the same order; only the loss
weighting, the draw of t or the EMA differ. Each is trained in ``<root>/<recipe>`` by
``experiments.train`` (an existing run there is resumed, or extended to a larger ``--num_steps``:
with a constant learning rate after warm-up, the checkpoint at step s of a longer run is the run
stopped at s), with a checkpoint every ``--checkpoint_every`` steps, then scored at each of
``--score_steps`` by ``experiments.score_checkpoints`` with the config's sampler at N = ``--num``.
With ``--posthoc_sigma_rels`` the runs also track two power EMAs (σ_rel 0.05 and 0.10, saved
with each checkpoint), and ``experiments.posthoc_ema`` reconstructs an EMA of each listed width
at the last step, scored like a checkpoint. Done work is not redone: finished runs are not
retrained and rows already scored are reused, so the command resumes where it stopped.

Writes ``<out_dir>/study_training_n<N>.json`` (a row per recipe and step: steps, training images,
training FLOPs = 3 × the network's forward FLOPs per image × images, wall minutes of training,
classifier and pixel FID against the test split with their floors, div/real) and
``fid_vs_images_n<N>.png`` / ``fid_vs_minutes_n<N>.png`` (classifier FID, a curve per recipe).
"""

import json
import os
import subprocess
import sys

from absl import app, flags

from configs.mnist_unet import RECIPES
from experiments import cli

#: The power EMAs tracked for post-hoc reconstruction (EDM2's pair).
TRACKED_SIGMA_RELS = (0.05, 0.1)

FLAGS = flags.FLAGS
flags.DEFINE_enum("variant", "", ["", "conditional"], "The configs/mnist_unet.py variant every recipe starts from.")
flags.DEFINE_string("root", "runs/study_training", "Directory of the runs, one per recipe.")
flags.DEFINE_string("recipes", "baseline,min_snr,p2,log_normal_edm,importance", f"Comma-separated, from {sorted(RECIPES)}.")
flags.DEFINE_integer("num_steps", 9750, "Training steps of every run (batch: the config's).", lower_bound=1)
flags.DEFINE_integer("checkpoint_every", 609, "Checkpoint interval in steps.", lower_bound=1)
flags.DEFINE_string("score_steps", "", "Comma-separated checkpoint steps to score (default: --num_steps).")
flags.DEFINE_string("posthoc_sigma_rels", "", "Comma-separated EMA widths σ_rel reconstructed at the last step (empty: none).")
flags.DEFINE_integer("num", 2000, "Samples per score, and real images per comparison.", lower_bound=2)
flags.DEFINE_string("data_path", None, "A directory of the MNIST IDX files (offline); default: the config's data source.")
flags.DEFINE_string("out_dir", "docs/results/study_training", "Where the JSON and the plots go.")


def _ints(text: str, name: str):
    try:
        values = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        cli.fail(f"--{name}={text!r}: expected comma-separated integers")
    return values


def _floats(text: str, name: str):
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        cli.fail(f"--{name}={text!r}: expected comma-separated numbers")


def _run(args, log_path: str) -> None:
    """Runs ``python -m args`` in the repository, its output appended to ``log_path``; a failure
    stops the study with the log's last line."""
    with open(log_path, "a", encoding="utf-8") as log:
        log.write("$ python -m " + " ".join(args) + "\n")
        log.flush()
        proc = subprocess.run([sys.executable, "-m"] + args, stdout=log, stderr=subprocess.STDOUT,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            last = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()][-1:]
        cli.fail(f"{args[0]} failed (exit {proc.returncode}; log {log_path}): {last[0] if last else ''}", proc.returncode)


def _latest_step(workdir: str) -> int:
    d = os.path.join(workdir, "checkpoints")
    steps = [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []
    return max(steps, default=0)


def _config_spec() -> str:
    return "configs/mnist_unet.py" + (f":{FLAGS.variant}" if FLAGS.variant else "")


def _data_flags(prefix: str):
    if not FLAGS.data_path:
        return []
    return [f"--{prefix}data_source=idx", f"--{prefix}data_path={os.path.abspath(FLAGS.data_path)}"]


def _train(recipe: str, workdir: str, posthoc: bool) -> None:
    if _latest_step(workdir) >= FLAGS.num_steps:
        return
    args = ["experiments.train", "--config", _config_spec(), "--workdir", workdir,
            f"--config.train.num_steps={FLAGS.num_steps}", f"--config.checkpoint.every_steps={FLAGS.checkpoint_every}",
            f"--config.checkpoint.keep={FLAGS.num_steps // FLAGS.checkpoint_every + 2}"]
    args += [f"--config.{k}={v}" for k, v in RECIPES[recipe].items()]
    if FLAGS.data_path:
        args += ["--config.data.source=idx", f"--config.data.path={os.path.abspath(FLAGS.data_path)}"]
    if posthoc:
        args.append(f"--config.train.ema_snapshot_sigma_rels=({','.join(map(str, TRACKED_SIGMA_RELS))},)")
    print(f"{recipe}: training to step {FLAGS.num_steps} in {workdir}", flush=True)
    _run(args, os.path.join(workdir + ".log"))


def _scores(workdir: str, steps) -> dict:
    """{step: row} of ``score_checkpoints`` at ``steps`` (scoring the missing ones first)."""
    eval_dir = os.path.join(workdir, "eval")
    _run(["experiments.score_checkpoints", "--workdir", workdir, "--steps", ",".join(map(str, steps)),
          "--num", str(FLAGS.num), "--out_dir", eval_dir] + _data_flags(""), workdir.rstrip("/") + "_score.log")
    found = [n for n in os.listdir(eval_dir) if n.startswith("checkpoints_") and n.endswith(f"_n{FLAGS.num}.json")]
    rows = {}
    for name in found:
        with open(os.path.join(eval_dir, name), encoding="utf-8") as f:
            out = json.load(f)
        rows.update({r["step"]: dict(r, sampler_tag=out["sampler_tag"]) for r in out["rows"] if r["step"] in steps})
    return rows


def _row(recipe: str, row: dict, batch: int, flops: float, **extra) -> dict:
    rep = row["report"]
    images = row["step"] * batch
    return {"recipe": recipe, "overrides": RECIPES[recipe], "step": row["step"], "images": images,
            "train_pflop": 3 * flops * images / 1e15, "wall_minutes": row["wall_minutes"], "sampler": row["sampler_tag"],
            "fid_classifier": rep["fid_classifier"]["test"], "fid_classifier_floor": rep["fid_classifier"]["floor_train_vs_test"],
            "fid_pixel": rep["fid_pixel"]["test"], "fid_pixel_floor": rep["fid_pixel"]["floor_train_vs_test"],
            "div_real": rep["sample_quality"]["div_real"], **extra}


def _plots(rows, out_dir: str, num: int) -> None:
    from ddpm_jax import plots

    trained = [r for r in rows if "posthoc_sigma_rel" not in r]
    floor = {"classifier FID floor (real vs real)": trained[-1]["fid_classifier_floor"]} if trained else {}
    for x_key, xlabel, name in (("images", "training images (steps × batch)", "images"),
                                ("wall_minutes", "training minutes (wall clock, this machine)", "minutes")):
        series = {}
        for recipe in dict.fromkeys(r["recipe"] for r in trained):
            pts = sorted((r[x_key], r["fid_classifier"]) for r in trained if r["recipe"] == recipe and r[x_key] is not None)
            if pts:
                series[recipe] = ([p[0] for p in pts], [p[1] for p in pts])
        for r in rows:
            if "posthoc_sigma_rel" in r and r[x_key] is not None:
                series[f"{r['recipe']}, post-hoc EMA σ_rel {r['posthoc_sigma_rel']:g}"] = ([r[x_key]], [r["fid_classifier"]])
        plots.save_line_plot(series, os.path.join(out_dir, f"fid_vs_{name}_n{num}.png"), xlabel=xlabel,
                             ylabel=f"classifier FID (N={num})", logy=True, hlines=floor,
                             title="training recipes at equal compute")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    recipes = [r.strip() for r in FLAGS.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if not recipes or unknown:
        cli.fail(f"--recipes: unknown {unknown or 'none given'}; valid: {sorted(RECIPES)}")
    steps = _ints(FLAGS.score_steps, "score_steps") or [FLAGS.num_steps]
    if any(s > FLAGS.num_steps or s % FLAGS.checkpoint_every and s != FLAGS.num_steps for s in steps):
        cli.fail(f"--score_steps={FLAGS.score_steps!r}: each must be a checkpoint step (a multiple of "
                 f"--checkpoint_every={FLAGS.checkpoint_every}, or --num_steps) up to --num_steps={FLAGS.num_steps}")
    sigma_rels = _floats(FLAGS.posthoc_sigma_rels, "posthoc_sigma_rels")
    from experiments import sampler_flags

    sampler_flags.quiet_logs()
    from configs import mnist_unet
    from ddpm_jax import ema
    from ddpm_jax.files import check_writable

    for v in sigma_rels:
        try:
            ema.gamma_from_sigma_rel(v)
        except ValueError as e:
            cli.fail(f"--posthoc_sigma_rels: {e}")
    if FLAGS.data_path and not os.path.isdir(FLAGS.data_path):
        cli.fail(f"--data_path {FLAGS.data_path}: no such directory")
    root, out_dir = os.path.abspath(FLAGS.root), os.path.abspath(FLAGS.out_dir)
    check_writable(out_dir, "--out_dir", need_bytes=2**20)
    os.makedirs(root, exist_ok=True)
    config = mnist_unet.get_config(FLAGS.variant)
    batch = int(config.train.batch_size)
    flops = _forward_flops(config)

    rows = []
    for recipe in recipes:
        workdir = os.path.join(root, recipe)
        _train(recipe, workdir, posthoc=bool(sigma_rels))
        for step, r in sorted(_scores(workdir, steps).items()):
            rows.append(_row(recipe, r, batch, flops))
        if sigma_rels:
            posthoc_dir = os.path.join(workdir, "posthoc_ema")
            _run(["experiments.posthoc_ema", "--workdir", workdir, "--sigma_rel", ",".join(map(str, sigma_rels)),
                  "--step", str(FLAGS.num_steps), "--out_dir", posthoc_dir, "--overwrite"], workdir + "_posthoc.log")
            for v in sigma_rels:
                sub = os.path.join(posthoc_dir, f"sigma_rel_{float(v)!r}")
                for step, r in _scores(sub, [FLAGS.num_steps]).items():
                    rows.append(_row(recipe, r, batch, flops, posthoc_sigma_rel=v))
        _report(rows, out_dir, batch, flops)
    _print_rows(rows)
    print(f"-> {os.path.join(out_dir, f'study_training_n{FLAGS.num}.json')}", flush=True)


def _report(rows, out_dir: str, batch: int, flops: float) -> None:
    from ddpm_jax import provenance
    from ddpm_jax.files import write_json

    out = {"config": _config_spec(), "root": provenance.relative(os.path.abspath(FLAGS.root)), "num_samples": FLAGS.num,
           "batch_size": batch, "forward_gflop_per_image": flops / 1e9, "num_steps": FLAGS.num_steps,
           "recipes": {r: RECIPES[r] for r in dict.fromkeys(x["recipe"] for x in rows)}, "rows": rows,
           "provenance": provenance.record()}
    write_json(os.path.join(out_dir, f"study_training_n{FLAGS.num}.json"), out)
    _plots(rows, out_dir, FLAGS.num)


def _print_rows(rows) -> None:
    for r in rows:
        what = r["recipe"] + (f" + post-hoc EMA σ_rel {r['posthoc_sigma_rel']:g}" if "posthoc_sigma_rel" in r else "")
        minutes = "?" if r["wall_minutes"] is None else f"{r['wall_minutes']:.1f}"
        print(f"{what:40s} step {r['step']:6d} ({r['images'] / 1e6:.2f}M images, {minutes} min): classifier FID "
              f"{r['fid_classifier']:.2f} [floor {r['fid_classifier_floor']:.2f}], pixel FID {r['fid_pixel']:.3f}, "
              f"div/real {r['div_real']:.3f}", flush=True)


def _forward_flops(config) -> float:
    """The network's forward FLOPs per image (XLA's cost analysis, ``experiments.model_summary``)."""
    import jax
    import jax.numpy as jnp

    from ddpm_jax.models import model_from_config
    from experiments.model_summary import forward_flops

    shape = (28, 28, 1)
    model = model_from_config(config.model, shape)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1,) + shape), jnp.ones((1,)))["params"]
    return forward_flops(model, params, shape)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
