"""The MNIST-family datasets (MNIST, Fashion-MNIST) as IDX files, without TensorFlow: from a
per-user cache, downloading over HTTPS into it what is missing, each file checked by SHA-256.

    directory = fetch("mnist")          # the cache directory, complete and checked
    arrays = load_idx_directory(directory)

The cache is ``$DDPM_JAX_DATA`` when set, else ``$XDG_CACHE_HOME/ddpm_jax`` (by default
``~/.cache/ddpm_jax``), one sub-directory per dataset. A downloaded file is accepted when its
SHA-256 is the published one of the gzipped file or, for a mirror that compressed the same data
differently, when the SHA-256 of its decompressed content is that of the published data. It is
written to a temporary name in the cache and renamed once checked, so a failed, interrupted or
corrupt download leaves nothing in the cache. Files already in the cache are checked the same way
on every call (hashing MNIST takes a fraction of a second) and fetched again if they fail.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import urllib.error
import urllib.request
import zlib
from typing import Dict, Optional, Tuple

from ddpm_jax.data.idx import IDX_FILE_NAMES
from ddpm_jax.files import atomic_path

__all__ = ["DATASETS", "DownloadError", "default_cache_dir", "fetch"]


@dataclasses.dataclass(frozen=True)
class _Checksums:
    gz: str  # SHA-256 of the published .gz file
    raw: Optional[str] = None  # SHA-256 of its decompressed content, where known


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset's HTTPS mirrors (tried in order) and the checksums of its four files (by role:
    'train_images', 'train_labels', 'test_images', 'test_labels')."""

    urls: Tuple[str, ...]
    files: Dict[str, _Checksums]


DATASETS: Dict[str, Dataset] = {
    "mnist": Dataset(
        urls=("https://storage.googleapis.com/cvdf-datasets/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
        files={
            "train_images": _Checksums("440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                                       "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
            "train_labels": _Checksums("3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                                       "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
            "test_images": _Checksums("8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                                      "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
            "test_labels": _Checksums("f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                                      "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
        }),
    "fashion_mnist": Dataset(
        urls=("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",),
        files={
            "train_images": _Checksums("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
            "train_labels": _Checksums("a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
            "test_images": _Checksums("346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
            "test_labels": _Checksums("67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
        }),
}

_OFFLINE_HINT = ("without internet, give a directory that holds the four IDX files with --config.data.path=DIR "
                 "(or set DDPM_JAX_DATA to a cache that has them)")


class DownloadError(FileNotFoundError):
    """A dataset file is not in the cache and could not be downloaded (no connection, an HTTP
    error); one line, with what to do. A FileNotFoundError: the entry points report missing data
    as bad input."""


def default_cache_dir() -> str:
    """``$DDPM_JAX_DATA``, else ``$XDG_CACHE_HOME/ddpm_jax``, else ``~/.cache/ddpm_jax``."""
    if os.environ.get("DDPM_JAX_DATA"):
        return os.path.expanduser(os.environ["DDPM_JAX_DATA"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ddpm_jax")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _matches(data: bytes, sums: _Checksums) -> bool:
    """The published .gz, or (when the decompressed checksum is known) any gzip of the same data."""
    if _sha256(data) == sums.gz:
        return True
    if sums.raw is None:
        return False
    try:
        return _sha256(gzip.decompress(data)) == sums.raw
    except (OSError, EOFError, zlib.error):
        return False


def _get(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (https URLs from the table)
            return response.read()
    except urllib.error.HTTPError as e:
        raise DownloadError(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DownloadError(str(e.reason)) from None
    except (OSError, ValueError) as e:  # timeouts, resets, a malformed URL
        raise DownloadError(str(e) or type(e).__name__) from None


def fetch(name: str, cache_dir: Optional[str] = None, *, base_url: Optional[str] = None, timeout: float = 60.0) -> str:
    """The directory ``<cache_dir>/<name>`` holding the dataset's four IDX files, each checked,
    downloading those that are missing or fail their checksum.

    Args:
      name: a key of :data:`DATASETS` ('mnist', 'fashion_mnist').
      cache_dir: default :func:`default_cache_dir`.
      base_url: a mirror to download from instead of the published ones (``<base_url>/<file>.gz``);
        its files must pass the same checksums.
      timeout: seconds per HTTP request.

    Raises:
      ValueError: an unknown ``name``, or a downloaded file that fails its checksum (the message
        names the file and the URL; nothing is written to the cache).
      DownloadError: no mirror could be reached (one line saying how to pass ``data.path``).
      OSError: the cache cannot be written.
    """
    if name not in DATASETS:
        raise ValueError(f"no download for dataset {name!r}: the IDX download knows {', '.join(sorted(DATASETS))}")
    spec = DATASETS[name]
    directory = os.path.join(cache_dir or default_cache_dir(), name)
    urls = (base_url.rstrip("/") + "/",) if base_url else spec.urls
    for role, sums in spec.files.items():
        file = IDX_FILE_NAMES[role]
        target = os.path.join(directory, file)
        if os.path.isfile(target):
            with open(target, "rb") as f:
                if _matches(f.read(), sums):
                    continue
        os.makedirs(directory, exist_ok=True)
        errors = []
        for url in (u + file for u in urls):
            try:
                data = _get(url, timeout)
            except DownloadError as e:
                errors.append(f"{url}: {e}")
                continue
            if not _matches(data, sums):
                raise ValueError(f"{file} downloaded from {url} fails its SHA-256 check (got {_sha256(data)[:16]}…, "
                                 f"expected {sums.gz[:16]}…): a corrupted or wrong file; nothing was written to {directory}")
            with atomic_path(target) as tmp:
                with open(tmp, "wb") as f:
                    f.write(data)
            break
        else:
            raise DownloadError(f"cannot download {name} ({'; '.join(errors)}); {_OFFLINE_HINT}")
    return directory
