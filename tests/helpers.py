"""Shared test helpers: tiny datasets, IDX writers and a tiny training config."""

import gzip
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    """Encodes an array as IDX (big-endian header and payload)."""
    codes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    dtype = codes[type_code]
    header = bytes([0, 0, type_code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return header + np.ascontiguousarray(arr, dtype=dtype).tobytes()


def write_idx(path, arr, gz=None, type_code=0x08):
    payload = idx_bytes(arr, type_code)
    gz = str(path).endswith(".gz") if gz is None else gz
    with open(path, "wb") as f:
        f.write(gzip.compress(payload) if gz else payload)
    return str(path)


def make_raw(n_train=30, n_test=10, h=5, w=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "train_images": rng.integers(0, 256, (n_train, h, w), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, (n_train,), dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, h, w), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }


STD_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
DOTTED_NAMES = {
    "train_images": "train-images.idx3-ubyte",
    "train_labels": "train-labels.idx1-ubyte",
    "test_images": "t10k-images.idx3-ubyte",
    "test_labels": "t10k-labels.idx1-ubyte",
}


def write_dir(directory, raw, names=STD_NAMES, suffix=".gz"):
    os.makedirs(directory, exist_ok=True)
    for key, base in names.items():
        write_idx(os.path.join(directory, base + suffix), raw[key])
    return str(directory)


def as_arrays(raw):
    return {
        k: (v[..., None] if k.endswith("images") else v.astype(np.int32)) for k, v in raw.items()
    }


def make_digits_like(n_train=48, n_test=16, size=8, seed=0):
    """Tiny structured images (a bright bar at a random place and orientation on a dark
    background, like a stroke) with labels = orientation; raw dict as load_idx_directory reads."""
    rng = np.random.default_rng(seed)

    def images(n):
        out = np.zeros((n, size, size), np.uint8)
        lab = rng.integers(0, 2, n).astype(np.uint8)
        pos = rng.integers(1, size - 1, n)
        for i in range(n):  # test-data construction only
            if lab[i]:
                out[i, pos[i], 1:-1] = 255
            else:
                out[i, 1:-1, pos[i]] = 255
        return out, lab

    tr, trl = images(n_train)
    te, tel = images(n_test)
    return {"train_images": tr, "train_labels": trl, "test_images": te, "test_labels": tel}


def tiny_config(objective="eps", **overrides):
    """configs/mnist.py shrunk to seconds: 8x8 images from arrays, T = 20, batch 16."""
    import sys

    sys.path.insert(0, REPO)
    from configs import mnist

    c = mnist.get_config(objective)
    c.data.source = "arrays"
    c.data.train_size = 48
    c.data.val_size = 16
    c.schedule.num_steps = 20
    c.schedule.beta_end = 0.2
    c.train.batch_size = 16
    c.train.num_steps = 6
    c.train.log_every_steps = 2
    c.train.num_grid_samples = 4
    c.checkpoint.every_steps = 3
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def cli_args(idx_dir, workdir, steps, **overrides):
    """``experiments.train`` arguments for a tiny run (8x8 IDX data, T = 20, batch 16, a
    checkpoint every 3 steps); ``overrides`` replace or add config keys, with the dots as
    double underscores: ``cli_args(d, w, 6, train__log_every_steps=1)``."""
    keys = {
        "data.source": "idx", "data.path": idx_dir, "data.train_size": 48, "data.val_size": 16,
        "schedule.num_steps": 20, "train.batch_size": 16, "train.num_steps": steps, "train.log_every_steps": 2,
        "train.num_grid_samples": 4, "checkpoint.every_steps": 3,
    }
    keys.update({k.replace("__", "."): v for k, v in overrides.items()})
    return ["--config", "configs/mnist.py", "--workdir", str(workdir)] + [f"--config.{k}={v}" for k, v in keys.items()]


def cpu_env(devices=None, **extra):
    """``os.environ`` for a subprocess that runs JAX on the CPU, with ``devices`` virtual CPU
    devices when given (XLA_FLAGS; otherwise the entry points choose, one per core), plus ``extra``.

    NPROC=16: spare threads in XLA:CPU's pool of max(NPROC or the core count, devices) threads, so
    that the tests' own step loops cannot hit the collective deadlock that
    ``ddpm_jax.cpu_devices.DispatchWindow`` describes (an 8-device test aborted so twice in a full
    ``pytest -n 2`` run). The product keeps XLA's default (a larger pool costs it ~20 %).
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu", NPROC="16")
    if devices is not None:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    env.update(extra)
    return env


class FakeArray:
    """A stand-in for a dispatched computation's array: appends ``name`` to ``log`` when waited
    for (``block_until_ready``), to check when a loop waits for what."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def block_until_ready(self):
        self.log.append(self.name)
        return self


def run_module(module, *args, timeout=600):
    """``python -m module args...`` from the repository root on the CPU (:func:`cpu_env`), output captured."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          env=cpu_env(), timeout=timeout)


def main_driver(module: str) -> str:
    """Python source that runs ``experiments.<module>.main`` once per argument list of the JSON in
    ``sys.argv[1]``, in one process (one interpreter start for many bad-input cases), and prints
    ``[[exit code, stderr], ...]`` as JSON."""
    return f"""
import contextlib, io, json, sys
from absl import flags
from experiments import cli, {module}
out = []
for argv in json.loads(sys.argv[1]):
    flags.FLAGS.unparse_flags()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            {module}.main(cli.parse_flags(["{module}"] + argv))
            code = 0
        except SystemExit as e:
            code = e.code
    out.append([code, err.getvalue()])
print(json.dumps(out))
"""
