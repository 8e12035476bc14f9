"""Study: sample quality against network evaluations (NFE) and seconds, for each sampler.

    python -m experiments.study_samplers --workdir runs/mnist_unet --num 2000 \\
        [--nfe 5,10,20,50,100] [--methods ancestral,ddim,dpm_solver_pp,heun]

For every method and NFE budget this draws ``--num`` samples from the run's EMA params and scores
them against the test split (``ddpm_jax.evaluation``: pixel and classifier FID with their
real-vs-real floors at the same N, the lecture's table). The methods:

    ancestral      'ddim' with η = 1: the ancestral sampler on the respaced schedule, S = NFE
    ddim           'ddim' with η = 0 (deterministic), S = NFE
    dpm_solver_pp  DPM-Solver++(2M) on the log-SNR grid, S = NFE
    heun           EDM's Heun sampler on the ρ = 7 σ-grid, S = (NFE + 1) // 2 (2S − 1 evaluations)

``METHOD:GRID`` picks another step grid (e.g. ``dpm_solver_pp:uniform_t``); ``heun_churn`` is Heun
with ``--s_churn``. x̂_0 is clipped as the run's config says. Seconds are sampling wall time after
compilation (compilation reported apart). All methods start from the same x_T (``--seed``).

Writes, atomically after each setting (an interrupted call keeps its rows and a rerun adds to
them), ``<out_dir>/samplers_n<N>.json`` and ``fid_vs_nfe_n<N>.png``, ``fid_vs_seconds_n<N>.png``
(``_seed<S>`` added for a seed other than 0; ``--out_dir`` defaults to ``<workdir>/eval``).
"""

import os

from absl import app, flags

from experiments import cli

FLAGS = flags.FLAGS
cli.define_scoring_flags("setting")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("nfe", "5,10,20,50,100", "Comma-separated budgets of network evaluations per sample.")
flags.DEFINE_string("methods", "ancestral,ddim,dpm_solver_pp,heun", "Comma-separated methods (module docstring).")
flags.DEFINE_float("s_churn", 10.0, "S_churn of 'heun_churn' (S_tmin 0, S_tmax inf, S_noise 1).", lower_bound=0.0)

#: study name -> (sampling method, fixed options)
METHODS = {
    "ancestral": ("ddim", {"eta": 1.0}),
    "ddim": ("ddim", {"eta": 0.0}),
    "dpm_solver_pp": ("dpm_solver_pp", {}),
    "heun": ("heun", {}),
    "heun_churn": ("heun", {"churn": True}),
}


def _parse_methods(text: str):
    """[(name, method, options)] from ``--methods``; one error line for an unknown name or grid."""
    from ddpm_jax.sampling import GRIDS

    out = []
    for spec in (s.strip() for s in text.split(",") if s.strip()):
        name, _, grid = spec.partition(":")
        if name not in METHODS:
            cli.fail(f"--methods: unknown method {name!r}; expected one of {sorted(METHODS)}, optionally as NAME:GRID")
        if grid and grid not in GRIDS:
            cli.fail(f"--methods: unknown grid {grid!r} in {spec!r}; expected one of {GRIDS}")
        method, opts = METHODS[name]
        opts = dict(opts)
        if opts.pop("churn", False):
            opts["s_churn"] = FLAGS.s_churn
        if grid:
            opts["grid"] = grid
        out.append((spec, method, opts))
    if not out:
        cli.fail("--methods: give at least one method")
    return out


def _parse_nfe(text: str):
    try:
        budgets = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        cli.fail(f"--nfe={text!r}: expected comma-separated integers")
    if not budgets or budgets[0] < 1:
        cli.fail(f"--nfe={text!r}: budgets must be integers >= 1")
    return budgets


def _steps_for(method: str, budget: int) -> int:
    """S such that the method's NFE is at most ``budget`` (Heun: 2S − 1)."""
    return (budget + 1) // 2 if method == "heun" else budget


def _plots(out: dict, stem: str) -> None:
    """Classifier (else pixel) FID against NFE and against seconds, a line per method."""
    from ddpm_jax import plots

    rows = out["rows"]
    if not rows:
        return
    key = cli.fid_key(rows[0]["report"])
    floor = rows[0]["report"][key]["floor_train_vs_test"]
    names = list(dict.fromkeys(r["name"] for r in rows))
    for x_key, x_label, kind in (("nfe", "network evaluations per sample", "nfe"),
                                 ("sample_seconds", f"seconds to draw {out['num_samples']} samples (compiled)", "seconds")):
        series = {n: tuple(zip(*sorted((r[x_key], r["report"][key]["test"]) for r in rows if r["name"] == n))) for n in names}
        plots.save_line_plot(series, stem.replace("KIND", kind), xlabel=x_label,
                             ylabel=f"{key[4:]} FID vs test (N={out['num_samples']})", logx=True, logy=True,
                             title=f"{os.path.basename(out['workdir'])}, step {out['step']}", hlines={"real vs real": floor})


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from experiments import sampler_flags

    sampler_flags.quiet_logs()
    specs, budgets = _parse_methods(FLAGS.methods), _parse_nfe(FLAGS.nfe)
    from ddpm_jax import platform_profile

    platform_profile.setup(FLAGS.platform, cpu_devices=FLAGS.cpu_devices, batch_sizes=[FLAGS.batch_size])
    import jax

    from ddpm_jax import provenance, sampling
    from ddpm_jax.files import os_error_line, write_json

    def prepare(run):
        settings = []
        for name, method, fixed in specs:
            for budget in budgets:
                S = _steps_for(method, budget)
                opts = run.sampler_options(method, num_steps=S, **fixed)
                nfe = sampling.nfe(method, run.schedule.num_steps, S)
                if (name, nfe) not in [(n, e) for n, e, _ in settings]:  # Heun: two budgets may give one S
                    settings.append((name, nfe, opts))
        return settings

    workdir, out_dir, run, splits, settings = cli.load_scoring_run(FLAGS.step, prepare)

    suffix = f"n{FLAGS.num}" + (f"_seed{FLAGS.seed}" if FLAGS.seed else "")
    json_path = os.path.join(out_dir, f"samplers_{suffix}.json")
    out = {"workdir": provenance.relative(workdir), "step": run.step, "num_samples": FLAGS.num, "seed": FLAGS.seed,
           "clip_x0": run.sampler_options()["clip_x0"], "rows": []}
    out["rows"] = cli.earlier_rows(json_path, out, ("workdir", "step", "num_samples", "seed", "clip_x0"))
    done = {(r["name"], r["nfe"]) for r in out["rows"]}
    key = jax.random.PRNGKey(FLAGS.seed)
    print(f"{workdir} step {run.step}: {', '.join(s[0] for s in specs)} at NFE {budgets}, N={FLAGS.num}", flush=True)
    for name, nfe, opts in settings:
        if (name, nfe) in done:
            continue
        report, seconds, compile_seconds = cli.draw_and_score(run, opts, splits, key, FLAGS.num, FLAGS.batch_size,
                                                              FLAGS.seed)
        sampler = {k: v for k, v in opts.items() if k != "clip_x0"}
        out["rows"].append({"name": name, "nfe": nfe, "sampler": sampler, "sample_seconds": seconds,
                            "compile_seconds": compile_seconds, "report": report,
                            "provenance": provenance.record(wall_s=compile_seconds + seconds)})
        out["provenance"] = provenance.record()
        try:
            write_json(json_path, out)
            _plots(out, os.path.join(out_dir, f"fid_vs_KIND_{suffix}.png"))
        except OSError as e:
            cli.fail(os_error_line(e), cli.EXIT_WRITE_FAILED)
        fids = ", ".join(f"{k[4:]} FID {report[k]['test']:.3f} [floor {report[k]['floor_train_vs_test']:.3f}]"
                         for k in ("fid_classifier", "fid_pixel") if report.get(k))
        print(f"{name:24s} NFE {nfe:4d}: {fids}, div/real {report['sample_quality']['div_real']:.3f} "
              f"({seconds:.1f}s to sample, {compile_seconds:.1f}s to compile)", flush=True)
    print(f"-> {json_path}", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
