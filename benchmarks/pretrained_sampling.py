"""What importing and sampling the paper's CIFAR-10 network costs on this machine.

    python -m benchmarks.pretrained_sampling --out docs/results/pretrained_cifar10_sampling_cpu.json

Builds a diffusers folder in the layout of ``google/ddpm-cifar10-32`` (diffusers' own
``UNet2DModel`` with that configuration and seeded random weights: the released weights cost the
same to run, and random ones draw noise), then times the two commands a user runs on the real
folder, each in a fresh process:

    python -m experiments.import_checkpoint --source FOLDER --workdir WORKDIR
    python -m experiments.sample --workdir WORKDIR --method ddim --num_steps 50 --num 16

and writes their wall times, the sampler's own sampling and compile seconds (from the ``meta`` of
``samples.npz``) and the provenance to ``--out``. Needs torch and diffusers (the ``parity`` extra)
to build the folder; the two commands do not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: google/ddpm-cifar10-32's UNet2DModel and DDPMScheduler settings.
CIFAR10 = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
               layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
               norm_eps=1e-6, norm_num_groups=32, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
               act_fn="silu")
CIFAR10_SCHEDULER = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         variance_type="fixed_large", clip_sample=True)


def seeded_unet(config: dict, seed: int = 0):
    """diffusers' ``UNet2DModel(**config)`` with every tensor drawn from a seeded normal: weights
    with std 1/√fan_in (activations stay O(1)), biases N(0, 0.1²), GroupNorm scales N(1, 0.1²)."""
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    model = UNet2DModel(**config).eval()
    if len(model.state_dict()) != len(list(model.parameters())):  # a buffer would keep its default
        raise RuntimeError("UNet2DModel has tensors that are not parameters; they would not be drawn")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif p.ndim == 1:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
    return model


def write_random_folder(path: str, seed: int = 0) -> str:
    """A diffusers folder with the CIFAR-10 layout and weights drawn from a seeded normal."""
    from diffusers import DDPMScheduler

    seeded_unet(CIFAR10, seed).save_pretrained(path)
    DDPMScheduler(**CIFAR10_SCHEDULER).save_pretrained(path)
    return path


def _timed(cmd) -> float:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the JSON report")
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--num_steps", type=int, default=50)
    args = ap.parse_args(argv)
    from ddpm_jax import provenance
    from ddpm_jax.files import write_json

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_folder(os.path.join(tmp, "ddpm-cifar10-32-random"))
        workdir = os.path.join(tmp, "run")
        import_cmd = ["experiments.import_checkpoint", "--source", folder, "--workdir", workdir]
        sample_cmd = ["experiments.sample", "--workdir", workdir, "--method", "ddim", "--num_steps", str(args.num_steps),
                      "--num", str(args.num)]
        import_s = _timed(import_cmd)
        sample_s = _timed(sample_cmd)
        import numpy as np

        with np.load(os.path.join(workdir, "samples", f"ddim_steps{args.num_steps}_eta0_clip", "samples.npz")) as z:
            meta = json.loads(str(z["meta"]))
    report = {
        "weights": "seeded random (the google/ddpm-cifar10-32 layout, 35,746,307 parameters): the samples are noise",
        "import_command": "python -m experiments.import_checkpoint --source FOLDER --workdir WORKDIR",
        "sample_command": f"python -m experiments.sample --workdir WORKDIR --method ddim --num_steps {args.num_steps} "
                          f"--num {args.num}",
        "num_samples": args.num, "num_steps": args.num_steps,
        "import_wall_s": round(import_s, 2), "sample_wall_s": round(sample_s, 2),
        "sampling_s": meta["sample_seconds"], "compile_s": meta["compile_seconds"], "batch_size": meta["batch_size"],
        "images_per_s": round(args.num / meta["sample_seconds"], 3),
        "machine_of_the_commands": meta["provenance"]["machine"],
        "provenance": provenance.record(),
    }
    write_json(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "provenance"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
