"""Speed and memory of the training step and the sampler.

    python -m benchmarks.run                       # small and medium, a table
    python -m benchmarks.run --preset small --json # one JSON object per line

Measured after warm-up, as medians over repeated timed blocks (the machine may be noisy):

- ``train_images_per_sec``: the full jitted training step (ε objective, Adam, EMA), batch 100,
  28×28×1, data already on the device — what ``experiments.train`` runs each step, dispatched as
  it does: each step queued before waiting for the one before it;
- ``train_compile_s`` / ``sample_compile_s``: lowering + XLA compilation of the step and of the
  whole ``lax.scan`` sampler;
- ``train_gflops_per_image`` and ``train_gflop_per_sec``: XLA's cost analysis of the compiled
  step (FLOPs per image) and what the measured throughput achieves with it;
- ``sample_images_per_sec``: ``'eps_ddpm'`` with T = 200, batch 256;
- ``train_page_faults_per_step``: the minor page faults of the process during a timed step (what
  ``ddpm_jax.malloc_tuning`` is for; the entry points and this script run with its glibc
  settings unless ``GLIBC_TUNABLES`` is already set, e.g. ``GLIBC_TUNABLES= python -m
  benchmarks.run`` for glibc's defaults);
- ``peak_rss_mib``: the process's peak resident memory so far (cumulative across the rows).

On a CPU the batch is split over one JAX device per core, as ``experiments.train`` does
(``--cpu_devices``, ``ddpm_jax.cpu_devices``); ``--cpu_devices 1`` measures a single device. The
``device`` field of every row says how many were used.

Training is measured with every formulation of the strided and transposed convolutions
(``model.conv_impl``: 'xla', 'stride1', 'phases'; ``--conv_impl`` picks), compiled first and then
timed in interleaved blocks; sampling with the last one given. The peak RSS of a row is the
process's so far, so it includes every formulation set up before it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddpm_jax import cpu_devices, data, objectives, platform_profile, sampling, schedules
from ddpm_jax.models import make_model, make_model_fn
from ddpm_jax.models.scorenet import CONV_IMPLS
from ddpm_jax.train_state import create_train_state, make_optimizer
from ddpm_jax.train_step import Parallel, StepConfig

IMAGE_SHAPE = (28, 28, 1)
TRAIN_BATCH = 100
SAMPLE_BATCH = 256


def _optim_config(lr: float = 0.01) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(learning_rate=lr, rho_learning_rate=0.2, b1=0.9, b2=0.999, eps=1e-8,
                                          decay_factor=0.1, decay_every_epochs=20, warmup_steps=0, grad_clip_norm=1.0))


def _median_rates(fns, items_per_call: int, *, blocks: int, calls_per_block: int, finish=None):
    """{name: median over ``blocks`` of items/s} for each of ``fns`` ({name: fn}), each block
    ``calls_per_block`` calls of ``fn``, then ``finish[name]()`` if given (which must block until
    every call's result is ready; without it, ``fn`` itself must). The blocks of the different
    functions are interleaved, so a machine whose speed drifts (a shared VM) slows them all alike
    and the ratios stay meaningful."""
    rates = {name: [] for name in fns}
    for _ in range(blocks):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls_per_block):
                fn()
            if finish:
                finish[name]()
            rates[name].append(items_per_call * calls_per_block / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}


def setup_train(preset: str, conv_impl: str = "phases", batch: int = TRAIN_BATCH, flat_allreduce=None):
    """(Parallel runner, placed state, schedule, placed batch) of the benchmarked training step:
    the preset's U-Net, ε objective (simple, summed), Adam with clipping, EMA, T = 200.
    ``flat_allreduce``: how the gradients are reduced (``train_step.Parallel``; None: the profile's)."""
    model = make_model(preset, image_shape=IMAGE_SHAPE, conv_impl=conv_impl, fused_norm=platform_profile.current().fused_group_norm)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1,) + IMAGE_SHAPE), jnp.ones((1,)))["params"]
    tx = make_optimizer(_optim_config(), steps_per_epoch=500, params=params)
    loss_fn = objectives.get_objective("eps", weighting="simple", reduction="sum")
    par = Parallel(StepConfig(model.apply, loss_fn, tx, 0.999, "index"), mode="jit", flat_allreduce=flat_allreduce)
    schedule = schedules.make_schedule("linear", 200, beta_start=1e-4, beta_end=0.1)
    state = par.put_state(create_train_state(params, tx, jax.random.PRNGKey(1)))
    x = par.put_batch(np.random.default_rng(0).random((batch,) + IMAGE_SHAPE, dtype=np.float32))
    return par, state, schedule, x


def _stepper(compiled, state, schedule, x):
    """A call that dispatches one compiled step on its own (donated, carried-over) state and then
    waits for the step dispatched before it, as the training loop does on several CPU devices (a
    ``cpu_devices.DispatchWindow``: the host queues step i + 1 while the devices run step i); a
    call that waits for the last step; and the running count [steps, minor page faults during
    them] the first adds to."""
    box = {"state": state}
    window = cpu_devices.DispatchWindow()
    counts = [0, 0]

    def step():
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        box["state"], m = compiled(box["state"], schedule, x)
        window.add(m["loss"])
        counts[0] += 1
        counts[1] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    return step, window.wait, counts


#: ``--allreduce``: the gradient reduction of the jit step (``train_step.Parallel``'s flat_allreduce).
ALLREDUCE = {"profile": None, "flat": True, "xla": False}


def bench_train(preset: str, conv_impls=("phases",), *, batch: int = TRAIN_BATCH, blocks: int = 5, steps: int = 20,
                allreduce=("profile",)):
    """{(conv_impl, allreduce): [(name, value, unit), ...]} of the training step, each variant
    compiled and warmed up first, then timed in interleaved blocks."""
    steppers, finishers, results = {}, {}, {}
    for impl, reduction in ((i, r) for i in conv_impls for r in allreduce):
        par, state, schedule, x = setup_train(preset, impl, batch, ALLREDUCE[reduction])
        impl = (impl, reduction)
        t0 = time.perf_counter()
        compiled = par.compile_train(state, schedule, x)
        compile_s = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        # The compiled SPMD program is one device's share of the step: its FLOPs × the device count.
        flops = par.num_devices * float(cost.get("flops", float("nan"))) if cost else float("nan")

        step, finish, counts = _stepper(compiled, state, schedule, x)
        for _ in range(5):  # warm-up
            step()
        finish()
        counts[:] = [0, 0]
        steppers[impl], finishers[impl] = step, finish
        results[impl] = (compile_s, flops, counts)
    rates = _median_rates(steppers, batch, blocks=blocks, calls_per_block=steps, finish=finishers)
    return {impl: [
        ("train_images_per_sec", rates[impl], "images/s"),
        ("train_compile_s", compile_s, "s"),
        ("train_gflops_per_image", flops / batch / 1e9, "GFLOP"),
        ("train_gflop_per_sec", flops / batch * rates[impl] / 1e9, "GFLOP/s"),
        ("train_page_faults_per_step", counts[1] / max(counts[0], 1), "faults"),
    ] for impl, (compile_s, flops, counts) in results.items()}


def bench_sample(preset: str, *, conv_impl: str = "phases", batch: int = SAMPLE_BATCH, blocks: int = 3):
    model = make_model(preset, image_shape=IMAGE_SHAPE, conv_impl=conv_impl, fused_norm=platform_profile.current().fused_group_norm)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1,) + IMAGE_SHAPE), jnp.ones((1,)))["params"]
    schedule = schedules.make_schedule("linear", 200, beta_start=1e-4, beta_end=0.1)

    def draw(p, key):
        fn = make_model_fn(model.apply, p, num_steps=200)
        return sampling.sample(fn, schedule, (batch,) + IMAGE_SHAPE, key, method="eps_ddpm", ddpm_variance="beta")

    key = jax.random.PRNGKey(0)
    t0 = time.perf_counter()
    compiled = jax.jit(draw, out_shardings=data.batch_sharding(batch)).lower(params, key).compile()
    compile_s = time.perf_counter() - t0
    compiled(params, key).block_until_ready()  # warm-up
    ips = _median_rates({conv_impl: lambda: compiled(params, key).block_until_ready()}, batch, blocks=blocks,
                        calls_per_block=1)[conv_impl]
    return [("sample_images_per_sec", ips, "images/s"), ("sample_compile_s", compile_s, "s")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=("small", "medium"), action="append",
                    help="U-Net preset(s) to measure (default: small and medium)")
    ap.add_argument("--conv_impl", choices=CONV_IMPLS, action="append",
                    help="model.conv_impl: how the strided/transposed convolutions are computed "
                         "(default: all, timed in interleaved blocks; sampling with the last)")
    ap.add_argument("--allreduce", choices=sorted(ALLREDUCE), action="append",
                    help="the jit step's gradient reduction: 'flat' (shard_map, one flat all-reduce), 'xla' (jit with "
                         "a NamedSharding batch), 'profile' (the platform profile's; default). Several: interleaved")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--skip_sampling", action="store_true", help="training only")
    ap.add_argument("--skip_training", action="store_true", help="sampling only (with the last --conv_impl)")
    ap.add_argument("--blocks", type=int, default=5, help="timed blocks per measurement (median reported)")
    ap.add_argument("--platform", choices=platform_profile.PROFILES, default="auto",
                    help="platform profile, as the entry points' --platform (ddpm_jax.platform_profile)")
    ap.add_argument("--cpu_devices", type=int, default=0,
                    help="CPU only: devices to split each batch over, as experiments.train (default 0: one per core)")
    args = ap.parse_args(argv)
    if args.skip_sampling and args.skip_training:
        ap.error("--skip_sampling and --skip_training leave nothing to measure")
    try:  # measure what the entry points run
        platform_profile.setup(args.platform, cpu_devices=args.cpu_devices, batch_sizes=[TRAIN_BATCH, SAMPLE_BATCH])
    except ValueError as e:
        ap.error(str(e))
    presets = args.preset or ["small", "medium"]
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    rows = []
    for preset in presets:
        impls = args.conv_impl or list(CONV_IMPLS)
        # fewer steps per block for medium (13x the FLOPs) keeps each block ~ a few seconds
        reductions = args.allreduce or ["profile"]
        train = {} if args.skip_training else bench_train(preset, impls, blocks=args.blocks,
                                                           steps=20 if preset == "small" else 4, allreduce=reductions)
        for impl, reduction in ((i, r) for i in impls for r in reductions):
            results = list(train.get((impl, reduction), []))
            if not args.skip_sampling and impl == impls[-1] and reduction == reductions[-1]:  # sampling once
                results += bench_sample(preset, conv_impl=impl, blocks=max(1, args.blocks // 2))
            if not results:
                continue
            results.append(("peak_rss_mib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "MiB"))
            for name, value, unit in results:
                rows.append({"name": name, "preset": preset, "conv_impl": impl, "allreduce": reduction,
                             "value": round(float(value), 4),
                             "unit": unit, "device": device, "jax": jax.__version__})
                if args.json:
                    print(json.dumps(rows[-1]), flush=True)
    from ddpm_jax import provenance

    if args.json:  # the last line: what ran, where
        print(json.dumps({"provenance": provenance.record()}), flush=True)
    else:
        print(f"{'preset':8s} {'conv_impl':9s} {'allreduce':9s} {'measure':26s} {'value':>12s}  unit   "
              f"({device}, jax {jax.__version__})")
        for r in rows:
            print(f"{r['preset']:8s} {r['conv_impl']:9s} {r['allreduce']:9s} {r['name']:26s} {r['value']:12.4g}  {r['unit']}")
        print(provenance.summary_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
