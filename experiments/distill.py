"""Progressive distillation of a trained run into a few-step DDIM sampler (Salimans & Ho 2022).

    python -m experiments.distill --teacher runs/mnist_unet --workdir runs/mnist_unet_distill
    python -m experiments.distill --teacher runs/mnist_unet --workdir runs/mnist_unet_distill \\
        --teacher_steps 128 --target_steps 4 --steps_per_stage 2000 --student_param v --learning_rate 1e-4
    python -m experiments.sample --workdir runs/mnist_unet_distill/stage_4steps --num_steps 4

Stages halve the steps from ``--teacher_steps`` to ``--target_steps``; each finished stage is a run
directory ``<workdir>/stage_<N>steps/`` that ``experiments.sample`` / ``evaluate`` /
``score_checkpoints`` read like any run (sampled with N DDIM steps on the grid it was distilled for).
``<workdir>/distill.json`` records per stage the grid, the images seen, the network evaluations
and the wall seconds. Running the same command again resumes from the newest checkpoint, bit for
bit; Ctrl-C or SIGTERM saves and exits. Bad input (no teacher run, step counts that do not halve
down to the target, an unknown ``--student_param``, a workdir of other settings) is one ``error:``
line and exit code 2 with nothing written; exit codes are listed in ``experiments/cli.py``.
The method, the equations and the compute accounting: docs/distillation.md.
"""

import warnings

from absl import app, flags, logging

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("teacher", None, "The teacher: a run directory written by experiments.train.")
flags.DEFINE_string("workdir", None, "Directory for the distillation's checkpoints, stage runs and distill.json.")
flags.DEFINE_integer("teacher_steps", 128, "DDIM steps of the first teacher (on the grid of experiments.sample "
                     "--method ddim --num_steps S).")
flags.DEFINE_integer("target_steps", 4, "DDIM steps of the last student; --teacher_steps / --target_steps must be a power of two.")
flags.DEFINE_integer("steps_per_stage", 2000, "Adam steps per stage.")
flags.DEFINE_string("student_param", "v", "What the student predicts: v (the paper's choice), x0 or eps.")
flags.DEFINE_float("learning_rate", 1e-4, "Adam learning rate of the student (the peak of --lr_schedule=linear).")
flags.DEFINE_enum("lr_schedule", "constant", ["constant", "linear"], "The learning rate within each stage: constant, or "
                  "linear from --learning_rate to 0 (the paper's released configs; pair it with --ema_decay 0).")
flags.DEFINE_integer("batch_size", 0, "Global batch (0: the teacher's train.batch_size).")
flags.DEFINE_float("ema_decay", 0.999, "EMA decay of the student's params (warmed up as in training); the EMA is "
                   "what a stage writes and what teaches the next stage.")
flags.DEFINE_integer("seed", 0, "Seed of the batches, time steps and noise.")
flags.DEFINE_integer("checkpoint_every_steps", 500, "Checkpoint interval in steps (and at the end of every stage).")
flags.DEFINE_integer("log_every_steps", 50, "Interval of the rows of metrics.jsonl.")
flags.DEFINE_string("data_source", None, "Override the teacher's config.data.source (e.g. idx).")
flags.DEFINE_string("data_path", None, "Override the teacher's config.data.path (e.g. a directory of MNIST IDX files).")
flags.DEFINE_integer("cpu_devices", 0, "CPU only: JAX devices to split each batch over; 0 = one per core (the largest "
                     "count <= the cores that divides the batch). No effect on GPU/TPU.", lower_bound=0)
cli.define_platform_flag()
flags.mark_flags_as_required(["teacher", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    from ddpm_jax import platform_profile
    from ddpm_jax.checkpointing import CheckpointError
    from ddpm_jax.distill_loop import Settings, check_settings, distill
    from ddpm_jax.files import os_error_line
    from ddpm_jax.trainer import NonFiniteError

    settings = Settings(teacher=FLAGS.teacher, workdir=FLAGS.workdir, teacher_steps=FLAGS.teacher_steps,
                        target_steps=FLAGS.target_steps, steps_per_stage=FLAGS.steps_per_stage,
                        student_param=FLAGS.student_param, learning_rate=FLAGS.learning_rate,
                        lr_schedule=FLAGS.lr_schedule, batch_size=FLAGS.batch_size,
                        ema_decay=FLAGS.ema_decay, seed=FLAGS.seed, checkpoint_every_steps=FLAGS.checkpoint_every_steps,
                        log_every_steps=FLAGS.log_every_steps, data_source=FLAGS.data_source, data_path=FLAGS.data_path)
    try:
        plan = check_settings(settings)  # before anything is written or any device is set up
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        cli.fail(e)
    platform_profile.setup(FLAGS.platform, cpu_devices=FLAGS.cpu_devices, batch_sizes=[plan["settings"]["batch_size"]])
    try:
        distill(settings)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        cli.fail(e, cli.EXIT_BAD_INPUT)
    except NonFiniteError as e:
        cli.fail(e, cli.EXIT_NONFINITE)
    except OSError as e:  # full disk, read-only filesystem, permissions
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        cli.fail(os_error_line(e), cli.EXIT_WRITE_FAILED)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
