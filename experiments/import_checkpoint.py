"""Import a released DDPM checkpoint (the diffusers layout) as a run directory.

    python -m experiments.import_checkpoint --source ddpm-ema-cifar10-32 --workdir runs/ddpm_cifar10
    python -m experiments.import_checkpoint --source ddpm-ema-church-256 --workdir runs/ddpm_church \\
        --config configs/ddpm_256.py:church --config.data.path=DIR

``--source`` is a folder as ``huggingface-cli download google/ddpm-ema-cifar10-32`` leaves it
(``ddpm_jax/pretrained.py`` says what it may hold and how each tensor is mapped). The run
directory gets ``config.json`` and the checkpoint of step 0 in the trainer's layout, with params
and EMA params both the imported weights and a fresh optimiser state, so that
``experiments.sample``, ``experiments.evaluate``, ``experiments.study_samplers`` and
``experiments.train`` (fine-tuning: it resumes from step 0) take it as any run.

``--config`` is the training recipe for the keys the folder does not decide (data, optimiser,
training, checkpoints); default: ``configs/cifar10.py`` for 32×32×3 images, else
``configs/ddpm_256.py``. Overrides work as in ``experiments.train``. The last line printed is the
``experiments.train`` command that fine-tunes the run with the same config.

Every check (the folder, the configuration, each tensor's name and shape, an absent or empty
``--workdir``) is made before anything is written; a failure is one ``error:`` line and exit code
2 (4 when the run directory cannot be written; what was written is removed).
"""

import os
import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("source", None, "A diffusers model folder: config.json, diffusion_pytorch_model.safetensors (or "
                    ".bin) and scheduler_config.json, at its root or in unet/ and scheduler/.")
flags.DEFINE_string("workdir", None, "The run directory to create (absent or empty).")
config_flags.DEFINE_config_file("config", None, "Training recipe for the data, optimiser and training keys "
                                "(default: configs/cifar10.py for 32x32x3 images, else configs/ddpm_256.py).")
flags.mark_flags_as_required(["source", "workdir"])

#: The recipe used without --config: (config file, its module), by image shape.
DEFAULT_RECIPES = {(32, 32, 3): ("configs/cifar10.py", "configs.cifar10")}
FALLBACK_RECIPE = ("configs/ddpm_256.py", "configs.ddpm_256")


def recipe(image_shape):
    """``(spec, base config, the user's override flags)``: --config, or the default for ``image_shape``."""
    import importlib

    if FLAGS.config is not None:
        args, overrides = sys.argv[1:], []
        for i, a in enumerate(args):  # --config.key=value, or --config.key value
            if a.startswith("--config."):
                overrides += [a] if "=" in a or i + 1 == len(args) else [f"{a}={args[i + 1]}"]
        return config_flags.get_config_filename(FLAGS["config"]), FLAGS.config, overrides
    spec, module = DEFAULT_RECIPES.get(tuple(image_shape), FALLBACK_RECIPE)
    return spec, importlib.import_module(module).get_config(), []


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
        logging.set_verbosity(logging.WARNING)
    from ddpm_jax import pretrained
    from ddpm_jax.files import os_error_line

    try:
        workdir = pretrained.check_new_workdir(FLAGS.workdir)
        folder = pretrained.locate(FLAGS.source)
        shape = pretrained.network_settings(folder.unet_config, os.path.join(folder.unet_dir, "config.json")).image_shape
        spec, base, user_overrides = recipe(shape)
        imported = pretrained.load_pretrained(folder, base)
    except ValueError as e:
        cli.fail(e)
    info = imported.info
    print(f"{info['weights']}: {info['num_tensors']} tensors{' (legacy attention names)' if info['legacy_names'] else ''}"
          f" -> DDPMUNet {imported.image_shape}, {info['num_params']:,} parameters, every tensor used once", flush=True)
    print("params and EMA params both hold these weights; " + (
        "the folder's name marks them as the EMA average (google/ddpm-ema-*)" if info["ema"] else
        "the folder's name does not mark them as an EMA average (the paper's EMA weights are google/ddpm-ema-*)"),
        flush=True)
    try:
        workdir = pretrained.save_as_run(imported, workdir)
    except ValueError as e:
        cli.fail(e)
    except OSError as e:
        cli.fail(os_error_line(e), cli.EXIT_WRITE_FAILED)
    s = imported.config.sampling
    print(f"{workdir}: config.json ({spec} with the folder's network, schedule and sampler: {s.method}, "
          f"ddpm_variance={s.ddpm_variance}, clip_x0={s.clip_x0}) and checkpoints/0", flush=True)
    flags_, missing = pretrained.recipe_overrides(imported.config, base)
    if missing:
        print(f"to fine-tune, give experiments.train a config with the keys {', '.join(missing)} "
              f"(they are in {workdir}/config.json, not in {spec})", flush=True)
    else:
        print("fine-tune with: python -m experiments.train --config " + " ".join(
            shlex.quote(a) for a in [spec, "--workdir", workdir] + user_overrides + flags_), flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
