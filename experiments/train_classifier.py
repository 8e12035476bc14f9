"""Train the small MNIST CNN whose weights ship in ``ddpm_jax/metrics/weights/``.

    python -m experiments.train_classifier --data_path DIR \\
        --out ddpm_jax/metrics/weights/mnist_classifier.msgpack [--epochs 4 --seed 0]

Trains :class:`ddpm_jax.metrics.classifier.MnistCNN` on the official 60k MNIST training split
(images in [0, 1]) with optax Adam and a cosine learning-rate decay, optionally with random
±``--max_shift`` pixel translations, then reports accuracy on the official 10k test split. The
weights are written (flax msgpack, with the settings and test accuracy as metadata) only when the
test accuracy is at least ``--min_accuracy`` (0.99); otherwise nothing is written and the exit
status is 1. A few minutes on a laptop CPU.
"""

import os
import sys
import time

from absl import app, flags, logging

from experiments import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("data_path", None, "Directory of MNIST IDX files (train-images-idx3-ubyte.gz, ...).")
flags.DEFINE_string("out", "ddpm_jax/metrics/weights/mnist_classifier.msgpack", "Output weights file.")
flags.DEFINE_integer("epochs", 4, "Training epochs.")
flags.DEFINE_integer("seed", 0, "Seed for init, shuffling and augmentation.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("learning_rate", 2e-3, "Peak Adam learning rate (cosine-decayed to 0).")
flags.DEFINE_integer("max_shift", 2, "Random translation augmentation in pixels (0 disables).")
flags.DEFINE_float("min_accuracy", 0.99, "Refuse to write the weights below this test accuracy.")
flags.mark_flags_as_required(["data_path"])


def _shift(images, key, max_shift: int):
    """Translates each image by an integer (dy, dx) in [-max_shift, max_shift]² (zero fill)."""
    import jax
    import jax.numpy as jnp

    if max_shift <= 0:
        return images
    b, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    offs = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)
    crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
    return jax.vmap(crop)(padded, offs)


def train(train_x, train_y, *, epochs, seed, batch_size, learning_rate, max_shift, progress=True):
    """Returns trained params. ``train_x`` (N, 28, 28, 1) float32 in [0, 1], ``train_y`` (N,) int."""
    import jax
    import optax
    from tqdm.auto import tqdm

    from ddpm_jax.metrics import classifier

    n = train_x.shape[0]
    steps_per_epoch = n // batch_size
    total = steps_per_epoch * epochs
    key = jax.random.PRNGKey(seed)
    k_init, k_data = jax.random.split(key)
    params = classifier.init_params(k_init)
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, total))
    opt_state = tx.init(params)
    xs = jax.device_put(train_x)
    ys = jax.device_put(train_y.astype("int32"))

    def loss_fn(p, x, y):
        logits = classifier.MODEL.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, o, idx, k):
        x = _shift(xs[idx], k, max_shift)
        loss, g = jax.value_and_grad(loss_fn)(p, x, ys[idx])
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

    for epoch in range(epochs):
        k_perm, k_aug = jax.random.split(jax.random.fold_in(k_data, epoch))
        perm = jax.random.permutation(k_perm, n)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", unit="step", disable=not progress)
        for i in bar:
            idx = jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)
            params, opt_state, loss = step(params, opt_state, idx, jax.random.fold_in(k_aug, i))
            if i % 50 == 0:
                bar.set_postfix(loss=f"{float(loss):.4f}")
    return params


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import jax
    import numpy as np

    from ddpm_jax import data
    from ddpm_jax.metrics import classifier

    if FLAGS.epochs < 1 or FLAGS.batch_size < 1:
        print(f"error: --epochs={FLAGS.epochs} and --batch_size={FLAGS.batch_size} must be >= 1", file=sys.stderr)
        sys.exit(2)
    try:
        arrays = data.load_idx_directory(FLAGS.data_path)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    train_x = data.scale_images(arrays["train_images"], "[0,1]")
    test_x = data.scale_images(arrays["test_images"], "[0,1]")
    if train_x.shape[1:] != classifier.IMAGE_SHAPE:
        print(f"error: expected 28x28x1 MNIST images, got {train_x.shape[1:]}", file=sys.stderr)
        sys.exit(2)
    print(f"train {train_x.shape[0]} / test {test_x.shape[0]} images; {FLAGS.epochs} epochs, batch {FLAGS.batch_size}, seed {FLAGS.seed}")

    t0 = time.time()
    params = train(
        train_x,
        arrays["train_labels"],
        epochs=FLAGS.epochs,
        seed=FLAGS.seed,
        batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate,
        max_shift=FLAGS.max_shift,
    )
    params = jax.tree_util.tree_map(np.asarray, params)
    train_s = time.time() - t0
    pred = classifier.predict(test_x, params=params)
    acc = float(np.mean(pred == arrays["test_labels"]))
    n_params = sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(params))
    print(f"test accuracy {acc:.4f} ({int(np.sum(pred == arrays['test_labels']))}/{len(pred)}); "
          f"{n_params} params; trained in {train_s:.1f} s")

    if acc < FLAGS.min_accuracy:
        print(
            f"error: test accuracy {acc:.4f} < --min_accuracy={FLAGS.min_accuracy}; not writing {FLAGS.out!r} "
            f"(try more --epochs or another --seed)",
            file=sys.stderr,
        )
        sys.exit(1)
    out = os.path.abspath(FLAGS.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    meta = {
        "architecture": "MnistCNN conv16-pool-conv32-pool-conv64-pool-dense128-dense10",
        "num_params": n_params,
        "epochs": FLAGS.epochs,
        "seed": FLAGS.seed,
        "batch_size": FLAGS.batch_size,
        "learning_rate": FLAGS.learning_rate,
        "max_shift": FLAGS.max_shift,
        "test_accuracy": acc,
        "train_split": "official MNIST train (60k)",
        "test_split": "official MNIST t10k (10k)",
    }
    digest = classifier.save_weights_file(out, params, meta)
    print(f"wrote {out} ({os.path.getsize(out)} bytes, sha256 {digest[:12]})")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
