"""The command-line flags that ``experiments.sample`` and ``experiments.evaluate`` share: which
run, which sampler and how many samples. ``define(...)`` registers them; ``run_and_options()``
restores the run and turns the flags into validated :func:`ddpm_jax.sampling.sample` options."""

from absl import flags, logging

from experiments import cli

FLAGS = flags.FLAGS


def define(*, num: int, batch_size: int, min_num: int = 1) -> None:
    """Registers --workdir, --step, --method, --num, --batch_size, --num_steps, --eta, --grid,
    --s_churn / --s_tmin / --s_tmax / --s_noise, --ddpm_variance, --clip_x0, --params, --guidance, --cpu_devices
    (defaults for --num and --batch_size given here)."""
    flags.DEFINE_string("workdir", None, "A run directory written by experiments.train.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("method", None, "Sampler (default: the run's config.sampling.method).")
    flags.DEFINE_integer("num", num, "Number of samples.", lower_bound=min_num)
    flags.DEFINE_integer("batch_size", batch_size, "Samples per compiled batch.", lower_bound=1)
    flags.DEFINE_integer("num_steps", None, "Steps S of ddim, dpm_solver_pp (S evaluations) or heun (2S - 1) "
                         "(default: the run's config.sampling.num_steps, else T).")
    flags.DEFINE_float("eta", None, "DDIM eta in [0, 1] (default: the run's config.sampling.eta, else 0).")
    flags.DEFINE_enum("grid", None, ["uniform_t", "lambda", "edm"], "Step grid of ddim, dpm_solver_pp and heun "
                      "(default: the run's config.sampling.grid, else uniform_t, lambda and edm respectively).")
    flags.DEFINE_float("s_churn", 0.0, "heun only: EDM's S_churn (0 = deterministic).", lower_bound=0.0)
    flags.DEFINE_float("s_tmin", 0.0, "heun only: churn only where sigma >= S_tmin.", lower_bound=0.0)
    flags.DEFINE_float("s_tmax", float("inf"), "heun only: churn only where sigma <= S_tmax.", lower_bound=0.0)
    flags.DEFINE_float("s_noise", 1.0, "heun only: EDM's S_noise, the scale of the churn noise.", lower_bound=0.0)
    flags.DEFINE_enum("ddpm_variance", None, ["posterior", "beta"], "eps_ddpm noise variance (default: the run's config).")
    flags.DEFINE_bool("clip_x0", None, "Clip x̂_0 to the data range each step (default: the run's config.sampling.clip_x0).")
    flags.DEFINE_enum("params", "ema", ["ema", "raw"], "Which params to sample with.")
    flags.DEFINE_float("guidance", None, "Class-conditional runs: classifier-free guidance w >= 0, sampling with "
                       "(1 + w) f(x, t, c) - w f(x, t, no class) (default: the run's config.sampling.guidance, else 0).")
    flags.DEFINE_integer("cpu_devices", 0, "CPU only: JAX devices to split each batch over; 0 = one per core (the "
                         "largest count <= the cores that divides --batch_size). No effect on GPU/TPU.", lower_bound=0)
    cli.define_platform_flag()
    flags.mark_flags_as_required(["workdir"])


#: The flags that choose how new samples are drawn (not which run, how many, or where).
SAMPLER_FLAGS = ("method", "num_steps", "eta", "grid", "s_churn", "s_tmin", "s_tmax", "s_noise", "ddpm_variance",
                 "clip_x0", "params", "guidance")


def present_sampler_flags() -> list:
    """The sampler flags given on the command line, in :data:`SAMPLER_FLAGS`' order."""
    return [name for name in SAMPLER_FLAGS if FLAGS[name].present]


def quiet_logs() -> None:
    """Orbax logs every restore at INFO; keep the console readable unless --verbosity is given."""
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def run_and_options():
    """(run, options): the restored run and the sampler options from the flags. Raises
    ValueError / FileNotFoundError / CheckpointError (one line) for a bad run or bad flags.
    Applies the platform profile first (``ddpm_jax.platform_profile``): call it before any JAX computation."""
    from ddpm_jax import platform_profile

    platform_profile.setup(FLAGS.platform, cpu_devices=FLAGS.cpu_devices, batch_sizes=[min(FLAGS.batch_size, FLAGS.num)])
    from ddpm_jax.runs import load_run


    run = load_run(FLAGS.workdir, FLAGS.step)
    opts = run.sampler_options(FLAGS.method, num_steps=FLAGS.num_steps, eta=FLAGS.eta, ddpm_variance=FLAGS.ddpm_variance,
                               clip_x0=FLAGS.clip_x0, grid=FLAGS.grid, s_churn=FLAGS.s_churn, s_tmin=FLAGS.s_tmin,
                               s_tmax=FLAGS.s_tmax, s_noise=FLAGS.s_noise, guidance=FLAGS.guidance)
    return run, opts
