"""What every entry point shares on the command line: flag parsing that reports a bad flag or a
bad ``--config`` override in one ``error:`` line (exit 2), and the exit codes.

    app.run(main, flags_parser=cli.parse_flags)

Exit codes: 0 done (or stopped by a signal and saved), 2 bad input (flags, config, data, a
workdir in use or holding another run), 3 too many non-finite steps, 4 an output could not be
written (full disk, read-only filesystem, permissions).
"""

import re
import sys

from absl import flags

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_WRITE_FAILED = 4


def fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    """Prints ``error: message`` (one line) to stderr and exits with ``code``."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(code)


def define_scoring_flags(per: str) -> None:
    """The flags of the scripts that sample a run and score the samples (``score_checkpoints``,
    ``study_samplers``, ``study_guidance``; :func:`load_scoring_run`): --workdir (required), --num, --batch_size, --seed, --data_source,
    --data_path, --out_dir, --cpu_devices, --platform. ``per``: what one set of --num samples is for."""
    flags.DEFINE_string("workdir", None, "A run directory written by experiments.train.")
    flags.DEFINE_integer("num", 2000, f"Samples per {per}, and real images per comparison.", lower_bound=2)
    flags.DEFINE_integer("batch_size", 500, "Samples per compiled batch.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, f"Seed for sampling and for the random real subsets (the same for every {per}).")
    flags.DEFINE_string("data_source", None, "Override the run's config.data.source (e.g. idx).")
    flags.DEFINE_string("data_path", None, "Override the run's config.data.path.")
    flags.DEFINE_string("out_dir", None, "Where to write the JSON and the plots (default: <workdir>/eval).")
    flags.DEFINE_integer("cpu_devices", 0, "CPU only: JAX devices to split each batch over; 0 = one per core. "
                         "No effect on GPU/TPU.", lower_bound=0)
    define_platform_flag()
    flags.mark_flags_as_required(["workdir"])


def load_scoring_run(step, prepare=lambda run: None):
    """The scoring scripts' set-up, after the platform profile: ``(workdir, out_dir, run, splits,
    prepared)`` — room checked in ``--out_dir`` (default ``<workdir>/eval``), the run restored at
    checkpoint ``step`` (None: the latest), ``prepared = prepare(run)`` (the script's own checks and
    sampler options, raising ValueError on bad input), the data from the run's config or
    --data_source/--data_path. Any failure is one line and its exit code (:func:`fail`)."""
    import os

    from ddpm_jax import data
    from ddpm_jax.checkpointing import CheckpointError
    from ddpm_jax.files import check_writable, os_error_line
    from ddpm_jax.runs import load_run

    f = flags.FLAGS
    workdir = os.path.abspath(f.workdir)
    out_dir = os.path.abspath(f.out_dir or os.path.join(workdir, "eval"))
    try:
        check_writable(out_dir, "--out_dir", need_bytes=2**20)
        run = load_run(workdir, step)
        prepared = prepare(run)
        splits = data.splits_from_config(run.config, source=f.data_source, path=f.data_path)
    except OSError as e:
        fail(os_error_line(e), EXIT_WRITE_FAILED)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        fail(e)
    return workdir, out_dir, run, splits, prepared


def fid_key(report: dict) -> str:
    """The FID a study reports and plots: classifier FID for MNIST-shaped images, else pixel FID."""
    return "fid_classifier" if report.get("fid_classifier") else "fid_pixel"


def draw_and_score(run, opts: dict, splits, key, num: int, batch_size: int, seed: int):
    """``(report, sample_seconds, compile_seconds)``: ``num`` samples of ``run``'s EMA params with
    sampler ``opts`` from ``key``, compiled first and timed apart, scored against ``splits``
    (``ddpm_jax.evaluation.evaluate_samples`` with real subsets drawn by ``seed``)."""
    import time

    import numpy as np

    from ddpm_jax import sampling
    from ddpm_jax.evaluation import evaluate_samples

    t0 = time.time()
    fn = run.make_sampler(batch_size, opts).compile(key)
    compile_seconds = time.time() - t0
    t0 = time.time()
    x = sampling.sample_in_batches(fn, num, batch_size, key, progress=False)
    seconds = time.time() - t0
    return evaluate_samples(np.asarray(x), splits, scale=run.data_scale, seed=seed), seconds, compile_seconds


def define_platform_flag() -> None:
    """--platform: the platform profile an entry point applies first (``ddpm_jax.platform_profile``)."""
    flags.DEFINE_enum("platform", "auto", ["auto", "cpu", "accelerator"], "Platform profile: 'cpu' (glibc malloc "
                      "settings, one virtual device per core, the CPU kernels), 'accelerator' (stock layers, no process "
                      "set-up), or 'auto': 'cpu' exactly when JAX's backend is the CPU.")


def earlier_rows(json_path: str, header: dict, keys) -> list:
    """The ``rows`` of an earlier call's JSON at ``json_path`` (none if absent), after checking that
    it was written with the same ``header[k]`` for every k in ``keys``; else one error line, exit 2
    (a file of other settings is never overwritten)."""
    import json
    import os

    if not os.path.exists(json_path):
        return []
    try:
        with open(json_path) as f:
            old = json.load(f)
        same = all(old.get(k) == json.loads(json.dumps(header[k])) for k in keys)  # tuples read back as lists
    except (OSError, ValueError, AttributeError) as e:
        fail(f"{json_path} cannot be read ({e}); move it away or give another --out_dir")
    if not same:
        fail(f"{json_path} holds scores of other settings (run {old.get('workdir')}); give another --out_dir")
    return old["rows"]


def _config_overrides(argv):
    return [a.split("=", 1)[0][2:] for a in argv if a.startswith("--config.")]


def parse_flags(argv):
    """absl's flag parsing, with every failure turned into one ``error:`` line and exit code 2:
    an unknown flag, a value of the wrong type, an override of a config key that does not exist
    (``--config.train.foo=1``), or a config file that cannot be loaded."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a missing nested key
        missing = str(e).strip("\"'").strip("\"'")
        culprits = [o for o in _config_overrides(argv) if missing in o.split(".")]
        where = f"--{culprits[0]}: " if culprits else ""
        fail(f"{where}the config has no key {missing!r} (check the spelling; see the config file for its keys)")
    except flags.Error as e:
        text = str(e).strip()
        unknown = re.match(r"Unknown command line flag '(config\.[^']+)'", text)
        if unknown:
            fail(f"--{unknown.group(1)}: the config has no such key (check the spelling; see the config file for its keys)")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if "Error whilst parsing config file" in text:  # the file's own exception is the last line
            fail(f"{lines[0].split(':')[0]}: cannot load the config file: {lines[-1]}")
        fail(lines[0] if lines else type(e).__name__)
