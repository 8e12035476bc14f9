"""Train a DDPM: ``python -m experiments.train --config configs/mnist.py --workdir runs/mnist``.

Any config key can be overridden, e.g. ``--config.train.batch_size=128``; offline data:
``--config.data.source=idx --config.data.path=DIR``. Running the same command again resumes from
the newest checkpoint in ``--workdir`` that restores (``--restore_step=N`` picks one). One
trainer at a time holds a workdir; exit codes are listed in ``experiments/cli.py``.

Multi-host: start one process per host with ``--distributed`` (the cluster is detected on SLURM
and TPU VMs) or with ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``; all
processes need the same command and a shared ``--workdir``. See README.md.
"""

import warnings

from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax.checkpointing import CheckpointError
from experiments import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/mnist.py or configs/mnist.py:mean.", lock_config=True)
flags.DEFINE_string("workdir", "runs/mnist", "Directory for checkpoints, metrics, samples; an existing run there is resumed.")
flags.DEFINE_bool("distributed", False, "Initialise jax.distributed for a multi-host run. With no other flag the "
                  "cluster is detected (SLURM, TPU VMs, ...); or give the three flags below.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0 (implies --distributed).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes (implies --distributed).")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index in 0..num_processes-1 (implies --distributed).")
flags.DEFINE_integer("cpu_devices", 0, "CPU only: JAX devices to split each batch over; 0 = one per core (the largest count "
                     "<= the cores that divides the batch; 1 with --distributed). XLA_FLAGS' "
                     "--xla_force_host_platform_device_count wins. No effect on GPU/TPU.", lower_bound=0)
flags.DEFINE_integer("restore_step", None, "Resume from this checkpoint step instead of the newest; newer checkpoints are "
                     "moved to <workdir>/checkpoints_set_aside/ (not deleted) and their metrics rows dropped.", lower_bound=0)
cli.define_platform_flag()
flags.mark_flags_as_required(["config"])


def _init_devices() -> None:
    """The platform profile (``ddpm_jax.platform_profile``: on the CPU, the device count), then
    ``jax.distributed.initialize`` when asked for: both before any JAX computation."""
    from ddpm_jax import platform_profile

    explicit = {k: FLAGS[k].value for k in ("coordinator_address", "num_processes", "process_id") if FLAGS[k].value is not None}
    distributed = FLAGS.distributed or explicit
    # first: under the CPU profile the process may start again from here. The CPU device count is
    # automatic only for one process, whose batch is the global one.
    platform_profile.setup(FLAGS.platform, cpu_devices=FLAGS.cpu_devices, batch_sizes=[FLAGS.config.train.batch_size],
                           set_devices=FLAGS["cpu_devices"].present or not distributed)
    if not distributed:
        return
    if explicit and len(explicit) != 3:
        missing = sorted({"coordinator_address", "num_processes", "process_id"} - set(explicit))
        raise app.UsageError(f"multi-host: also give --{' --'.join(missing)} (or none of them, to auto-detect)")
    if explicit and not 0 <= explicit["process_id"] < explicit["num_processes"]:
        raise app.UsageError(f"--process_id={explicit['process_id']} is not in 0..{explicit['num_processes'] - 1}")
    import jax

    jax.distributed.initialize(**explicit)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # orbax logs every save at INFO; keep the console readable
        logging.set_verbosity(logging.WARNING)
    _init_devices()
    from ddpm_jax.trainer import NonFiniteError, train_and_evaluate

    from ddpm_jax.files import os_error_line

    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir, restore_step=FLAGS.restore_step)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        cli.fail(str(e), cli.EXIT_BAD_INPUT)  # bad input: one clear line, no traceback
    except NonFiniteError as e:
        cli.fail(str(e), cli.EXIT_NONFINITE)
    except OSError as e:  # full disk, read-only filesystem, permissions
        # A checkpoint write cut short by the same error can leave TensorStore coroutines that
        # Python reports as never awaited when it exits: the one line below already says why.
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        cli.fail(os_error_line(e), cli.EXIT_WRITE_FAILED)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
