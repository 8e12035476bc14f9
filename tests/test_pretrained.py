"""The DDPM paper's released checkpoints (the diffusers layout) imported by ``ddpm_jax.pretrained`` and
``experiments.import_checkpoint``, proven equal output for output to diffusers itself.

diffusers' own ``UNet2DModel`` is built offline from the released configurations with seeded random
weights in every tensor (no layer left at zero, GroupNorm scales and biases random too), saved with
``save_pretrained`` and imported; the imported network at this codebase's t must equal diffusers'
at t − 1. The CIFAR-10 import (35.7M parameters) is made once per module, through the command line
with PyTorch and diffusers blocked from being imported.

Tolerances: outputs are compared relative to the largest magnitude of diffusers' output. Both sides
compute in float32 (unit roundoff u = 2^-24 ≈ 6e-8); a 3×3 convolution sums up to 9·512 = 4,608
products (√4608·u ≈ 4e-6 for rounding that adds up like a random walk), and the network is ~30
such layers deep, with the sinusoid's argument t·f_j (t ≤ 999) rounded differently by the two
(≤ 999·u ≈ 6e-5 absolute, see test_sinusoid_equals_diffusers). 1e-4 covers that with room; an
off-by-one in the time index alone moves the output by ~5e-2 (checked below).
"""

import copy
import json
import os
import shlex
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.numpy import load_file, save_file

from ddpm_jax import pretrained, sampling
from ddpm_jax.config import validate_config
from ddpm_jax.models import count_params, make_model_fn, model_from_config
from ddpm_jax.models.ddpm_unet import timestep_embedding
from ddpm_jax.runs import load_run
from helpers import REPO, cpu_env, run_module

sys.path.insert(0, REPO)
from benchmarks.pretrained_sampling import CIFAR10, CIFAR10_SCHEDULER, seeded_unet  # noqa: E402  (google/ddpm-cifar10-32)
from configs import cifar10, ddpm_256  # noqa: E402

#: output tolerance relative to max |diffusers' output|, derived in the module docstring
REL_TOL = 1e-4

#: the 256×256 family's block structure (google/ddpm-*-256: (128, 128, 256, 256, 512, 512), attention
#: at the 5th level, 16×16 of 256) at a quarter of the width and 64×64, where the 5th level is 4×4
REDUCED_256 = dict(CIFAR10, sample_size=64, block_out_channels=(32, 32, 64, 64, 128, 128), norm_num_groups=8,
                   down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)
SCHEDULER_256 = dict(CIFAR10_SCHEDULER, variance_type="fixed_small")
#: a network of seconds, for the command lines and the bad inputs
TINY = dict(CIFAR10, sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
TINY_SCHEDULER = dict(CIFAR10_SCHEDULER, num_train_timesteps=20, beta_end=0.2, variance_type="fixed_small")

#: prepended to a subprocess's code: importing torch or diffusers raises ModuleNotFoundError
BLOCK_TORCH = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'diffusers'):
            raise ModuleNotFoundError(f'blocked: {name}')
sys.meta_path.insert(0, _Block())
"""


def write_folder(path, model, scheduler, *, pipeline=False):
    """A diffusers model folder: the UNet and the scheduler at the root, or in unet/ and scheduler/."""
    model.save_pretrained(os.path.join(path, "unet") if pipeline else path)
    DDPMScheduler(**scheduler).save_pretrained(os.path.join(path, "scheduler") if pipeline else path)
    return str(path)


def diffusers_eps(model, x_nhwc, t_from_zero):
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))),
                    torch.from_numpy(np.asarray(t_from_zero, np.int64))).sample
    return out.numpy().transpose(0, 2, 3, 1)


def largest_relative_difference(ours, reference):
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


# --------------------------------------------------------------------------- the CIFAR-10 network


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """(the diffusers model, its folder, the run directory, the import's stdout): one save and one import
    through the command line, with torch and diffusers blocked in that process."""
    model = seeded_unet(CIFAR10, seed=0)
    folder = write_folder(tmp_path_factory.mktemp("ddpm-ema-cifar10-32"), model, CIFAR10_SCHEDULER)
    workdir = str(tmp_path_factory.mktemp("imported") / "ddpm_cifar10")
    code = BLOCK_TORCH + """
import runpy
sys.argv = ['import_checkpoint'] + sys.argv[1:]
try:
    runpy.run_module('experiments.import_checkpoint', run_name='__main__', alter_sys=True)
except SystemExit as e:
    code = e.code
leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers'))
print('imported modules:', leaked)
sys.exit(code)
"""
    proc = subprocess.run([sys.executable, "-c", code, "--source", folder, "--workdir", workdir], cwd=REPO,
                          capture_output=True, text=True, env=cpu_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return model, folder, workdir, proc.stdout


@pytest.fixture(scope="module")
def cifar_run(cifar):
    return load_run(cifar[2])


def test_cifar10_import_needs_neither_torch_nor_diffusers(cifar):
    _, _, workdir, out = cifar
    assert "imported modules: []" in out
    assert "328 tensors -> DDPMUNet (32, 32, 3), 35,746,307 parameters, every tensor used once" in out
    assert "the folder's name marks them as the EMA average" in out  # the folder is named ddpm-ema-cifar10-32*
    assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json"]


def test_cifar10_layout_uses_every_tensor_once(cifar, cifar_run):
    """The name map is a bijection between DDPMUNet's 35,746,307 parameters and diffusers' 328 tensors."""
    model, run = cifar[0], cifar_run
    assert count_params(run.params)[0] == count_params(run.ema_params)[0] == 35_746_307
    leaves = jax.tree_util.tree_flatten_with_path(run.params)[0]
    names = [pretrained.torch_name(tuple(p.key for p in path), 4) for path, _ in leaves]
    assert len(names) == len(set(names)) == len(model.state_dict()) == 328
    assert set(names) == set(model.state_dict())
    assert run.meta["imported"]["num_tensors"] == 328 and run.meta["imported"]["ema"] is True
    assert run.step == 0


def test_cifar10_run_is_the_papers_recipe_with_the_step_shifted(cifar, cifar_run):
    """config.json is configs/cifar10.py with the network fed t − 1: the paper's sampler (σ² = β,
    clipped x̂_0), and fine-tuning resumes with one override."""
    _, _, workdir, out = cifar
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    want = json.loads(json.dumps(cifar10.get_config().to_dict()))
    want["model"]["time_input"] = "index_from_zero"
    assert saved == want
    assert out.strip().splitlines()[-2] == (f"fine-tune with: python -m experiments.train --config configs/cifar10.py "
                                            f"--workdir {workdir} --config.model.time_input=index_from_zero")
    assert cifar_run.sampler_options() == {"method": "eps_ddpm", "num_steps": None, "eta": 0.0, "ddpm_variance": "beta",
                                     "parameterisation": "eps", "clip_x0": (-1.0, 1.0)}


def test_cifar10_equals_diffusers_output_for_output(cifar, cifar_run):
    """load_run(workdir).model_fn() at t ∈ {1, 10, 500, 1000} equals diffusers' forward at t − 1,
    two images each. Measured: largest relative difference 2.4e-6 (t = 1000; tolerance 1e-4, module
    docstring); diffusers at t instead of t − 1 differs by 5.8e-2."""
    model, run = cifar[0], cifar_run
    x = np.random.default_rng(0).standard_normal((8, 32, 32, 3)).astype(np.float32)
    t = np.repeat([1, 10, 500, 1000], 2)
    fn = jax.jit(run.model_fn())
    ours = np.asarray(fn(jnp.asarray(x), jnp.asarray(t, jnp.int32)))
    ref = diffusers_eps(model, x, t - 1)
    for k in range(0, 8, 2):
        rel = largest_relative_difference(ours[k:k + 2], ref[k:k + 2])
        assert rel < REL_TOL, f"t = {t[k]}: largest relative difference {rel:.2e}"
    # the shift matters: diffusers at t itself is far off (one step of the time index)
    off = largest_relative_difference(ours[::2], diffusers_eps(model, x[::2], t[::2]))
    assert off > 100 * REL_TOL, f"diffusers at t instead of t - 1 differs by only {off:.2e}"


# --------------------------------------------------------------------------- the 256×256 family


@pytest.fixture(scope="module")
def reduced_256(tmp_path_factory):
    """(diffusers model, folder in the pipeline layout (unet/, scheduler/), its import)."""
    model = seeded_unet(REDUCED_256, seed=1)
    folder = write_folder(tmp_path_factory.mktemp("ddpm-church-64"), model, SCHEDULER_256, pipeline=True)
    return model, folder, pretrained.load_pretrained(folder, ddpm_256.get_config())


def test_reduced_256_family_equals_diffusers(reduced_256, tmp_path):
    """The 256×256 family's layout (six levels, attention at the 5th) at reduced width and 64×64,
    from the unet/ + scheduler/ layout, written as a run and loaded back. Measured: largest relative
    difference 1.4e-6 (tolerance 1e-4)."""
    model, _, imported = reduced_256
    assert imported.config.model.ch_mult == (1, 1, 2, 2, 4, 4) and imported.config.model.attn_resolutions == (4,)
    assert imported.config.sampling.ddpm_variance == "posterior" and imported.info["ema"] is False
    run = load_run(pretrained.save_as_run(imported, str(tmp_path / "run")))
    x = np.random.default_rng(1).standard_normal((4, 64, 64, 3)).astype(np.float32)
    t = np.array([1, 10, 500, 1000])
    ours = np.asarray(jax.jit(run.model_fn())(jnp.asarray(x), jnp.asarray(t, jnp.int32)))
    rel = largest_relative_difference(ours, diffusers_eps(model, x, t - 1))
    assert rel < REL_TOL, f"largest relative difference {rel:.2e}"


def test_legacy_attention_names_in_a_bin_file(reduced_256, tmp_path):
    """A .bin state dict with the legacy names query/key/value/proj_attn gives the same params."""
    model, folder, imported = reduced_256
    legacy = tmp_path / "legacy"
    shutil.copytree(folder, legacy)
    os.remove(legacy / "unet" / "diffusion_pytorch_model.safetensors")
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in model.state_dict().items():
        for new, old in names.items():
            if ".attentions." in k:
                k = k.replace(f".{new}.", f".{old}.")
        state[k] = v.clone()
    assert sum(k.endswith(".query.weight") for k in state) == 2 + 3 + 1  # attention layers: 2 down, 3 up, 1 in the middle
    torch.save(state, legacy / "unet" / "diffusion_pytorch_model.bin")
    again = pretrained.load_pretrained(str(legacy), ddpm_256.get_config())
    assert again.info["legacy_names"] and again.info["weights"].endswith(".bin")
    same = jax.tree_util.tree_map(np.array_equal, again.params, imported.params)
    assert all(jax.tree_util.tree_leaves(same))


def test_ddpm_256_config_has_the_papers_114m_parameters():
    from test_ddpm_unet import expected_param_count

    for variant in ddpm_256.VARIANTS:
        config = ddpm_256.get_config(variant)
        config.data.path = "/images"
        validate_config(config)
    model = model_from_config(ddpm_256.get_config().model, (256, 256, 3))
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32),
                              jax.ShapeDtypeStruct((1,), jnp.float32))["params"]
    assert count_params(abstract) == (113_673_219, 113_673_219)
    assert expected_param_count(128, (1, 1, 2, 2, 4, 4), 2, (16,), 256, 3) == 113_673_219
    # the released 256x256 layout maps onto this config's network
    released = dict(REDUCED_256, sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512), norm_num_groups=32)
    layout = pretrained.network_settings(released)
    assert (layout.ch, layout.ch_mult, layout.num_res_blocks, layout.attn_resolutions) == (128, (1, 1, 2, 2, 4, 4), 2, (16,))


# --------------------------------------------------------------------------- the layout differences, one by one


def test_time_input_index_from_zero_feeds_t_minus_one():
    """model.time_input='index_from_zero': the network sees t − 1 at t = 1 and t = T (with and
    without dropout keys, i.e. in sampling and in training)."""
    class Echo:  # an apply_fn that returns the time it is given
        def __call__(self, variables, x, t, **kw):
            return jnp.broadcast_to(jnp.asarray(t, jnp.float32)[:, None], x.shape[:1] + (1,))

    t = jnp.array([1, 1000])
    fn = make_model_fn(Echo(), {}, time_input="index_from_zero", num_steps=1000)
    np.testing.assert_array_equal(np.asarray(fn(jnp.zeros((2, 3)), t))[:, 0], [0.0, 999.0])
    fn = make_model_fn(Echo(), {}, time_input="index", num_steps=1000)
    np.testing.assert_array_equal(np.asarray(fn(jnp.zeros((2, 3)), t))[:, 0], [1.0, 1000.0])


def test_sinusoid_equals_diffusers():
    """diffusers' Timesteps(flip_sin_to_cos=False, freq_shift=1) is DDPMUNet's timestep_embedding.
    The two round t·f_j differently in float32: at most 999·2^-24·2 ≈ 1.2e-4 apart for t ≤ 999
    (measured 3.1e-5 at ch = 128); exact to 1e-6 for small t."""
    from diffusers.models.embeddings import get_timestep_embedding

    for dim in (128, 8):
        ref = get_timestep_embedding(torch.arange(1000), dim, flip_sin_to_cos=False, downscale_freq_shift=1).numpy()
        ours = np.asarray(timestep_embedding(jnp.arange(1000), dim))
        assert np.max(np.abs(ours - ref)) < 999 * 2.0**-24 * 2
        assert np.max(np.abs(ours[:10] - ref[:10])) < 1e-6


def test_downsampling_padding_is_tf_same():
    """diffusers' Downsample2D with padding=0 pads (0, 1) by hand before a stride-2 convolution:
    Flax's 'SAME' on even sizes (what DDPMUNet uses); padding=1 is another function (refused)."""
    import flax.linen as nn
    from diffusers.models.downsampling import Downsample2D

    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    conv = nn.Conv(4, (3, 3), strides=(2, 2), padding="SAME")
    for padding, equal in ((0, True), (1, False)):
        down = Downsample2D(4, use_conv=True, out_channels=4, padding=padding, name="op").eval()
        with torch.no_grad():
            ref = down(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
        w, b = down.conv.weight.detach().numpy(), down.conv.bias.detach().numpy()
        ours = np.asarray(conv.apply({"params": {"kernel": pretrained.to_flax(w, (3, 3, 4, 4)), "bias": b}}, x))
        assert np.allclose(ours, ref, atol=1e-5) == equal


def test_up_blocks_are_numbered_from_the_bottom():
    assert pretrained.torch_name(("up_3_block_0", "conv1", "kernel"), 4) == "up_blocks.0.resnets.0.conv1.weight"
    assert pretrained.torch_name(("up_1_attn_2", "proj_out", "bias"), 4) == "up_blocks.2.attentions.2.to_out.0.bias"
    assert pretrained.torch_name(("up_1_upsample", "kernel"), 4) == "up_blocks.2.upsamplers.0.conv.weight"
    assert pretrained.torch_name(("down_0_downsample", "kernel"), 4) == "down_blocks.0.downsamplers.0.conv.weight"
    assert pretrained.torch_name(("mid_attn_1", "norm", "scale"), 4) == "mid_block.attentions.0.group_norm.weight"


@pytest.mark.parametrize("name, ema", [("ddpm-ema-cifar10-32", True), ("ddpm-cifar10-32", False), ("schema", False),
                                       ("models--google--ddpm-ema-church-256/snapshots/abc123", True)])
def test_ema_folder_names(tmp_path, name, ema):
    assert pretrained.is_ema_folder(str(tmp_path / name)) is ema


# --------------------------------------------------------------------------- the diffusion process


def test_schedule_equals_ddpm_scheduler():
    """β_t and ᾱ_t against DDPMScheduler (linear 1e-4..0.02, T = 1000): diffusers' betas[k] is β_{k+1}.
    β: to 1e-7 (measured 1.9e-9, the float32 rounding of linspace). ᾱ: to 1e-7 against the exact
    product of diffusers' betas (measured 3.5e-8); diffusers' own float32 running product drifts by up
    to 2.5e-7 from it, so against that one 1e-6 (measured 2.4e-7). The quadratic and cosine
    schedules are diffusers' scaled_linear and squaredcos_cap_v2."""
    from ddpm_jax.config import schedule_from_config

    ref = DDPMScheduler(**CIFAR10_SCHEDULER)
    config = pretrained.config_from_diffusers(TINY, CIFAR10_SCHEDULER, cifar10.get_config())
    s = schedule_from_config(config)
    betas, abar = np.asarray(s.betas), np.asarray(s.alpha_bars)
    assert s.num_steps == 1000 and betas[0] == 0 and abar[0] == 1
    assert np.max(np.abs(betas[1:] - ref.betas.numpy())) < 1e-7
    assert np.max(np.abs(abar[1:] - np.cumprod(1.0 - ref.betas.double().numpy()))) < 1e-7
    assert np.max(np.abs(abar[1:] - ref.alphas_cumprod.numpy())) < 1e-6
    for name in ("scaled_linear", "squaredcos_cap_v2"):
        ref = DDPMScheduler(beta_schedule=name)
        s = schedule_from_config(pretrained.config_from_diffusers(TINY, ref.config, cifar10.get_config()))
        assert np.max(np.abs(np.asarray(s.betas)[1:] - ref.betas.numpy())) < 1e-7


@pytest.mark.parametrize("variance_type", ["fixed_large", "fixed_small"])
@pytest.mark.parametrize("clip_sample", [True, False])
def test_ancestral_step_equals_ddpm_scheduler_step(monkeypatch, variance_type, clip_sample):
    """One step x_t → x_{t−1} of sampling.sample('eps_ddpm'), with the options the import maps the
    scheduler to, against DDPMScheduler.step at t − 1 with the same ε̂ and the same noise, at
    t ∈ {1000, 999, 500, 10, 3, 2, 1} (t = 1: no noise on either side). Differences are relative to
    max(1, max |x_{t−1}|) (unclipped, a fixed ε̂ drives x to ~1e3).

    DDPMScheduler.step in float64 on its own betas: to 1e-6 (measured ≤ 1.4e-7, this codebase's
    float32). In float32 it forms 1 − ᾱ_t by subtraction from its float32 running product
    (≤ 2.5e-7 + u off), so its coefficients lose up to that over 1 − ᾱ_t relative, 8e-5 at t = 3
    (measured); tolerance 4(2.5e-7 + u)/(1 − ᾱ_t). This codebase builds its schedule in float64."""
    import diffusers.schedulers.scheduling_ddpm as scheduling_ddpm
    from ddpm_jax.config import schedule_from_config

    scheduler = dict(CIFAR10_SCHEDULER, variance_type=variance_type, clip_sample=clip_sample)
    process = pretrained.process_settings(scheduler)
    assert process["ddpm_variance"] == {"fixed_large": "beta", "fixed_small": "posterior"}[variance_type]
    schedule = schedule_from_config(pretrained.config_from_diffusers(TINY, scheduler, cifar10.get_config()))
    shape = (2, 4, 4, 3)
    eps = jax.random.normal(jax.random.PRNGKey(7), shape)
    key = jax.random.PRNGKey(3)
    _, traj = sampling.sample(lambda x, t: eps, schedule, shape, key, method="eps_ddpm",
                              ddpm_variance=process["ddpm_variance"],
                              clip_x0=(-1.0, 1.0) if process["clip_x0"] else None, return_trajectory=True)
    xs, ts = np.asarray(traj["x"]), np.asarray(traj["t"])
    one_minus_abar = np.asarray(schedule.one_minus_alpha_bars)
    k_steps = jax.random.split(key)[1]  # sampling.sample: the step at t draws normal(fold_in(split(key)[1], t))
    for dtype in (torch.float64, torch.float32):
        ref = DDPMScheduler(**scheduler)
        if dtype == torch.float64:
            ref.betas = ref.betas.double()
            ref.alphas = 1.0 - ref.betas
            ref.alphas_cumprod = torch.cumprod(ref.alphas, 0)
            ref.one = torch.tensor(1.0, dtype=dtype)

        def to_torch(a):
            return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2))).to(dtype)

        for t in (1000, 999, 500, 10, 3, 2, 1):
            i = int(np.flatnonzero(ts == t)[0])
            z = jax.random.normal(jax.random.fold_in(k_steps, t), shape)
            monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: to_torch(z))
            want = ref.step(to_torch(eps), t - 1, to_torch(xs[i])).prev_sample.numpy().transpose(0, 2, 3, 1)
            rel = np.max(np.abs(xs[i + 1] - want)) / max(1.0, np.max(np.abs(want)))
            tol = 1e-6 if dtype == torch.float64 else 4 * (2.5e-7 + 2.0**-24) / one_minus_abar[t]
            assert rel < tol, f"{dtype}, t = {t}: relative difference {rel:.2e}"


# --------------------------------------------------------------------------- the command lines on a tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers model, its folder)."""
    model = seeded_unet(TINY, seed=2)
    return model, write_folder(tmp_path_factory.mktemp("tiny"), model, TINY_SCHEDULER)


def test_import_sample_and_fine_tune_from_the_command_line(tiny, tmp_path):
    """Import with a recipe and overrides, sample the run, then fine-tune it for two steps with the
    command the import prints: the training resumes from the imported weights (step 0)."""
    from PIL import Image

    _, folder = tiny
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    workdir = tmp_path / "run"
    recipe = ["--config", "configs/ddpm_256.py:cat", f"--config.data.path={images}", "--config.data.train_size=14",
              "--config.data.val_size=4", "--config.train.batch_size=4", "--config.train.num_steps=2",
              "--config.optim.warmup_steps=0", "--config.train.log_every_steps=1", "--config.train.num_grid_samples=2",
              "--config.checkpoint.every_steps=1"]
    proc = run_module("experiments.import_checkpoint", "--source", folder, "--workdir", workdir, *recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    command = proc.stdout.strip().splitlines()[-1]
    assert command.startswith("fine-tune with: python -m experiments.train --config configs/ddpm_256.py:cat")
    assert {"--config.model.ch_mult=(1,2)", "--config.model.time_input=index_from_zero"} <= set(shlex.split(command))

    proc = run_module("experiments.sample", "--workdir", workdir, "--method", "ddim", "--num_steps", 3, "--num", 2,
                      "--batch_size", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = np.load(workdir / "samples" / "ddim_steps3_eta0_clip" / "samples.npz")["samples"]
    assert samples.shape == (2, 8, 8, 3) and np.all(np.isfinite(samples))

    imported = load_run(workdir)
    proc = run_module("experiments.train", *shlex.split(command.split("python -m experiments.train ", 1)[1]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at step 0" in proc.stdout
    tuned = load_run(workdir)
    assert tuned.step == 2
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(tuned.params),
                                                                 jax.tree_util.tree_leaves(imported.params)))
    assert 0 < moved < 1e-3  # two Adam steps of 2e-5 from the imported weights, not from a fresh init


# --------------------------------------------------------------------------- bad input: one line, nothing written


def copy_folder(folder, dest):
    shutil.copytree(folder, dest)
    return str(dest)


def rewrite_weights(folder, edit):
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    state = load_file(path)
    edit(state)
    save_file(state, path)


def error_of(folder, base=None):
    with pytest.raises(pretrained.PretrainedError) as e:
        pretrained.load_pretrained(folder, base or ddpm_256.get_config())
    message = str(e.value)
    assert "\n" not in message
    return message


def test_not_a_unet_folder(tmp_path):
    assert "no config.json" in error_of(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    assert "describes 'AutoencoderKL', not a UNet2DModel" in error_of(str(tmp_path))
    assert "is not a directory" in error_of(str(tmp_path / "config.json"))


@pytest.mark.parametrize("key, value", [
    ("resnet_time_scale_shift", "scale_shift"),
    ("attention_head_dim", 8),  # several heads
    ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"]),  # attention at another level on the way up
    ("time_embedding_type", "fourier"),
    ("center_input_sample", True),
    ("block_out_channels", [8, 12]),  # 12 is no multiple of ch = 8
    ("downsample_padding", 1),
    ("flip_sin_to_cos", True),
    ("freq_shift", 0),
    ("norm_eps", 1e-5),
    ("num_class_embeds", 10),
    ("out_channels", 6),
    ("sample_size", None),
    ("some_future_setting", 1),
])
def test_inexpressible_network_is_refused_naming_the_key(key, value):
    with pytest.raises(pretrained.PretrainedError) as e:
        pretrained.network_settings(dict(TINY, **{key: value}))
    assert key in str(e.value)


@pytest.mark.parametrize("key, value", [("variance_type", "learned_range"), ("thresholding", True),
                                        ("trained_betas", [0.1, 0.2]), ("beta_schedule", "sigmoid"),
                                        ("clip_sample_range", 2.0), ("prediction_type", "flow")])
def test_inexpressible_scheduler_is_refused_naming_the_key(key, value):
    with pytest.raises(pretrained.PretrainedError) as e:
        pretrained.process_settings(dict(TINY_SCHEDULER, **{key: value}))
    assert key in str(e.value)


def test_missing_unused_and_misshapen_tensors(tiny, tmp_path):
    _, folder = tiny
    missing = copy_folder(folder, tmp_path / "missing")
    rewrite_weights(missing, lambda s: s.pop("mid_block.attentions.0.to_k.bias"))
    assert "tensor mid_block.attentions.0.to_k.bias is missing" in error_of(missing)

    unused = copy_folder(folder, tmp_path / "unused")
    rewrite_weights(unused, lambda s: s.update({"extra.weight": np.zeros(3, np.float32)}))
    assert "tensor extra.weight is not used by the network" in error_of(unused)

    shape = copy_folder(folder, tmp_path / "shape")
    rewrite_weights(shape, lambda s: s.update({"down_blocks.1.resnets.0.conv1.weight": np.zeros((16, 8, 1, 1), np.float32)}))
    assert ("tensor down_blocks.1.resnets.0.conv1.weight has shape (16, 8, 1, 1); the network's "
            "down_1_block_0/conv1/kernel needs (16, 8, 3, 3)") in error_of(shape)

    both = copy_folder(folder, tmp_path / "both")
    rewrite_weights(both, lambda s: s.update({"mid_block.attentions.0.query.bias": s["mid_block.attentions.0.to_q.bias"]}))
    assert "legacy and its current name" in error_of(both)


def test_truncated_and_missing_weights(tiny, tmp_path):
    _, folder = tiny
    truncated = copy_folder(folder, tmp_path / "truncated")
    path = os.path.join(truncated, "diffusion_pytorch_model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    assert "truncated or damaged" in error_of(truncated)
    os.remove(path)
    assert "holds no weights" in error_of(truncated)
    # .safetensors is preferred: a damaged .bin beside it is never read
    both = copy_folder(folder, tmp_path / "both")
    with open(os.path.join(both, "diffusion_pytorch_model.bin"), "wb") as f:
        f.write(b"not a zip")
    assert pretrained.load_pretrained(both, ddpm_256.get_config()).info["weights"].endswith(".safetensors")


def test_bin_is_read_without_torch_and_a_code_running_pickle_is_refused(tiny, tmp_path):
    """A ``.bin`` needs no PyTorch (the restricted reader); one whose pickle names a callable outside
    the tensor-rebuild set is refused in one line and nothing of it runs."""
    model, _ = tiny
    path = tmp_path / "diffusion_pytorch_model.bin"
    torch.save(model.state_dict(), path)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.bin"
    torch.save({"conv_in.weight": Evil()}, evil)
    code = BLOCK_TORCH + f"""
import numpy as np
from ddpm_jax import pretrained
state = pretrained.read_tensors({str(path)!r})
print(len(state), float(np.abs(state["conv_in.weight"]).sum()))
try:
    pretrained.read_tensors({str(evil)!r})
except pretrained.PretrainedError as e:
    print(e)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=cpu_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    read, refusal = proc.stdout.strip().splitlines()
    count, total = read.split()
    expected = model.state_dict()
    assert int(count) == len(expected)
    assert abs(float(total) - float(expected["conv_in.weight"].abs().sum())) <= 1e-6 * float(total)
    assert "refusing to load" in refusal and "system" in refusal and not marker.exists()


def test_command_line_refuses_bad_input_before_writing(tiny, tmp_path):
    """One ``error:`` line, exit 2, nothing written: a non-empty --workdir (checked first) and a
    folder whose weights do not fit."""
    _, folder = tiny
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    proc = run_module("experiments.import_checkpoint", "--source", folder, "--workdir", busy)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: --workdir {busy} is not empty: an imported model goes into a new run directory"
    assert os.listdir(busy) == ["notes.txt"]

    bad = copy_folder(folder, tmp_path / "bad")
    rewrite_weights(bad, lambda s: s.pop("conv_out.bias"))
    workdir = tmp_path / "new"
    proc = run_module("experiments.import_checkpoint", "--source", bad, "--workdir", workdir)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "conv_out.bias is missing" in lines[0]
    assert not workdir.exists()


def test_base_config_is_not_modified():
    base = cifar10.get_config()
    before = copy.deepcopy(base.to_dict())
    pretrained.config_from_diffusers(TINY, TINY_SCHEDULER, base)
    assert base.to_dict() == before
