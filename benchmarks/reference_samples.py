"""Samples from the notebook's PyTorch code (the reference implementation, docs/source_material.md),
for like-for-like quality comparisons.

Not part of the package and not imported by it: run it with the reference's own environment
(REF: its directory; MNIST: the IDX files), after its ``quality`` command has trained and saved weights:

    cd $REF && GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184 \\
        /tmp/venv-torch/bin/python bench_torch_seed.py --mnist-dir $MNIST quality --no-val --budget-s 100000 \\
        --save-pt /tmp/ref/ref.pt --png /tmp/ref/ref.png
    /tmp/venv-torch/bin/python benchmarks/reference_samples.py /tmp/ref/ref.pt /tmp/ref/samples.npz 10000

Draws N samples with the notebook's ancestral ε sampler (σ_t² = β_t, unclipped), 500 at a time,
and saves ``samples`` (N, 28, 28, 1) in the data's [0, 1] scale, the format
``experiments.compare_fid`` reads.
"""

import os
import sys
import time

import numpy as np


def main(weights: str, out: str, num: int, bench_dir: str) -> None:
    import torch

    sys.path.insert(0, bench_dir)
    from torch_seed_ref import Diffusion, ScoreNetEps, sample_from_model_new

    torch.set_num_threads(2)
    torch.manual_seed(12345)
    model = ScoreNetEps(channels=[8, 16, 32, 64])
    model.load_state_dict(torch.load(weights))
    model.eval()
    diffusion = Diffusion(model, 200, "cpu", 1e-4, 0.1)
    chunks, t0 = [], time.time()
    with torch.no_grad():
        for start in range(0, num, 500):
            chunks.append(sample_from_model_new(diffusion, min(500, num - start)).numpy())
            print(f"{start + len(chunks[-1])} samples, {time.time() - t0:.0f}s", flush=True)
    x = np.concatenate(chunks).transpose(0, 2, 3, 1).astype(np.float32)  # NCHW -> NHWC
    np.savez_compressed(out, samples=x)
    print(f"-> {out} {x.shape}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: reference_samples.py WEIGHTS.pt OUT.npz NUM")
    here = os.path.dirname(os.path.abspath(__file__))
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), os.path.join(here, "..", "..", "shared", "bench"))
