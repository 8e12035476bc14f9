"""Study: a progressive distillation's students beside the solvers, against network evaluations.

    python -m experiments.study_distill --workdir runs/mnist_unet_distill --num 2000 \\
        [--solvers runs/mnist_unet/eval/samplers_n2000.json] [--reference ddim:100] [--out_dir DIR]

``--workdir`` is an ``experiments.distill`` workdir. Every finished stage run
(``stage_<N>steps/``, listed in its ``distill.json``) draws ``--num`` samples on its recorded grid
(N network evaluations per sample) from the same x_T (``--seed``), scored as
``experiments.study_samplers`` scores a solver (``ddpm_jax.evaluation``: pixel and classifier FID
against the test split with their real-vs-real floors, the lecture's table; the same real subsets
for the same N and seed). ``--solvers`` is a ``study_samplers`` JSON of the distillation's teacher
at the same N and seed: its curves share the plot, and its ``--reference`` row (``METHOD:NFE``,
e.g. the teacher's deterministic DDIM at 100 steps) gives each student the ratio of its FID to it.

Writes, atomically after each student (a rerun keeps the rows it has), ``<out_dir>/students_n<N>.json``
(rows as ``study_samplers``' with name ``distilled`` and each stage's record from ``distill.json``:
grid, training images, forward-equivalents, wall seconds; the distillation's totals and the
teacher's training compute), ``fid_vs_nfe_students_n<N>.png`` (``_seed<S>`` added for a seed
other than 0) and ``distill_loss.png``, each stage's loss against its steps (``--out_dir``
defaults to ``<workdir>/eval``).
"""

import json
import os

from absl import app, flags

from experiments import cli

FLAGS = flags.FLAGS
cli.define_scoring_flags("student")
flags.DEFINE_string("solvers", None, "A study_samplers JSON of the teacher at the same --num and --seed, drawn beside "
                    "the students (optional).")
flags.DEFINE_string("reference", "ddim:100", "METHOD:NFE of the --solvers row each student's FID is divided by.")


def _read(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        cli.fail(f"{what} {path} cannot be read: {e}")


def _reference(solvers: dict, spec: str):
    """The ``(name, nfe, classifier-or-pixel FID)`` of ``--reference`` in the solvers' rows."""
    name, _, nfe = spec.partition(":")
    try:
        nfe = int(nfe)
    except ValueError:
        cli.fail(f"--reference={spec!r}: expected METHOD:NFE, e.g. ddim:100")
    rows = [r for r in solvers["rows"] if r["name"] == name and r["nfe"] == nfe]
    if not rows:
        have = ", ".join(sorted({f"{r['name']}:{r['nfe']}" for r in solvers["rows"]}))
        cli.fail(f"--reference={spec!r}: --solvers has no such row (it has: {have or 'none'})")
    return name, nfe, rows[0]["report"][cli.fid_key(rows[0]["report"])]["test"]


def _plot(out: dict, solvers, path: str) -> None:
    """Classifier (else pixel) FID against NFE: the students' line over the solvers' lines."""
    from ddpm_jax import plots

    rows = out["rows"]
    key = cli.fid_key(rows[0]["report"])
    series = {}
    for r in (solvers or {}).get("rows", []):
        xs, ys = series.setdefault(r["name"], ([], []))
        xs.append(r["nfe"])
        ys.append(r["report"][key]["test"])
    series = {n: tuple(zip(*sorted(zip(*xy)))) for n, xy in series.items()}
    series["distilled students"] = tuple(zip(*sorted((r["nfe"], r["report"][key]["test"]) for r in rows)))
    plots.save_line_plot(series, path, xlabel="network evaluations per sample",
                         ylabel=f"{key[4:]} FID vs test (N={out['num_samples']})", logx=True, logy=True,
                         title=f"students of {out['teacher']}",
                         hlines={"real vs real": rows[0]["report"][key]["floor_train_vs_test"]})


def _loss_plot(workdir: str, path: str) -> None:
    """The distillation loss against the step within each stage, a line per stage (``metrics.jsonl``)."""
    from ddpm_jax import plots

    series = {}
    try:
        with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return
    for r in rows:
        if r.get("distill/loss") is not None and r["distill/loss"] > 0:
            xs, ys = series.setdefault(f"{2 * int(r['distill/stage_steps'])} -> {int(r['distill/stage_steps'])}", ([], []))
            xs.append(r["distill/step_in_stage"])
            ys.append(r["distill/loss"])
    if series:
        plots.save_line_plot(series, path, xlabel="Adam step within the stage", ylabel="distillation loss (logged mean)",
                             logy=True, title=f"{os.path.basename(workdir)}: stage by stage")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from experiments import sampler_flags

    sampler_flags.quiet_logs()
    from ddpm_jax import distill_loop

    workdir = os.path.abspath(FLAGS.workdir)
    report_path = os.path.join(workdir, distill_loop.REPORT_FILE)
    if not os.path.isfile(report_path):
        cli.fail(f"--workdir {workdir}: no {distill_loop.REPORT_FILE} (not an experiments.distill workdir, or no "
                 "stage finished yet)")
    distill = _read(report_path, "the distillation report")
    stages = [(r["steps"], os.path.join(workdir, distill_loop.stage_dir_name(r["steps"]))) for r in distill["stages"]]
    solvers, reference = None, None
    if FLAGS.solvers:
        solvers = _read(FLAGS.solvers, "--solvers")
        mismatch = [f"{k} {solvers.get(k)!r} (students: {v!r})" for k, v in
                    (("workdir", distill["teacher"]), ("num_samples", FLAGS.num), ("seed", FLAGS.seed))
                    if solvers.get(k) != v]
        if mismatch:
            cli.fail(f"--solvers {FLAGS.solvers} is not the teacher's study at this N and seed: {'; '.join(mismatch)}")
        reference = _reference(solvers, FLAGS.reference)

    from ddpm_jax import platform_profile

    platform_profile.setup(FLAGS.platform, cpu_devices=FLAGS.cpu_devices, batch_sizes=[FLAGS.batch_size])
    import jax

    from ddpm_jax import data, provenance
    from ddpm_jax.checkpointing import CheckpointError
    from ddpm_jax.files import check_writable, os_error_line, write_json
    from ddpm_jax.runs import load_run

    out_dir = os.path.abspath(FLAGS.out_dir or os.path.join(workdir, "eval"))
    try:
        check_writable(out_dir, "--out_dir", need_bytes=2**20)
        runs = {n: load_run(path) for n, path in stages}
        splits = data.splits_from_config(runs[stages[0][0]].config, source=FLAGS.data_source, path=FLAGS.data_path)
    except OSError as e:
        cli.fail(os_error_line(e), cli.EXIT_WRITE_FAILED)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        cli.fail(e)

    suffix = f"n{FLAGS.num}" + (f"_seed{FLAGS.seed}" if FLAGS.seed else "")
    json_path = os.path.join(out_dir, f"students_{suffix}.json")
    out = {"workdir": provenance.relative(workdir), "teacher": distill["teacher"], "num_samples": FLAGS.num,
           "seed": FLAGS.seed, "solvers": provenance.relative(FLAGS.solvers) if FLAGS.solvers else None,
           "reference": None if reference is None else dict(zip(("name", "nfe", "fid"), reference)),
           "distillation": {"settings": distill["settings"], "accounting": distill["accounting"],
                            "total": distill["total"], "teacher_training": distill["teacher_training"]},
           "rows": []}
    out["rows"] = cli.earlier_rows(json_path, out, ("workdir", "num_samples", "seed"))
    done = {r["nfe"] for r in out["rows"]}
    key = jax.random.PRNGKey(FLAGS.seed)
    print(f"{workdir}: students at {', '.join(str(n) for n, _ in stages)} steps, N={FLAGS.num}", flush=True)
    for n, path in stages:
        if n in done:
            continue
        run = runs[n]
        opts = run.sampler_options()
        report, seconds, compile_seconds = cli.draw_and_score(run, opts, splits, key, FLAGS.num, FLAGS.batch_size,
                                                              FLAGS.seed)
        fid = report[cli.fid_key(report)]["test"]
        row = {"name": "distilled", "nfe": n, "run": provenance.relative(path),
               "stage": next(r for r in distill["stages"] if r["steps"] == n),
               "sampler": {k: v for k, v in opts.items() if k != "clip_x0"}, "sample_seconds": seconds,
               "compile_seconds": compile_seconds, "report": report,
               "ratio_to_reference": None if reference is None else fid / reference[2],
               "provenance": provenance.record(wall_s=compile_seconds + seconds)}
        out["rows"] = sorted(out["rows"] + [row], key=lambda r: r["nfe"])
        out["provenance"] = provenance.record()
        try:
            write_json(json_path, out)
            _plot(out, solvers, os.path.join(out_dir, f"fid_vs_nfe_students_{suffix}.png"))
            _loss_plot(workdir, os.path.join(out_dir, "distill_loss.png"))
        except OSError as e:
            cli.fail(os_error_line(e), cli.EXIT_WRITE_FAILED)
        fids = ", ".join(f"{k[4:]} FID {report[k]['test']:.3f} [floor {report[k]['floor_train_vs_test']:.3f}]"
                         for k in ("fid_classifier", "fid_pixel") if report.get(k))
        ratio = "" if reference is None else f", {row['ratio_to_reference']:.2f}x {reference[0]}:{reference[1]}"
        print(f"student NFE {n:4d}: {fids}, div/real {report['sample_quality']['div_real']:.3f}{ratio} "
              f"({seconds:.1f}s to sample, {compile_seconds:.1f}s to compile)", flush=True)
    print(f"-> {json_path}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
