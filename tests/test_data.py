"""Tests for ddpm_jax.data: IDX reading, the notebook split, scaling, batches, sharding.

All data is made here (tiny IDX files in tmp_path); the full MNIST check runs only where
``<repo>/../shared/data/mnist`` exists. The TFDS path runs against a fake ``tfds.data_source``.
"""

import gzip
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ddpm_jax import data
from helpers import DOTTED_NAMES, STD_NAMES, cpu_env, idx_bytes, make_raw, write_dir, write_idx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_MNIST = os.path.join(os.path.dirname(REPO), "shared", "data", "mnist")


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# IDX reading
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "names,suffix",
    [(STD_NAMES, ".gz"), (STD_NAMES, ""), (DOTTED_NAMES, ""), (DOTTED_NAMES, ".gz")],
    ids=["gz", "raw", "dotted", "dotted-gz"],
)
def test_idx_directory_round_trip(tmp_path, names, suffix):
    raw = make_raw()
    d = data.load_idx_directory(write_dir(tmp_path / "mnist", raw, names, suffix))
    assert set(d) == {"train_images", "train_labels", "test_images", "test_labels"}
    for split in ("train", "test"):
        assert d[f"{split}_images"].dtype == np.uint8
        assert d[f"{split}_images"].shape == raw[f"{split}_images"].shape + (1,)
        np.testing.assert_array_equal(d[f"{split}_images"][..., 0], raw[f"{split}_images"])
        assert d[f"{split}_labels"].dtype == np.int32
        np.testing.assert_array_equal(d[f"{split}_labels"], raw[f"{split}_labels"])


def test_read_idx_other_types_and_ranks(tmp_path):
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 7
    out = data.read_idx(write_idx(tmp_path / "a.idx", a, type_code=0x0C))
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(out, a)
    b = np.linspace(-1, 1, 10, dtype=np.float32).reshape(2, 5)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "b.gz", b, type_code=0x0D)), b)
    c = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)  # rank-4 uint8 (RGB)
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / "c", c)), c)


def test_read_idx_bad_magic(tmp_path):
    p = tmp_path / "bad.idx"
    p.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 12)
    with pytest.raises(ValueError, match="bad magic number") as e:
        data.read_idx(p)
    assert str(p) in str(e.value)
    p2 = tmp_path / "short"
    p2.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="not an IDX file") as e:
        data.read_idx(p2)
    assert str(p2) in str(e.value)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated(tmp_path, gz):
    payload = idx_bytes(np.zeros((3, 4, 4), np.uint8))[:-5]
    p = tmp_path / ("t.gz" if gz else "t")
    p.write_bytes(gzip.compress(payload) if gz else payload)
    with pytest.raises(ValueError, match=r"truncated.*expected 48 bytes, found 43") as e:
        data.read_idx(p)
    assert str(p) in str(e.value)


def test_read_idx_trailing_bytes(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(idx_bytes(np.zeros((4,), np.uint8)) + b"\x00")
    with pytest.raises(ValueError, match=r"expected 4 bytes, found 5"):
        data.read_idx(p)


def test_read_idx_corrupt_gzip(tmp_path):
    good = gzip.compress(idx_bytes(np.arange(100, dtype=np.uint8)))
    p = tmp_path / "corrupt.gz"
    p.write_bytes(good[: len(good) // 2])  # cut-off download
    with pytest.raises(ValueError, match="gzip") as e:
        data.read_idx(p)
    assert str(p) in str(e.value)
    p2 = tmp_path / "garbage.gz"
    p2.write_bytes(b"this is not gzip at all")
    with pytest.raises(ValueError, match="gzip") as e:
        data.read_idx(p2)
    assert str(p2) in str(e.value)


def test_read_idx_missing_file(tmp_path):
    p = tmp_path / "nope.gz"
    with pytest.raises(FileNotFoundError, match="nope.gz"):
        data.read_idx(p)


def test_load_idx_directory_missing_directory(tmp_path):
    d = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        data.load_idx_directory(d)
    assert str(d) in str(e.value)


def test_load_idx_directory_missing_file(tmp_path):
    d = write_dir(tmp_path / "m", make_raw())
    os.remove(os.path.join(d, "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(FileNotFoundError) as e:
        data.load_idx_directory(d)
    msg = str(e.value)
    assert "test_labels" in msg and "t10k-labels-idx1-ubyte.gz" in msg and d in msg
    assert "train_images" not in msg  # names only what is missing


def test_load_idx_directory_count_mismatch(tmp_path):
    raw = make_raw()
    raw["train_labels"] = raw["train_labels"][:-1]
    d = write_dir(tmp_path / "m", raw)
    with pytest.raises(ValueError, match=r"30 images .* 29 labels"):
        data.load_idx_directory(d)


def test_load_idx_directory_bad_file_names_it(tmp_path):
    d = write_dir(tmp_path / "m", make_raw())
    bad = os.path.join(d, "train-images-idx3-ubyte.gz")
    with open(bad, "wb") as f:
        f.write(b"\x1f\x8b broken")
    with pytest.raises(ValueError) as e:
        data.load_idx_directory(d)
    assert bad in str(e.value)


# ------------------------------------------------------------------------------------------------
# scaling
# ------------------------------------------------------------------------------------------------


def test_scale_images_ranges_and_inverse():
    x = np.arange(256, dtype=np.uint8).reshape(16, 16)
    a = data.scale_images(x, "[0,1]")
    assert a.dtype == np.float32 and a.min() == 0.0 and a.max() == 1.0
    np.testing.assert_allclose(a, x / 255.0, rtol=0, atol=1e-7)
    b = data.scale_images(x, "[-1,1]")
    assert b.dtype == np.float32 and b.min() == -1.0 and b.max() == 1.0
    np.testing.assert_allclose(b, x / 127.5 - 1.0, rtol=0, atol=1e-6)
    for s, y in (("[0,1]", a), ("[-1,1]", b)):
        u = data.unscale_images(y, s)
        np.testing.assert_allclose(u, x / 255.0, rtol=0, atol=1e-6)
        # out-of-range model outputs are clipped into [0, 1]
        u = data.unscale_images(np.array([-3.0, 5.0], np.float32), s)
        np.testing.assert_array_equal(u, [0.0, 1.0])


def test_unscale_images_jax():
    import jax
    import jax.numpy as jnp

    y = jnp.array([-1.5, -1.0, 0.0, 1.0, 2.0])
    out = jax.jit(lambda v: data.unscale_images(v, "[-1,1]"))(y)
    assert isinstance(out, jax.Array)
    np.testing.assert_allclose(np.asarray(out), [0.0, 0.0, 0.5, 1.0, 1.0])


def test_scale_errors():
    with pytest.raises(ValueError, match=r"\[0,1\].*\[-1,1\]"):
        data.scale_images(np.zeros(3, np.uint8), "0-1")
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        data.unscale_images(np.zeros(3), "[0,255]")
    with pytest.raises(TypeError, match="already scaled"):
        data.scale_images(np.zeros(3, np.float32), "[0,1]")
    assert data.SCALES == ("[0,1]", "[-1,1]")


# ------------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------------


def test_split_sizes_disjoint_and_content():
    raw = make_raw(30, 10)
    s = data.load_splits("arrays", arrays=raw, train_size=25, val_size=12, seed=3)
    assert s.train.shape == (25, 5, 4, 1) and s.train.dtype == np.float32
    assert s.val.shape == (12, 5, 4, 1) and s.test.shape == (10, 5, 4, 1)
    assert s.train_labels.dtype == s.val_labels.dtype == s.test_labels.dtype == np.int32
    both = np.concatenate([s.train_index, s.val_index])
    assert len(np.unique(both)) == 37 and both.min() >= 0 and both.max() < 40
    pool = np.concatenate([raw["train_images"], raw["test_images"]])
    pool_labels = np.concatenate([raw["train_labels"], raw["test_labels"]])
    np.testing.assert_array_equal(s.train[..., 0], pool[s.train_index] / np.float32(255))
    np.testing.assert_array_equal(s.val_labels, pool_labels[s.val_index])
    np.testing.assert_array_equal(s.test[..., 0], raw["test_images"] / np.float32(255))
    np.testing.assert_array_equal(s.test_labels, raw["test_labels"])
    assert s.image_shape == (5, 4, 1) and s.scale == "[0,1]"
    # the whole pool, and val_size 0
    s = data.load_splits("arrays", arrays=raw, train_size=40, val_size=0)
    assert s.train.shape[0] == 40 and s.val.shape == (0, 5, 4, 1)
    assert sorted(s.train_index.tolist()) == list(range(40))


def test_split_scale_minus_one_one():
    s = data.load_splits("arrays", arrays=make_raw(), train_size=20, val_size=5, scale="[-1,1]")
    assert s.train.min() >= -1.0 and s.train.max() <= 1.0 and s.train.min() < -0.9
    assert s.scale == "[-1,1]"


def test_split_deterministic_in_seed():
    raw = make_raw(30, 10)
    a = data.load_splits("arrays", arrays=raw, train_size=20, val_size=10, seed=7)
    b = data.load_splits("arrays", arrays=raw, train_size=20, val_size=10, seed=7)
    c = data.load_splits("arrays", arrays=raw, train_size=20, val_size=10, seed=8)
    np.testing.assert_array_equal(a.train_index, b.train_index)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)
    assert not np.array_equal(a.train_index, c.train_index)


def test_split_errors():
    raw = make_raw(30, 10)
    with pytest.raises(ValueError, match=r"data.train_size \+ data.val_size = .* exceeds the 40"):
        data.load_splits("arrays", arrays=raw, train_size=30, val_size=11)
    with pytest.raises(ValueError, match="data.val_size"):
        data.load_splits("arrays", arrays=raw, train_size=10, val_size=-1)
    with pytest.raises(ValueError, match="data.train_size"):
        data.load_splits("arrays", arrays=raw, train_size=0, val_size=1)
    with pytest.raises(ValueError, match=r"tfds.*idx.*arrays"):
        data.load_splits("csv", arrays=raw)
    with pytest.raises(ValueError, match="data.path"):
        data.load_splits("idx", path=None)
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        data.load_splits("arrays", arrays=raw, scale="01", train_size=5, val_size=0)


def test_split_from_idx_directory(tmp_path):
    raw = make_raw(30, 10)
    d = write_dir(tmp_path / "m", raw)
    a = data.load_splits("idx", path=d, train_size=20, val_size=10, seed=1)
    b = data.load_splits("arrays", arrays=raw, train_size=20, val_size=10, seed=1)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val_labels, b.val_labels)


# ------------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------------


def test_steps_per_epoch():
    assert data.steps_per_epoch(100, 10) == 10
    assert data.steps_per_epoch(105, 10) == 10
    with pytest.raises(ValueError, match="train.batch_size=11"):
        data.steps_per_epoch(10, 11)


def test_batch_indices_epochs_are_permutations():
    n, gb, spe = 24, 6, 4
    epochs = [
        np.concatenate([data.batch_indices(5, e * spe + i, n, gb) for i in range(spe)])
        for e in range(3)
    ]
    for ep in epochs:
        assert sorted(ep.tolist()) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])
    # the definition
    perm = np.random.default_rng([5, 2]).permutation(n)
    np.testing.assert_array_equal(data.batch_indices(5, 2 * spe + 1, n, gb), perm[6:12])
    # seeds differ
    assert not np.array_equal(data.batch_indices(5, 0, n, gb), data.batch_indices(6, 0, n, gb))


def test_batch_indices_remainder_dropped_no_repeats():
    n, gb = 25, 6  # 4 steps per epoch, 1 example dropped each epoch
    ep = np.concatenate([data.batch_indices(0, i, n, gb) for i in range(4)])
    assert len(np.unique(ep)) == 24
    assert data.batch_indices(0, 4, n, gb).shape == (gb,)  # step 4 is epoch 1


def test_batch_iterator_resume_and_values():
    images = np.arange(40 * 2, dtype=np.float32).reshape(40, 2)
    full = list(data.BatchIterator(images, 8, seed=1).take(12))
    assert [s for s, _ in full] == list(range(12))
    it = data.BatchIterator(images, 8, seed=1, start_step=7)
    resumed = list(it.take(5))
    assert it.step == 12
    for (s1, b1), (s2, b2) in zip(full[7:], resumed):
        assert s1 == s2
        np.testing.assert_array_equal(b1, b2)
    for s, b in full:
        np.testing.assert_array_equal(b, images[data.batch_indices(1, s, 40, 8)])
    # iterating directly is infinite and continues where take() stopped
    step, b = next(iter(it))
    assert step == 12 and b.shape == (8, 2)


def test_batch_iterator_process_slices_concatenate():
    images = np.random.default_rng(0).normal(size=(50, 3, 3, 1)).astype(np.float32)
    g = data.BatchIterator(images, 12, seed=4, start_step=3)
    parts = [data.BatchIterator(images, 12, seed=4, start_step=3, process_index=p, process_count=3)
             for p in range(3)]
    for _ in range(6):
        step, glob = next(g)
        locs = [next(p) for p in parts]
        assert all(s == step for s, _ in locs)
        assert all(b.shape == (4, 3, 3, 1) for _, b in locs)
        np.testing.assert_array_equal(np.concatenate([b for _, b in locs]), glob)
    with pytest.raises(ValueError, match="train.batch_size=12 is not divisible by the 5"):
        data.BatchIterator(images, 12, seed=0, process_count=5)


def test_batch_iterator_pytree():
    x = np.arange(20).reshape(20, 1)
    y = np.arange(20) * 10
    it = data.BatchIterator((x, y), 5, seed=0)
    _, (bx, by) = next(it)
    np.testing.assert_array_equal(bx[:, 0] * 10, by)


def test_pmap_reshape():
    b = np.arange(12 * 2).reshape(12, 2)
    r = data.shard_for_pmap(b, 4)
    assert r.shape == (4, 3, 2)
    np.testing.assert_array_equal(r.reshape(12, 2), b)
    with pytest.raises(ValueError, match="not divisible by the 5"):
        data.shard_for_pmap(b, 5)


def test_shard_batch_single_device():
    mesh = data.make_mesh()
    assert mesh.axis_names == ("data",)
    b = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    arr = data.shard_batch(b, mesh)
    np.testing.assert_array_equal(np.asarray(arr), b)


SHARD_SCRIPT = textwrap.dedent(
    """
    import json
    import jax
    import numpy as np
    from ddpm_jax import data

    mesh = data.make_mesh()
    images = np.random.default_rng(0).normal(size=(64, 4, 4, 1)).astype(np.float32)
    it = data.BatchIterator(images, 16, seed=0)
    step, local = next(it)
    arr = data.shard_batch(local, mesh)
    out = {
        "devices": jax.device_count(),
        "mesh_shape": dict(mesh.shape),
        "sharding_devices": len(arr.sharding.device_set),
        "shape": list(arr.shape),
        "shard_shapes": sorted({tuple(s.data.shape) for s in arr.addressable_shards}),
        "equal": bool(np.array_equal(np.asarray(arr), local)),
        "spec": str(arr.sharding.spec),
    }
    pair = data.shard_batch((local, np.arange(16, dtype=np.int32)), mesh)
    out["pair_equal"] = bool(np.array_equal(np.asarray(pair[1]), np.arange(16)))
    out["pmap_shape"] = list(data.shard_for_pmap(local, jax.local_device_count()).shape)
    try:
        data.shard_batch(local[:12], mesh)
        out["bad_error"] = None
    except ValueError as e:
        out["bad_error"] = str(e)
    print("RESULT " + json.dumps(out))
    """
)


def test_shard_batch_eight_virtual_devices():
    env = cpu_env(8)
    proc = subprocess.run(
        [sys.executable, "-c", SHARD_SCRIPT], env=env, cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    assert out["devices"] == 8
    assert out["mesh_shape"] == {"data": 8}
    assert out["sharding_devices"] == 8
    assert out["shape"] == [16, 4, 4, 1]
    assert out["shard_shapes"] == [[2, 4, 4, 1]]
    assert out["equal"] and out["pair_equal"]
    assert out["pmap_shape"] == [8, 2, 4, 4, 1]
    assert out["bad_error"] and "not divisible" in out["bad_error"]


# ------------------------------------------------------------------------------------------------
# the real MNIST (where available)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
    if not os.path.isdir(SHARED_MNIST):
        pytest.skip(f"no MNIST IDX files at {SHARED_MNIST}")
    return data.load_idx_directory(SHARED_MNIST)


def test_full_mnist_sanity(mnist):
    assert mnist["train_images"].shape == (60000, 28, 28, 1)
    assert mnist["test_images"].shape == (10000, 28, 28, 1)
    assert mnist["train_labels"].shape == (60000,) and mnist["test_labels"].shape == (10000,)
    x = mnist["train_images"].astype(np.float64) / 255.0
    assert round(float(x.mean()), 4) == 0.1307
    assert round(float(x.std()), 4) == 0.3081
    t = mnist["test_images"].astype(np.float64) / 255.0
    assert round(float(t.mean()), 4) == 0.1325
    assert round(float(t.std()), 4) == 0.3105
    counts = np.bincount(mnist["train_labels"], minlength=10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_full_mnist_notebook_split(mnist):
    s = data.load_splits("arrays", arrays=mnist)  # defaults: 50,000 / 20,000 of the 70,000 pool
    assert s.train.shape == (50000, 28, 28, 1) and s.val.shape == (20000, 28, 28, 1)
    assert s.test.shape == (10000, 28, 28, 1)
    assert len(np.unique(np.concatenate([s.train_index, s.val_index]))) == 70000
    with pytest.raises(ValueError, match="exceeds the 70000 images available"):
        data.load_splits("arrays", arrays=mnist, train_size=60000, val_size=10001)


# ------------------------------------------------------------------------------------------------
# TFDS (faked: no internet here)
# ------------------------------------------------------------------------------------------------


class FakeSource:
    """Mimics a tfds ArrayRecord data source: random access to decoded example dicts."""

    def __init__(self, images, labels, batched=True):
        self.images, self.labels = images, labels
        if not batched:
            self.__getitems__ = None  # exercise the per-item fallback

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": np.int64(self.labels[i])}

    def __getitems__(self, keys):
        return [self[k] for k in keys]


@pytest.mark.parametrize("channels,batched", [(1, True), (3, False)])
def test_load_tfds_with_fake_source(monkeypatch, tmp_path, channels, batched):
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.default_rng(0)
    splits = {
        "train": (rng.integers(0, 256, (7000, 6, 6, channels), dtype=np.uint8),
                  rng.integers(0, 10, 7000)),
        "test": (rng.integers(0, 256, (9, 6, 6, channels), dtype=np.uint8),
                 rng.integers(0, 10, 9)),
    }
    calls = []

    def fake_data_source(name, *, split=None, data_dir=None, download=True, builder_kwargs=None,
                         **kw):
        calls.append((name, split, data_dir, download, builder_kwargs))
        return FakeSource(*splits[split], batched=batched)

    monkeypatch.setattr(tfds, "data_source", fake_data_source)
    d = data.load_tfds("fake_mnist", data_dir=str(tmp_path))
    assert {c[1] for c in calls} == {"train", "test"}
    for name, _, data_dir, download, kwargs in calls:
        assert name == "fake_mnist" and data_dir == str(tmp_path) and download is True
        assert kwargs == {"file_format": "array_record"}
    for split in ("train", "test"):
        assert d[f"{split}_images"].dtype == np.uint8
        np.testing.assert_array_equal(d[f"{split}_images"], splits[split][0])
        assert d[f"{split}_labels"].dtype == np.int32
        np.testing.assert_array_equal(d[f"{split}_labels"], splits[split][1])
    s = data.load_splits("tfds", name="fake_mnist", path=str(tmp_path), train_size=5000,
                         val_size=2000)
    assert s.train.shape == (5000, 6, 6, channels) and s.test.shape == (9, 6, 6, channels)


def test_load_tfds_errors(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")

    def failing(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(tfds, "data_source", failing)
    with pytest.raises(RuntimeError, match=r"no network.*data.source=idx"):
        data.load_tfds("mnist")

    def needs_tf(*a, **k):
        raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")

    monkeypatch.setattr(tfds, "data_source", needs_tf)
    with pytest.raises(RuntimeError, match=r"generate.*tensorflow-cpu.*data.source=idx"):
        data.load_tfds("mnist")

    def verbose(*a, **k):
        raise KeyError("Dataset nope not found.\n" + "\n".join(f"- ds{i}" for i in range(500)))

    monkeypatch.setattr(tfds, "data_source", verbose)
    with pytest.raises(RuntimeError) as e:
        data.load_tfds("nope")
    assert "nope" in str(e.value) and "ds499" not in str(e.value) and len(str(e.value)) < 1000
    monkeypatch.setitem(sys.modules, "array_record", None)
    with pytest.raises(ImportError, match=r"array_record.*data.source=idx"):
        data.load_tfds("mnist")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"tensorflow-datasets.*data.source=idx"):
        data.load_tfds("mnist")
