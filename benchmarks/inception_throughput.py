"""Throughput of the FID Inception-v3 feature extraction (``ddpm_jax.metrics.inception.extract``).

    python -m benchmarks.inception_throughput --out docs/results/inception_throughput_cpu.json
    python -m benchmarks.inception_throughput --batch_size 8 --blocks 1 --batches_per_block 1   # a quick check

Measures, with random weights (the speed does not depend on their values):

- ``images_per_sec``: ``extract`` on 32×32×3 float images (``--image_size``, ``--channels``) in
  batches of ``--batch_size``: host → device, bilinear resize to 299, the network, pool3 and the
  unbiased logits back to the host — what ``experiments.reference_stats`` and
  ``experiments.evaluate --inception_weights`` run per batch. Median over ``--blocks`` timed
  blocks of ``--batches_per_block`` batches each, after a warm-up call;
- ``compile_s``: lowering + XLA compilation of the resize and of the network for that batch
  (measured separately, before the warm-up);
- ``gflops_per_image``: XLA's cost analysis of the compiled network, per image.

On a CPU the batch is split over one JAX device per core that divides it (as the entry points
do; ``--cpu_devices`` overrides). Prints a line per measure and writes them to ``--out`` as JSON
with the command's provenance.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch_size", type=int, default=200, help="images per compiled call")
    ap.add_argument("--image_size", type=int, default=32, help="input height = width")
    ap.add_argument("--channels", type=int, choices=(1, 3), default=3)
    ap.add_argument("--blocks", type=int, default=5, help="timed blocks (median reported)")
    ap.add_argument("--batches_per_block", type=int, default=4, help="batches per timed block")
    ap.add_argument("--precision", choices=("highest", "default"), default="highest",
                    help="float32 convolutions, or the backend's faster default (TF32 / bfloat16 operands on GPU / TPU)")
    ap.add_argument("--platform", choices=("auto", "cpu", "accelerator"), default="auto",
                    help="platform profile, as the entry points' --platform (ddpm_jax.platform_profile)")
    ap.add_argument("--cpu_devices", type=int, default=0, help="CPU only: devices to split each batch over (0: one per core)")
    ap.add_argument("--out", default=None, help="JSON file to write (e.g. docs/results/inception_throughput_cpu.json)")
    args = ap.parse_args(argv)
    for name in ("batch_size", "image_size", "blocks", "batches_per_block"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")

    from ddpm_jax import platform_profile

    platform_profile.setup(args.platform, cpu_devices=args.cpu_devices, batch_sizes=[args.batch_size])
    import jax
    import numpy as np

    from ddpm_jax import provenance
    from ddpm_jax.files import check_writable, os_error_line, write_json
    from ddpm_jax.metrics import inception

    if args.out:
        import os

        try:
            check_writable(os.path.dirname(os.path.abspath(args.out)) or ".", "--out's directory")
        except OSError as e:
            ap.error(os_error_line(e))
    t_start = time.perf_counter()
    bs = inception._batch_size_for_devices(args.batch_size, args.batch_size)  # noqa: SLF001  (what extract uses)
    variables = inception.init_variables(jax.random.PRNGKey(0))
    n = bs * args.batches_per_block
    images = np.random.default_rng(0).uniform(size=(n, args.image_size, args.image_size, args.channels)).astype(np.float32)
    outputs = ("pool3", "logits_unbiased")

    batch_sh, _ = inception._placement(bs)  # noqa: SLF001
    x = jax.device_put(images[:bs], batch_sh) if batch_sh is not None else jax.numpy.asarray(images[:bs])
    t0 = time.perf_counter()
    pre = inception._preprocess_batch.lower(x).compile()  # noqa: SLF001
    x299 = pre(x)
    net = inception._forward.lower(variables, x299, args.precision, outputs).compile()  # noqa: SLF001
    compile_s = time.perf_counter() - t0
    cost = net.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    gflops = float(cost.get("flops", float("nan"))) / bs / 1e9 if cost else float("nan")

    inception.extract(images[:bs], variables, bs, outputs=outputs, precision=args.precision)  # warm-up (compiles)
    rates = []
    for _ in range(args.blocks):
        t0 = time.perf_counter()
        inception.extract(images, variables, bs, outputs=outputs, precision=args.precision)
        rates.append(n / (time.perf_counter() - t0))
    device = f"{len(jax.local_devices())} x {jax.devices()[0].device_kind}"
    results = {"images_per_sec": round(statistics.median(rates), 3), "compile_s": round(compile_s, 3),
               "gflops_per_image": round(gflops, 3), "per_block_images_per_sec": [round(r, 3) for r in rates]}
    setup = {"batch_size": bs, "image_shape": [args.image_size, args.image_size, args.channels], "blocks": args.blocks,
             "batches_per_block": args.batches_per_block, "precision": args.precision, "device": device,
             "weights": "random (flax initialisers)"}
    for k in ("images_per_sec", "compile_s", "gflops_per_image"):
        print(f"{k:18s} {results[k]:10.4g}   (batch {bs} of {tuple(setup['image_shape'])}, {args.precision}, {device})")
    report = {"benchmark": "inception_throughput", "setup": setup, "results": results,
              "provenance": provenance.record(wall_s=time.perf_counter() - t_start)}
    if args.out:
        try:
            write_json(args.out, report)
        except OSError as e:
            print(f"error: {os_error_line(e)}", file=sys.stderr)
            return 4
        print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
