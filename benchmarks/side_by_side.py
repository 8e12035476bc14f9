"""Ours against the reference (the source notebook's PyTorch code, docs/source_material.md), alternating
in short rounds so that a machine whose speed drifts slows both alike.

    python -m benchmarks.side_by_side --torch_python /tmp/venv-torch/bin/python          # ~15 min
    python -m benchmarks.side_by_side --torch_python ... --quantity train_small --rounds 3 --json

``benchmarks.run`` alone and the reference's own ``speed`` suite run minutes apart, and on a shared
VM whose speed drifts by 20–40 % over minutes the ratio of the two then says as much about the
drift as about the code. Here each round measures every quantity on both sides, each in a fresh
process (ours: ``benchmarks.run`` with the default ``conv_impl`` and one device per core; the
reference: ``bench_torch_seed.py``, eager and, where ``--torch_compile`` asks, ``torch.compile``),
both with the same glibc malloc settings (``ddpm_jax.malloc_tuning.TUNABLES``: the tuned malloc the
reference's README recommends, plus transparent huge pages), in ABBA order: ours first in even rounds, the
reference first in odd ones, so a steady drift biases half the rounds each way. Each round gives a
ratio, ours over the reference's best setting of that round; reported per quantity are the median
of those ratios with their range, and the medians of each side.

Quantities (images/s): ``train_small`` and ``train_medium`` (the full training step, ε objective,
batch 100) and ``sample_small`` (ancestral ε sampling, T = 200, batch 256; the issue's target is
against the reference's eager sampler, so ``sample_small`` also reports that ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Sequence

from ddpm_jax import malloc_tuning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: quantity -> (arguments of ``benchmarks.run``, its row name, the reference's subcommand).
QUANTITIES: Dict[str, tuple] = {
    "train_small": (["--preset", "small", "--skip_sampling"], "train_images_per_sec",
                    ["train-speed", "--arch", "small", "--objective", "eps"]),
    "train_medium": (["--preset", "medium", "--skip_sampling"], "train_images_per_sec",
                     ["train-speed", "--arch", "medium", "--objective", "eps"]),
    "sample_small": (["--preset", "small", "--skip_training"], "sample_images_per_sec",
                     ["sample-speed", "--arch", "small", "--batch", "256"]),
}
EAGER, COMPILED = "eager", "torch.compile"
#: the quantities ``--torch_compile`` also times compiled (the reference's speed suite does the same)
COMPILE_QUANTITIES = ("train_small", "sample_small")


def _json_lines(text: str) -> List[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def _run(cmd: Sequence[str], *, cwd: str, env: dict, timeout: float) -> List[dict]:
    res = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {res.returncode}:\n{res.stderr[-3000:]}")
    return _json_lines(res.stdout)


def ours_runner(blocks: int, timeout: float = 900) -> Callable[[str], float]:
    """quantity -> ours in images/s, from a fresh ``python -m benchmarks.run`` process."""

    def run(quantity: str) -> float:
        args, name, _ = QUANTITIES[quantity]
        # sampling is timed over blocks // 2 draws (each draw is a whole 200-step run)
        n = 2 * blocks if name.startswith("sample") else blocks
        cmd = [sys.executable, "-m", "benchmarks.run", "--json", "--conv_impl", "phases", "--blocks", str(n), *args]
        env = dict(os.environ, GLIBC_TUNABLES=malloc_tuning.TUNABLES)
        rows = [r for r in _run(cmd, cwd=REPO, env=env, timeout=timeout) if r.get("name") == name]
        if len(rows) != 1:
            raise RuntimeError(f"benchmarks.run printed {len(rows)} '{name}' rows for {quantity}")
        return float(rows[0]["value"])

    return run


def reference_runner(bench_dir: str, torch_python: str, mnist_dir: str, repeats: int,
                     timeout: float = 1800) -> Callable[[str, str], float]:
    """(quantity, setting) -> the reference in images/s, from a fresh ``bench_torch_seed.py``."""
    env = dict(os.environ, GLIBC_TUNABLES=malloc_tuning.TUNABLES)
    script = os.path.join(bench_dir, "bench_torch_seed.py")

    def run(quantity: str, setting: str) -> float:
        sub = list(QUANTITIES[quantity][2])
        if setting == COMPILED:
            sub += ["--compile", "model"]
        cmd = [torch_python, script, "--mnist-dir", mnist_dir, *sub, "--repeats", str(repeats)]
        rows = [r for r in _run(cmd, cwd=bench_dir, env=env, timeout=timeout) if "images_per_s" in r]
        if len(rows) != 1:
            raise RuntimeError(f"bench_torch_seed.py printed {len(rows)} results for {quantity} ({setting})")
        return float(rows[0]["images_per_s"])

    return run


def measure(settings: Dict[str, Sequence[str]], rounds: int,
            run_ours: Callable[[str], float], run_reference: Callable[[str, str], float],
            report: Callable[[dict], None] = lambda record: None) -> List[dict]:
    """One record per measurement: {round, quantity, side ('ours' or a reference setting), value}.

    ``settings``: quantity -> the reference's settings to time. Round r runs, for each quantity,
    ours then the reference's settings (r even) or the reference's settings then ours (r odd)."""
    records = []
    for r in range(rounds):
        for q, refs in settings.items():
            order = ["ours", *refs] if r % 2 == 0 else [*refs, "ours"]
            for side in order:
                t0 = time.perf_counter()
                value = run_ours(q) if side == "ours" else run_reference(q, side)
                records.append({"round": r, "quantity": q, "side": side, "value": value, "unit": "images/s",
                                "wall_s": round(time.perf_counter() - t0, 1)})
                report(records[-1])
    return records


def summarise(records: Sequence[dict]) -> List[dict]:
    """Per quantity: medians of each side, and the median, min and max over rounds of
    ours / the reference's best setting of that round (and / eager, when eager was measured)."""
    out = []
    for q in dict.fromkeys(r["quantity"] for r in records):
        by_round: Dict[int, Dict[str, float]] = {}
        for r in records:
            if r["quantity"] == q:
                by_round.setdefault(r["round"], {})[r["side"]] = r["value"]
        sides = list(dict.fromkeys(s for vals in by_round.values() for s in vals))
        row = {"quantity": q, "rounds": len(by_round)}
        for s in sides:
            row[f"median {s}"] = statistics.median(v[s] for v in by_round.values())
        refs = [s for s in sides if s != "ours"]
        ratios = {"best": [v["ours"] / max(v[s] for s in refs) for v in by_round.values()]}
        if EAGER in refs and len(refs) > 1:
            ratios[EAGER] = [v["ours"] / v[EAGER] for v in by_round.values()]
        for name, rs in ratios.items():
            row[f"ratio vs {name}"] = statistics.median(rs)
            row[f"ratio vs {name} range"] = (min(rs), max(rs))
        out.append(row)
    return out


def _table(rows: Sequence[dict]) -> str:
    lines = []
    for row in rows:
        parts = [f"{k} {v:,.1f}" for k, v in row.items() if k.startswith("median")]
        for k, v in row.items():
            if k.startswith("ratio") and not k.endswith("range"):
                lo, hi = row[k + " range"]
                parts.append(f"{k} {v:.2f} ({lo:.2f}–{hi:.2f})")
        lines.append(f"{row['quantity']:13s} {row['rounds']} rounds: " + "; ".join(parts))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch_python", required=True, help="a Python with PyTorch")
    ap.add_argument("--bench_dir", default=os.path.join(REPO, "..", "shared", "bench"),
                    help="the reference implementation's folder (default: ../shared/bench beside the checkout)")
    ap.add_argument("--mnist_dir", default=None, help="MNIST IDX files for the reference (default <bench_dir>/../data/mnist)")
    ap.add_argument("--quantity", choices=list(QUANTITIES), action="append", help="default: all")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=3, help="timed blocks per measurement, ours (median)")
    ap.add_argument("--repeats", type=int, default=3, help="timed blocks per measurement, the reference (median)")
    ap.add_argument("--torch_compile", action="store_true",
                    help=f"also time the reference under torch.compile ({', '.join(COMPILE_QUANTITIES)})")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    args = ap.parse_args(argv)
    bench_dir = os.path.abspath(args.bench_dir)
    mnist_dir = os.path.abspath(args.mnist_dir or os.path.join(bench_dir, "..", "data", "mnist"))
    if not os.path.isfile(os.path.join(bench_dir, "bench_torch_seed.py")):
        ap.error(f"no bench_torch_seed.py in --bench_dir {bench_dir}")
    if not os.path.isdir(mnist_dir):
        ap.error(f"--mnist_dir {mnist_dir} does not exist")
    if subprocess.run([args.torch_python, "-c", "import torch"], capture_output=True).returncode != 0:
        ap.error(f"--torch_python {args.torch_python} cannot import torch")
    if min(args.rounds, args.blocks, args.repeats) < 1:
        ap.error("--rounds, --blocks and --repeats must be at least 1")
    quantities = args.quantity or list(QUANTITIES)

    def report(record):
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            print(f"round {record['round']} {record['quantity']:13s} {record['side']:14s} "
                  f"{record['value']:9,.1f} images/s ({record['wall_s']:.0f} s)", flush=True)

    settings = {q: [EAGER, COMPILED] if args.torch_compile and q in COMPILE_QUANTITIES else [EAGER]
                for q in quantities}
    run_reference = reference_runner(bench_dir, args.torch_python, mnist_dir, args.repeats)
    records = measure(settings, args.rounds, ours_runner(args.blocks), run_reference, report)
    rows = summarise(records)
    from ddpm_jax import provenance

    if args.json:
        for row in rows:
            print(json.dumps({"summary": row}), flush=True)
        print(json.dumps({"provenance": provenance.record()}), flush=True)
    else:
        print(_table(rows))
        print(provenance.summary_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
