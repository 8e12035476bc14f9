"""Compare sample sets under the notebook's FID protocol, over repeated draws, paired.

    python -m experiments.compare_fid --samples ours=runs/mnist/samples/eps_ddpm/samples.npz \
        --samples reference=/tmp/reference_samples.npz --data_path DIR --num 1000 --draws 10

One draw of the notebook's protocol (pixel FID of N unclipped samples against N random real images)
has a standard deviation of ~0.1 at N = 1,000, as large as the differences one wants to see. So for
each draw i = 0..draws−1 this takes the i-th disjoint chunk of N samples from *every* set and one
random N-subset of the real pool (all train + test images; a fresh subset per draw, the same for
every set), plus a second disjoint N-subset for the real-vs-real floor. Reports per set the FIDs,
their mean, standard deviation and range, and for each pair of sets the mean paired difference with
its standard error (the draws share their real images, which cancels much of the noise).
Samples are ``.npz`` files with ``samples`` (N, H, W, C) in the data's [0, 1] scale, e.g. from
``experiments.sample``. Writes ``--out`` (JSON).
"""

import os
import sys

import numpy as np
from absl import app, flags

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("samples", None, "NAME=PATH of a samples.npz (repeat for each set).")
flags.DEFINE_integer("num", 1000, "N: samples and real images per FID.", lower_bound=2)
flags.DEFINE_integer("draws", 10, "Independent draws (disjoint sample chunks, fresh real subsets).", lower_bound=2)
flags.DEFINE_integer("seed", 100, "Draw i takes its real subsets from default_rng(seed + i).")
flags.DEFINE_enum("data_source", "auto", ["auto", "idx", "tfds"], "Where the real images come from (ddpm_jax.data.sources).")
flags.DEFINE_string("data_path", "", "IDX directory (default for 'auto': the per-user cache, downloaded once).")
flags.DEFINE_string("data_name", "mnist", "Dataset name.")
flags.DEFINE_string("out", None, "JSON report path (default: print only).")
flags.mark_flags_as_required(["samples"])


def _fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from ddpm_jax import data

    sets = {}
    for item in FLAGS.samples:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            _fail(f"--samples {item!r}: expected NAME=PATH")
        if not os.path.exists(path):
            _fail(f"--samples {name}: {path} does not exist")
        x = np.load(path)["samples"]
        if x.shape[0] < FLAGS.num * FLAGS.draws:
            _fail(f"--samples {name}: {x.shape[0]} samples, fewer than --num × --draws = {FLAGS.num * FLAGS.draws}")
        sets[name] = x
    try:
        raw = data.load_raw(FLAGS.data_source, name=FLAGS.data_name, path=FLAGS.data_path or None)
    except (ValueError, FileNotFoundError, ImportError) as e:
        _fail(str(e))
    pool = data.scale_images(np.concatenate([raw["train_images"], raw["test_images"]]), "[0,1]")
    if pool.shape[0] < 2 * FLAGS.num:
        _fail(f"the real pool has {pool.shape[0]} images, fewer than 2 × --num")
    shapes = {name: x.shape[1:] for name, x in sets.items()}
    if any(s != pool.shape[1:] for s in shapes.values()):
        _fail(f"sample shapes {shapes} differ from the real images' {pool.shape[1:]}")
    from ddpm_jax.evaluation import paired_fid_draws

    report = paired_fid_draws(sets, pool, FLAGS.num, FLAGS.draws, FLAGS.seed)
    from ddpm_jax import provenance

    report["samples"] = {item.partition("=")[0]: provenance.relative(item.partition("=")[2]) for item in FLAGS.samples}
    for name, r in report["sets"].items():
        print(f"{name:24s} FID {r['mean']:.3f} ± {r['sd']:.3f} (sd over {FLAGS.draws} draws), range {r['min']:.3f}..{r['max']:.3f}")
    f = report["floor"]
    print(f"{'real vs real (floor)':24s} FID {f['mean']:.3f} ± {f['sd']:.3f}")
    for pair, r in report["paired_differences"].items():
        print(f"{pair:24s} paired difference {r['mean']:+.3f} ± {r['se']:.3f} (standard error)")
    if FLAGS.out:
        from ddpm_jax.files import write_json

        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        write_json(FLAGS.out, {**report, "provenance": provenance.record()}, indent=1)
        print(f"-> {FLAGS.out}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
