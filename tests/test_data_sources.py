"""The data sources beyond a plain IDX directory: the MNIST-family download into a per-user cache
(against a local HTTP server on 127.0.0.1: no internet), the 'auto' source through the trainer,
and a folder of PNG/JPEG images."""

import contextlib
import functools
import gzip
import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from ddpm_jax import data
from ddpm_jax.data import download
from helpers import REPO, STD_NAMES, cli_args, cpu_env, make_digits_like, write_dir

SHARED_MNIST = os.path.join(os.path.dirname(REPO), "shared", "data", "mnist")
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
ROLES = ("train_images", "train_labels", "test_images", "test_labels")


@contextlib.contextmanager
def serve(directory):
    """An HTTP server on 127.0.0.1 (a free port) serving ``directory``; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def closed_port_url():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


@pytest.fixture
def tiny_served(tmp_path, monkeypatch):
    """Tiny IDX files served over HTTP, registered as dataset 'mnist' with their own checksums."""
    served = write_dir(tmp_path / "served", make_digits_like(), STD_NAMES, ".gz")
    sums = {role: download._Checksums(hashlib.sha256(open(os.path.join(served, f), "rb").read()).hexdigest())
            for role, f in zip(ROLES, FILES)}
    monkeypatch.setitem(download.DATASETS, "mnist", download.Dataset(urls=("https://unused.invalid/",), files=sums))
    return served


def test_fetch_downloads_into_the_cache_and_reuses_it_offline(tiny_served, tmp_path):
    cache = tmp_path / "cache"
    with serve(tiny_served) as url:
        directory = download.fetch("mnist", str(cache), base_url=url)
    assert directory == str(cache / "mnist") and sorted(os.listdir(directory)) == sorted(FILES)  # no temporary files
    for f in FILES:
        assert open(os.path.join(directory, f), "rb").read() == open(os.path.join(tiny_served, f), "rb").read()
    # the server is gone: the checked cache serves the next call
    assert download.fetch("mnist", str(cache), base_url=closed_port_url()) == directory
    raw = data.load_idx_directory(directory)
    assert raw["train_images"].shape == (48, 8, 8, 1) and raw["test_labels"].shape == (16,)


def test_a_corrupted_download_names_the_file_and_leaves_nothing(tiny_served, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_served, bad)
    blob = bytearray((bad / FILES[0]).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (bad / FILES[0]).write_bytes(bytes(blob))
    cache = tmp_path / "cache"
    with serve(bad) as url, pytest.raises(ValueError) as e:
        download.fetch("mnist", str(cache), base_url=url)
    msg = str(e.value)
    assert f"{FILES[0]} downloaded from {url}{FILES[0]} fails its SHA-256 check" in msg and "\n" not in msg
    assert not (cache / "mnist").exists() or os.listdir(cache / "mnist") == []


def test_a_corrupted_cached_file_is_fetched_again(tiny_served, tmp_path):
    cache = tmp_path / "cache"
    with serve(tiny_served) as url:
        directory = download.fetch("mnist", str(cache), base_url=url)
        (cache / "mnist" / FILES[1]).write_bytes(b"truncated")
        download.fetch("mnist", str(cache), base_url=url)
    assert open(os.path.join(directory, FILES[1]), "rb").read() == open(os.path.join(tiny_served, FILES[1]), "rb").read()


def test_an_unreachable_server_is_one_line_naming_data_path(tiny_served, tmp_path):
    with pytest.raises(download.DownloadError) as e:
        download.fetch("mnist", str(tmp_path / "cache"), base_url=closed_port_url(), timeout=5)
    msg = str(e.value)
    assert msg.startswith("cannot download mnist (") and "--config.data.path=DIR" in msg and "\n" not in msg
    assert not os.path.exists(tmp_path / "cache" / "mnist" / FILES[0])


def test_unknown_dataset_is_refused():
    with pytest.raises(ValueError, match="no download for dataset 'svhn'"):
        download.fetch("svhn")


def test_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPM_JAX_DATA", str(tmp_path / "d"))
    assert download.default_cache_dir() == str(tmp_path / "d")
    monkeypatch.delenv("DDPM_JAX_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert download.default_cache_dir() == str(tmp_path / "x" / "ddpm_jax")


@pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason="needs ../shared/data/mnist")
def test_the_published_checksums_accept_mnist_from_a_mirror(tmp_path):
    """The real table: a mirror serving MNIST gzipped differently passes on its decompressed
    content's SHA-256; one changed byte fails."""
    cache = tmp_path / "cache"
    with serve(SHARED_MNIST) as url:
        directory = download.fetch("mnist", str(cache), base_url=url)
    raw = data.load_idx_directory(directory)
    assert raw["train_images"].shape == (60000, 28, 28, 1) and raw["test_images"].shape == (10000, 28, 28, 1)
    bad = tmp_path / "bad"
    bad.mkdir()
    labels = bytearray(gzip.decompress((cache / "mnist" / FILES[3]).read_bytes()))
    labels[100] = (labels[100] + 1) % 10
    (bad / FILES[3]).write_bytes(gzip.compress(bytes(labels)))
    for f in FILES[:3]:
        shutil.copy(cache / "mnist" / f, bad / f)
    with serve(bad) as url, pytest.raises(ValueError, match=f"{FILES[3]} downloaded from .* fails its SHA-256 check"):
        download.fetch("mnist", str(tmp_path / "cache2"), base_url=url)
    assert FILES[3] not in os.listdir(tmp_path / "cache2" / "mnist")


def _train(args, **env):
    return subprocess.run([sys.executable, "-m", "experiments.train", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env=cpu_env(**env), timeout=600)


def test_trainer_downloads_with_the_default_source(tmp_path):
    """configs/mnist.py's 'auto' source without data.path: the cache, filled from data.url; a
    dead server is one error line (exit 2) that says how to pass data.path."""
    served = write_dir(tmp_path / "served", make_digits_like(), STD_NAMES, ".gz")
    sums = {role: hashlib.sha256(open(os.path.join(served, f), "rb").read()).hexdigest() for role, f in zip(ROLES, FILES)}
    # the child process registers the tiny files' checksums as 'mnist' through a sitecustomize
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "from ddpm_jax.data import download as d\n"
        f"d.DATASETS['mnist'] = d.Dataset(urls=('https://unused.invalid/',), files={{r: d._Checksums(s) for r, s in {sums!r}.items()}})\n")
    env = {"DDPM_JAX_DATA": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join([str(site), REPO])}
    base = [a for a in cli_args("", tmp_path / "run", 3) if not a.startswith(("--config.data.source", "--config.data.path"))]
    with serve(served) as url:
        ok = _train(base + [f"--config.data.url={url}"], **env)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "cache" / "mnist")) == sorted(FILES)
    dead = _train([a.replace(str(tmp_path / "run"), str(tmp_path / "run2")) for a in base] + [f"--config.data.url={closed_port_url()}"],
                  DDPM_JAX_DATA=str(tmp_path / "empty"), PYTHONPATH=env["PYTHONPATH"])
    assert dead.returncode == 2
    lines = dead.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot download mnist (") and "--config.data.path=DIR" in lines[-1]


# ------------------------------------------------------------------------------------------------
# A folder of images
# ------------------------------------------------------------------------------------------------


def _png(path, array):
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_with_class_directories(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {}
    for cls in ("cat", "dog"):
        for i in range(7):
            a = rng.integers(0, 256, (6, 5), dtype=np.uint8)
            _png(str(tmp_path / cls / f"{i}.png"), a)
            imgs[(cls, i)] = a
    raw = data.load_image_folder(tmp_path)
    n_train, n_test = raw["train_images"].shape[0], raw["test_images"].shape[0]
    assert (n_train, n_test) == (12, 2) and raw["train_images"].shape[1:] == (6, 5, 1)  # 14 // 7 test images
    assert raw["train_images"].dtype == np.uint8 and set(np.unique(raw["train_labels"])) <= {0, 1}
    everything = np.concatenate([raw["train_images"], raw["test_images"]])[..., 0]
    labels = np.concatenate([raw["train_labels"], raw["test_labels"]])
    for (cls, i), a in imgs.items():  # each image once, with its class's label (sorted: cat 0, dog 1)
        hits = [k for k in range(14) if np.array_equal(everything[k], a)]
        assert len(hits) == 1 and labels[hits[0]] == ("cat", "dog").index(cls)


def test_folder_rgb_and_given_splits(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            _png(str(tmp_path / split / f"{i}.png"), rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    raw = data.load_image_folder(tmp_path)
    assert raw["train_images"].shape == (3, 4, 4, 3) and raw["test_images"].shape == (2, 4, 4, 3)
    assert (raw["train_labels"] == 0).all()


def test_folder_errors_are_one_line_naming_the_problem(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no PNG or JPEG images"):
        data.load_image_folder(empty)
    mixed = tmp_path / "mixed"
    _png(str(mixed / "a.png"), np.zeros((4, 4), np.uint8))
    _png(str(mixed / "b.png"), np.zeros((5, 4), np.uint8))
    with pytest.raises(ValueError, match=r"images differ in size: .*a.png is 4x4, .*b.png is 4x5"):
        data.load_image_folder(mixed)
    broken = tmp_path / "broken"
    _png(str(broken / "a.png"), np.zeros((4, 4), np.uint8))
    (broken / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*b.png"):
        data.load_image_folder(broken)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_image_folder(tmp_path / "nowhere")


def test_folder_source_through_the_config(tmp_path):
    from ddpm_jax.config import ConfigError, validate_config
    from helpers import tiny_config

    with pytest.raises(ConfigError, match="data.source='folder' needs the directory of images"):
        validate_config(tiny_config("eps", **{"data.source": "folder", "data.path": ""}))
    for i in range(14):
        _png(str(tmp_path / "imgs" / f"{i}.png"), np.full((8, 8), 18 * i, np.uint8))
    c = tiny_config("eps", **{"data.source": "folder", "data.path": str(tmp_path / "imgs"), "data.train_size": 10, "data.val_size": 2})
    validate_config(c)
    splits = data.splits_from_config(c)
    assert splits.train.shape == (10, 8, 8, 1) and splits.test.shape == (2, 8, 8, 1)
