"""FID reference statistics of a data source with pytorch-fid's Inception-v3, in pytorch-fid's ``.npz`` layout.

    python -m experiments.reference_stats --data_source tfds --data_name cifar10 --split train \
        --inception_weights pt_inception-2015-12-05-6726825d.pth --out stats/cifar10_train.npz
    python -m experiments.reference_stats --data_source idx --data_path DIR --out stats/mnist_train.npz
    python -m experiments.reference_stats --data_source folder --data_path my_images/ --out stats/mine.npz

Reads every image of the split (``--split train`` by default; a flat image folder is read whole:
``--split all``), computes the pool3 features of pytorch-fid's FID Inception
(:mod:`ddpm_jax.metrics.inception`: resized to 299 bilinearly, batched, on all devices) and
writes their mean ``mu`` and covariance ``sigma`` (float64) with the number of images, the
extractor id and the weights' SHA-256, and this command's provenance (JSON text under
``provenance``). pytorch-fid (``fid_score.py stats.npz other.npz``) and TTUR read the file as it is.

Without ``--inception_weights`` the weights come from the per-user cache, downloaded there once
over HTTPS. A weights file that is not pytorch-fid's (its SHA-256), a pickle that would execute
code, a split of N ≤ 2048 images (a singular 2048 x 2048 covariance), images outside 0..255 /
[0, 1], or an output that cannot be written: one ``error:`` line, exit 2 (4 for the output).
"""

import json
import os
import time

from absl import app, flags

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_enum("data_source", None, ["idx", "tfds", "folder"], "Where the images come from (ddpm_jax.data.sources).")
flags.DEFINE_string("data_path", None, "The IDX directory, the image folder, or TFDS's data_dir (optional for tfds).")
flags.DEFINE_string("data_name", "cifar10", "TFDS dataset name (--data_source tfds).")
flags.DEFINE_enum("split", None, ["train", "test", "all"], "Which images: the training split (the field's reference "
                  "for CIFAR-10), the test split, or both. Default: train, or all for --data_source folder.")
flags.DEFINE_integer("num", 0, "Use a random subset of this many images (0: all of the split).", lower_bound=0)
flags.DEFINE_integer("seed", 0, "Seed of the --num subset.")
flags.DEFINE_string("inception_weights", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: the "
                    "per-user cache, downloaded over HTTPS when missing).")
flags.DEFINE_bool("allow_other_weights", False, "Accept a weights file whose SHA-256 is not pytorch-fid's (its own "
                  "SHA-256 is recorded, so its statistics are only ever compared with those of the same file).")
flags.DEFINE_bool("allow_small_n", False, "Write statistics of N <= 2048 images (a singular covariance; FIDs against "
                  "them are not comparable with the field's). For tests and quick looks.")
flags.DEFINE_integer("batch_size", 200, "Images per compiled Inception call.", lower_bound=1)
flags.DEFINE_enum("precision", "highest", ["highest", "default"], "Float32 convolutions ('highest') or the "
                  "backend's faster default (TF32 / bfloat16 operands on GPU / TPU).")
flags.DEFINE_string("out", None, "The statistics file to write (.npz).")
cli.define_platform_flag()
flags.mark_flags_as_required(["data_source", "out"])


def _images(split: str):
    from ddpm_jax import data

    raw = data.load_raw(FLAGS.data_source, name=FLAGS.data_name, path=FLAGS.data_path or None)
    import numpy as np

    if split == "all":
        return np.concatenate([raw["train_images"], raw["test_images"]])
    return raw[f"{split}_images"]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ddpm_jax import platform_profile

    platform_profile.setup(FLAGS.platform, batch_sizes=[FLAGS.batch_size])
    import jax
    import numpy as np

    from ddpm_jax import provenance, torch_checkpoint
    from ddpm_jax.files import check_writable, os_error_line
    from ddpm_jax.metrics import inception, inception_metrics

    t_start = time.time()
    out = os.path.abspath(FLAGS.out)
    split = FLAGS.split or ("all" if FLAGS.data_source == "folder" else "train")
    try:
        if not out.endswith(".npz"):
            raise ValueError(f"--out {FLAGS.out}: the statistics file must end in .npz (pytorch-fid's layout)")
        if FLAGS.data_source in ("idx", "folder") and not FLAGS.data_path:
            raise ValueError(f"--data_source {FLAGS.data_source} needs --data_path")
        check_writable(os.path.dirname(out), "--out's directory", need_bytes=2**26)
    except OSError as e:
        cli.fail(os_error_line(e), cli.EXIT_WRITE_FAILED)
    except ValueError as e:
        cli.fail(e)
    try:
        weights = inception.load_weights(FLAGS.inception_weights,
                                         expected_sha256=None if FLAGS.allow_other_weights else inception.FID_WEIGHTS_SHA256)
        images = _images(split)
        if FLAGS.num:
            if FLAGS.num > images.shape[0]:
                raise ValueError(f"--num {FLAGS.num} exceeds the {images.shape[0]} images of split {split!r}")
            images = images[np.sort(np.random.default_rng(FLAGS.seed).choice(images.shape[0], FLAGS.num, replace=False))]
        if not FLAGS.allow_small_n:
            inception_metrics.check_fid_size(images.shape[0], f"images (split {split!r})",
                                             "--allow_small_n writes their statistics anyway")
        inception.check_images(images, f"split {split!r}")
    except (ValueError, TypeError, FileNotFoundError, ImportError, RuntimeError, torch_checkpoint.CheckpointFormatError) as e:
        cli.fail(e)
    except OSError as e:
        cli.fail(os_error_line(e))

    n = int(images.shape[0])
    print(f"{n} images {tuple(images.shape[1:])} ({FLAGS.data_source}, split {split}); Inception weights "
          f"{weights.sha256[:16]}…; batches of {FLAGS.batch_size} on {len(jax.local_devices())} device(s)",
          flush=True)
    t0 = time.time()
    feats = inception.extract(images, weights, FLAGS.batch_size, outputs=("pool3",), precision=FLAGS.precision,
                              progress=True, desc="pool3")["pool3"]
    dt = time.time() - t0
    stats = inception_metrics.statistics_from_features(feats, weights.sha256, allow_small_n=FLAGS.allow_small_n)
    record = provenance.record(wall_s=time.time() - t_start, data={
        "source": FLAGS.data_source, "name": FLAGS.data_name if FLAGS.data_source == "tfds" else None,
        "path": FLAGS.data_path, "split": split, "num": n, "image_shape": list(images.shape[1:])},
        features_s=round(dt, 3), precision=FLAGS.precision)
    try:
        inception_metrics.save_statistics(out, stats, extra={"provenance": json.dumps(record)})
    except OSError as e:
        cli.fail(os_error_line(e), cli.EXIT_WRITE_FAILED)
    print(f"pool3 features of {n} images in {dt:.1f}s ({n / max(dt, 1e-9):.1f} images/s) -> {out} "
          f"(mu {stats['mu'].shape}, sigma {stats['sigma'].shape}, extractor {stats['extractor_id']})", flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
