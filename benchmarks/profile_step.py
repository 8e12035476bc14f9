"""Where the training step's time goes, by XLA operation: a profile of the compiled step.

    python -m benchmarks.profile_step --preset small --conv_impl phases [--top 15]

Runs the step ``benchmarks.run`` times (ε objective, Adam, EMA, clipping; batch 100, 28×28) under
``jax.profiler`` and reads the per-operation events of its trace: milliseconds per step for each
executed HLO operation, summed into groups —

- ``conv: kernel gradient``: convolutions and matrix products whose output is not a batch of
  activations (its leading dimension is not a multiple of the batch, as ``B`` or ``B·H·W`` would
  be): the weight gradients of the backward pass;
- ``conv: activations``: the other convolutions and matrix products (forward, and input
  gradients; the dense layers of the time embedding are here too, a small share);
- ``other``: everything else (GroupNorm, swish, the loss, Adam/EMA, layout copies).

A convolution may be fused with neighbours (e.g. XNNPACK fusions on CPU); the fusion is counted
whole in its convolution's group. Any ``conv_impl`` classifies the same way: its reformulated
kernels need not be known. Always one device (``cpu_devices.configure(1)``): per-device
time, the thing that splitting the batch over devices divides.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile

from benchmarks.run import TRAIN_BATCH
from ddpm_jax.models.scorenet import CONV_IMPLS

SKIP = ("ThunkExecutor", "$", "PjitFunction", "ParseArguments", "CommonPjRt", "SlinkyThreadPool")


def _conv_names(hlo_text: str):
    """{HLO instruction name: output dims} for every convolution / matrix product (``dot``) and
    every fusion whose body has one."""
    convs_in = set()
    current = None
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$", line)
        if m:
            current = m.group(1)
            continue
        if current and (" convolution(" in line or " dot(" in line):
            convs_in.add(current)
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+) = f32\[([\d,]*)\]\{[^}]*\} (\w+)\(", line)
        if not m:
            continue
        name, dims, op = m.group(1), [int(d) for d in m.group(2).split(",") if d], m.group(3)
        called = re.search(r"calls=%([\w.\-]+)", line)
        if op in ("convolution", "dot") or (op == "fusion" and called and called.group(1) in convs_in):
            out[name] = dims
    return out


def profile(preset: str, conv_impl: str, steps: int = 10):
    """(ms per step by operation, convolution output dims by name) of the step."""
    import jax

    from benchmarks import run as bench

    par, state, schedule, x = bench.setup_train(preset, conv_impl)
    compiled = par.compile_train(state, schedule, x)
    for _ in range(5):
        state, m = compiled(state, schedule, x)
    m["loss"].block_until_ready()
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                state, m = compiled(state, schedule, x)
            m["loss"].block_until_ready()
        with gzip.open(glob.glob(d + "/**/*.trace.json.gz", recursive=True)[0]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ms = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(SKIP):
            ms[e["name"]] += e.get("dur", 0) / 1000 / steps
    return ms, _conv_names(compiled.as_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=("small", "medium"), default="small")
    ap.add_argument("--conv_impl", choices=CONV_IMPLS, default="phases")
    ap.add_argument("--top", type=int, default=12, help="also list the N slowest operations")
    ap.add_argument("--json", action="store_true", help="one JSON object per group")
    args = ap.parse_args(argv)
    from ddpm_jax import platform_profile

    platform_profile.setup("cpu", cpu_devices=1)  # this script profiles XLA:CPU
    ms, convs = profile(args.preset, args.conv_impl)

    def group(name):
        if name not in convs:
            return "other"
        batch_like = bool(convs[name]) and convs[name][0] % TRAIN_BATCH == 0  # (B, ...) or (B·H·W, ...)
        return "conv: activations" if batch_like else "conv: kernel gradient"

    groups = collections.Counter()
    for name, t in ms.items():
        groups[group(name)] += t
    total = sum(groups.values())
    rows = [{"name": g, "preset": args.preset, "conv_impl": args.conv_impl, "value": round(t, 3), "unit": "ms/step",
             "share": round(t / total, 3)} for g, t in groups.most_common()]
    rows.append({"name": "total (sum of operations)", "preset": args.preset, "conv_impl": args.conv_impl,
                 "value": round(total, 3), "unit": "ms/step", "share": 1.0})
    from ddpm_jax import provenance

    if args.json:
        for r in rows:
            print(json.dumps(r))
        print(json.dumps({"provenance": provenance.record()}))
        return 0
    print(f"{args.preset}, conv_impl={args.conv_impl}, batch 100, one CPU device: ms per training step")
    for r in rows:
        print(f"  {r['name']:28s} {r['value']:8.2f}  {100 * r['share']:5.1f} %")
    print(f"slowest {args.top} operations:")
    for name, t in ms.most_common(args.top):
        print(f"  {t:7.2f} ms  {group(name):22s} {name}  f32{convs.get(name, '')}")
    print(provenance.summary_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
