"""Train a DDPM: ``python -m experiments.train --config configs/mnist.py --workdir runs/mnist``.

Any config key can be overridden, e.g. ``--config.train.batch_size=128``; offline data:
``--config.data.source=idx --config.data.path=../shared/data/mnist``. Running the same command
again resumes from the latest checkpoint in ``--workdir``.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax.checkpointing import CheckpointError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/mnist.py or configs/mnist.py:mean.", lock_config=True)
flags.DEFINE_string("workdir", "runs/mnist", "Directory for checkpoints, metrics, samples; an existing run there is resumed.")
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # orbax logs every save at INFO; keep the console readable
        logging.set_verbosity(logging.WARNING)
    from ddpm_jax.trainer import train_and_evaluate

    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        # Bad input: one clear line, no traceback, non-zero exit.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
