"""The Inception-v3 of FID (pytorch-fid's ``InceptionV3`` with its FID blocks) in Flax, its weights,
and batched feature extraction.

The network is the TensorFlow Inception graph of 2015-12-05 that TTUR's FID and the improved-GAN
Inception Score run, as pytorch-fid ports it (``pytorch_fid/inception.py``). It is not
torchvision's Inception-v3: its blocks differ where the TensorFlow graph does, and the weights
differ. Layer by layer (NHWC here; the torch names are kept, so each weight maps by name)::

    (B, 299, 299, 3) in [−1, 1]
    Conv2d_1a_3x3 s2, Conv2d_2a_3x3, Conv2d_2b_3x3 pad 1, max-pool 3 s2        → (B, 73, 73, 64)
    Conv2d_3b_1x1, Conv2d_4a_3x3, max-pool 3 s2                                  → (B, 35, 35, 192)
    Mixed_5b/5c/5d  FIDInceptionA (32, 64, 64 pool features)                     → (B, 35, 35, 288)
    Mixed_6a        InceptionB                                                   → (B, 17, 17, 768)
    Mixed_6b..6e    FIDInceptionC (7×7 channels 128, 160, 160, 192)              → (B, 17, 17, 768)
    Mixed_7a        InceptionD                                                   → (B, 8, 8, 1280)
    Mixed_7b        FIDInceptionE_1,  Mixed_7c FIDInceptionE_2                   → (B, 8, 8, 2048)
    mean over H, W                                   → pool3 (B, 2048): the FID, KID and P/R features
    fc (2048 → 1008): logits_unbiased = pool3 · W (the Inception Score's), logits = pool3 · W + b

- ``BasicConv2d`` = convolution without bias, BatchNorm in inference mode with ε = 0.001 (its
  running mean and variance), ReLU.
- The FID blocks: the 3×3 average pools of A, C and E_1 (stride 1, padding 1) divide by the
  number of *unpadded* inputs in the window (``count_include_pad=False``); E_2 (Mixed_7c) pools
  with a 3×3 *max* pool instead. The head has 1008 classes (the TensorFlow graph's), not 1000.

Preprocessing, as pytorch-fid's ``InceptionV3(resize_input=True, normalize_input=True)``:
images in [0, 1] (uint8 divided by 255, as ``ToTensor`` does), resized to 299 × 299 by bilinear
interpolation with half-pixel centres and no antialiasing (``F.interpolate(mode='bilinear',
align_corners=False)``; ``jax.image.resize(method='linear', antialias=False)`` computes the same
to one float32 ulp, upsampling 28 or 32 → 299 and downsampling alike), then x ↦ 2x − 1, and a
single channel repeated to three. (torch-fidelity resizes uint8 inputs with TensorFlow 1.x's
bilinear rule instead, so its features differ slightly from pytorch-fid's on non-299 inputs.)

Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (:data:`FID_WEIGHTS_URL`),
checked by its full SHA-256 :data:`FID_WEIGHTS_SHA256` (95,628,359 bytes; the value that projects
pinning this file publish, and its first 8 hex digits are the ``6726825d`` in the file name, as
torch.hub names files). :func:`load_weights` reads it from a path you give, or from the per-user
cache (``ddpm_jax.data.download.default_cache_dir()/inception/``), downloading it there over HTTPS
when missing. The ``.pth`` is read by :mod:`ddpm_jax.torch_checkpoint` (no torch, no pickled
code executed), converted once to an ``.npz`` in the same cache keyed by the file's SHA-256, and
later runs load that.

Public API::

    load_weights(path=None, *, expected_sha256=FID_WEIGHTS_SHA256) -> InceptionWeights
    variables_from_state_dict(state_dict) -> Flax variables      (the name mapping, shape-checked)
    init_variables(key) -> random Flax variables                 (benchmarks, tests)
    preprocess(images) -> (B, 299, 299, 3) in [−1, 1]
    extract(images, weights, batch_size=200, outputs=('pool3', 'logits_unbiased')) -> dict of arrays
    check_images(images) -> images as given, validated
    EXTRACTOR_ID = 'inception_v3_fid'; FEATURE_DIM = 2048; NUM_LOGITS = 1008
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "EXTRACTOR_ID", "FEATURE_DIM", "FID_WEIGHTS_FILENAME", "FID_WEIGHTS_SHA256", "FID_WEIGHTS_URL", "INPUT_SIZE",
    "NUM_LOGITS", "FIDInceptionV3", "InceptionWeights", "WeightsError", "cache_dir", "check_images", "extract",
    "init_variables", "load_weights", "preprocess", "variables_from_state_dict",
]

EXTRACTOR_ID = "inception_v3_fid"
"""Extractor id of the pool3 features (FID statistics record it; the version is the weights' SHA-256)."""
FEATURE_DIM = 2048
NUM_LOGITS = 1008
INPUT_SIZE = 299
BN_EPSILON = 1e-3

FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"

_PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}


class WeightsError(ValueError):
    """A weights file that is not pytorch-fid's FID Inception (wrong SHA-256, names or shapes). One line."""


# ------------------------------------------------------------------------------------------------
# The network
# ------------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Conv (no bias, symmetric zero padding) → BatchNorm (running statistics, ε = 0.001) → ReLU."""

    features: int
    kernel_size: Tuple[int, int]
    strides: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, self.kernel_size, self.strides, padding=[(p, p) for p in self.padding],
                    use_bias=False, precision=_PRECISIONS[self.precision], name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    """3×3 average pool, stride 1, padding 1, dividing by the unpadded inputs (TensorFlow's)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class FIDInceptionA(nn.Module):
    pool_features: int
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        c = functools.partial(BasicConv2d, precision=self.precision)
        b1 = c(64, (1, 1), name="branch1x1")(x)
        b5 = c(64, (5, 5), padding=(2, 2), name="branch5x5_2")(c(48, (1, 1), name="branch5x5_1")(x))
        b3 = c(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = c(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        c = functools.partial(BasicConv2d, precision=self.precision)
        b3 = c(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = c(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = c(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    channels_7x7: int
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        c = functools.partial(BasicConv2d, precision=self.precision)
        c7 = self.channels_7x7
        b1 = c(192, (1, 1), name="branch1x1")(x)
        b7 = c(c7, (1, 1), name="branch7x7_1")(x)
        b7 = c(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = c(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = c(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = c(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = c(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        c = functools.partial(BasicConv2d, precision=self.precision)
        b3 = c(320, (3, 3), strides=(2, 2), name="branch3x3_2")(c(192, (1, 1), name="branch3x3_1")(x))
        b7 = c(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = c(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = c(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """FIDInceptionE_1 (``pool='avg'``, Mixed_7b) and FIDInceptionE_2 (``pool='max'``, Mixed_7c)."""

    pool: str
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        c = functools.partial(BasicConv2d, precision=self.precision)
        b1 = c(320, (1, 1), name="branch1x1")(x)
        b3 = c(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([c(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              c(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = c(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = c(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([c(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              c(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:  # pytorch-fid's FIDInceptionE_2: the TensorFlow graph max-pools here
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        bp = c(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class _FC(nn.Module):
    """The 1008-way head: returns (x·W, x·W + b)."""

    features: int = NUM_LOGITS
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        unbiased = jnp.dot(x, kernel, precision=_PRECISIONS[self.precision])
        return unbiased, unbiased + bias


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3 (module docstring). ``x``: (B, H, W, 3) in [−1, 1], normally
    299 × 299 (:func:`preprocess`). Returns {'pool3': (B, 2048), 'logits_unbiased': (B, 1008),
    'logits': (B, 1008)}.

    ``precision``: 'highest' computes every convolution and product in full float32 (on GPUs and
    TPUs too, where the default would round the operands to TF32 / bfloat16); 'default' lets the
    backend choose (faster there; the features then differ by that rounding).
    """

    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        c = functools.partial(BasicConv2d, precision=self.precision)
        p = self.precision
        x = c(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
        x = c(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = c(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = c(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = c(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = FIDInceptionA(32, p, name="Mixed_5b")(x)
        x = FIDInceptionA(64, p, name="Mixed_5c")(x)
        x = FIDInceptionA(64, p, name="Mixed_5d")(x)
        x = InceptionB(p, name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = FIDInceptionC(c7, p, name=name)(x)
        x = InceptionD(p, name="Mixed_7a")(x)
        x = FIDInceptionE("avg", p, name="Mixed_7b")(x)
        x = FIDInceptionE("max", p, name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        unbiased, logits = _FC(NUM_LOGITS, p, name="fc")(pool3)
        return {"pool3": pool3, "logits_unbiased": unbiased, "logits": logits}


@functools.lru_cache(maxsize=None)
def _template():
    """Shapes of the variables: {'params': ..., 'batch_stats': ...} of ShapeDtypeStructs."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0), x)


def init_variables(key) -> Dict[str, Any]:
    """Random variables of the network's shapes (Flax's initialisers; BatchNorm mean 0, variance 1):
    for benchmarks and tests, not for metrics."""
    x = jnp.zeros((1, 75, 75, 3), jnp.float32)  # the variables do not depend on the input size
    return jax.device_get(jax.jit(FIDInceptionV3().init)(key, x))


# ------------------------------------------------------------------------------------------------
# Weights: torch names -> Flax variables
# ------------------------------------------------------------------------------------------------


def _flatten(tree, prefix=()) -> Dict[Tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: Dict[Tuple[str, ...], Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _flax_path(name: str) -> Tuple[Tuple[str, ...], Any]:
    """torch state-dict name -> (Flax variable path, transform), or (None, None) to skip."""
    *mods, leaf = name.split(".")
    if not mods:
        return None, "unknown"
    if mods == ["fc"]:
        if leaf == "weight":
            return ("params", "fc", "kernel"), lambda w: w.T  # (1008, 2048) -> (2048, 1008)
        if leaf == "bias":
            return ("params", "fc", "bias"), None
    elif mods[-1] == "conv" and leaf == "weight":
        return ("params", *mods, "kernel"), lambda w: w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif mods[-1] == "bn":
        if leaf == "num_batches_tracked":
            return None, None  # a training counter; inference does not use it
        target = {"weight": ("params", "scale"), "bias": ("params", "bias"), "running_mean": ("batch_stats", "mean"),
                  "running_var": ("batch_stats", "var")}.get(leaf)
        if target is not None:
            return (target[0], *mods, target[1]), None
    return None, "unknown"


def variables_from_state_dict(state_dict: Dict[str, np.ndarray], where: str = "the weights") -> Dict[str, Any]:
    """Maps pytorch-fid's state dict (``fid_inception_v3().state_dict()`` names, NCHW) onto
    :class:`FIDInceptionV3`'s variables: ``X.conv.weight`` (O, I, kh, kw) → ``params/X/conv/kernel``
    (kh, kw, I, O); ``X.bn.weight/bias`` → ``params/X/bn/scale/bias``; ``X.bn.running_mean/var`` →
    ``batch_stats/X/bn/mean/var``; ``fc.weight`` (1008, 2048) → ``params/fc/kernel`` (2048, 1008);
    ``fc.bias``. ``num_batches_tracked`` is ignored.

    Raises:
      WeightsError: an unknown name, a missing one or a shape that differs (the message names
        the first few).
    """
    if not isinstance(state_dict, dict):
        raise WeightsError(f"{where}: not a state dict (a {type(state_dict).__name__})")
    template = {path: s.shape for path, s in _flatten(_template()).items()}
    flat, unknown = {}, []
    for name, value in state_dict.items():
        path, fn = _flax_path(str(name))
        if path is None:
            if fn == "unknown":
                unknown.append(str(name))
            continue
        if path not in template:
            unknown.append(str(name))
            continue
        arr = np.asarray(value)
        if not np.issubdtype(arr.dtype, np.floating):
            raise WeightsError(f"{where}: {name} has dtype {arr.dtype}, expected floating point")
        arr = arr.astype(np.float32)
        if fn is not None:
            if arr.ndim != len(template[path]):
                raise WeightsError(f"{where}: {name} has shape {arr.shape}; FID Inception expects rank {len(template[path])}")
            arr = fn(arr)
        if arr.shape != template[path]:
            raise WeightsError(f"{where}: {name} has shape {arr.shape} (as {'/'.join(path)}), FID Inception "
                               f"expects {template[path]}: not pytorch-fid's FID Inception weights")
        flat[path] = np.ascontiguousarray(arr)
    missing = [("/".join(p)) for p in template if p not in flat]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} name(s) FID Inception does not have ({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''})")
        if missing:
            parts.append(f"{len(missing)} variable(s) missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        raise WeightsError(f"{where}: not pytorch-fid's FID Inception weights: {'; '.join(parts)}")
    for path, arr in flat.items():
        if not np.all(np.isfinite(arr)):
            raise WeightsError(f"{where}: {'/'.join(path)} holds NaN or inf")
    return _unflatten(flat)


@dataclasses.dataclass(frozen=True)
class InceptionWeights:
    """The network's variables and the SHA-256 of the ``.pth`` they come from (the extractor version)."""

    variables: Dict[str, Any]
    sha256: str


def cache_dir() -> str:
    """``ddpm_jax.data.download.default_cache_dir()/inception``: the weights and their conversion."""
    from ddpm_jax.data.download import default_cache_dir  # noqa: PLC0415

    return os.path.join(default_cache_dir(), "inception")


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _download(target: str, timeout: float) -> None:
    from ddpm_jax.data.download import DownloadError, _get  # noqa: PLC0415
    from ddpm_jax.files import atomic_path  # noqa: PLC0415

    try:
        data = _get(FID_WEIGHTS_URL, timeout)
    except DownloadError as e:
        raise DownloadError(f"cannot download the FID Inception weights from {FID_WEIGHTS_URL} ({e}); without "
                            f"internet, fetch {FID_WEIGHTS_FILENAME} elsewhere and pass --inception_weights FILE") from None
    got = hashlib.sha256(data).hexdigest()
    if got != FID_WEIGHTS_SHA256:
        raise WeightsError(f"{FID_WEIGHTS_URL} fails its SHA-256 check (got {got[:16]}…, expected "
                           f"{FID_WEIGHTS_SHA256[:16]}…); nothing was written to {os.path.dirname(target)}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def _converted_path(sha256: str, directory: Optional[str]) -> str:
    return os.path.join(directory or cache_dir(), f"fid_inception_{sha256[:16]}.npz")


def _load_converted(path: str, sha256: str) -> Optional[Dict[str, Any]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["source_sha256"]) != sha256:
                return None
            flat = {tuple(k.split("/")): z[k] for k in z.files if k != "source_sha256"}
    except (OSError, ValueError, KeyError, EOFError):
        return None  # damaged or foreign: convert again
    template = {p: s.shape for p, s in _flatten(_template()).items()}
    if set(flat) != set(template) or any(flat[p].shape != template[p] for p in template):
        return None
    return _unflatten(flat)


def _save_converted(path: str, variables, sha256: str) -> None:
    from ddpm_jax.files import save_npz  # noqa: PLC0415

    arrays = {"/".join(p): np.asarray(v, np.float32) for p, v in _flatten(variables).items()}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_npz(path, compressed=False, source_sha256=np.asarray(sha256), **arrays)
    except OSError:
        pass  # a read-only cache: convert again next time


def load_weights(path: Optional[str] = None, *, expected_sha256: Optional[str] = FID_WEIGHTS_SHA256,
                 cache: Optional[str] = None, download: bool = True, timeout: float = 120.0) -> InceptionWeights:
    """pytorch-fid's FID Inception weights as :class:`FIDInceptionV3` variables.

    Args:
      path: the ``.pth`` file (``--inception_weights``). None: ``<cache>/pt_inception-2015-12-05-6726825d.pth``,
        downloaded from :data:`FID_WEIGHTS_URL` into the cache when missing (and ``download``).
      expected_sha256: the file must have this SHA-256 (default: pytorch-fid's file). None accepts
        any file with the right names and shapes; its own SHA-256 is then the extractor version,
        so its statistics are never compared with those of other weights.
      cache: the cache directory (default :func:`cache_dir`); the converted ``.npz`` goes there,
        named by the file's SHA-256 (a cache that cannot be written is skipped).

    Raises:
      FileNotFoundError: no file at ``path`` (or no cached file and ``download`` is False).
      WeightsError: a SHA-256 other than ``expected_sha256``, names or shapes that are not FID
        Inception's.
      ddpm_jax.torch_checkpoint.CheckpointFormatError / UnsafePickleError: not a readable state
        dict, or a pickle that would execute code (nothing is executed).
      ddpm_jax.data.download.DownloadError: the download failed (a FileNotFoundError subclass).
    """
    from ddpm_jax import torch_checkpoint  # noqa: PLC0415

    directory = cache or cache_dir()
    if path is None:
        path = os.path.join(directory, FID_WEIGHTS_FILENAME)
        if not os.path.isfile(path) or _sha256_file(path) != FID_WEIGHTS_SHA256:
            if not download:
                raise FileNotFoundError(f"the FID Inception weights are not in the cache ({path}); pass --inception_weights FILE")
            _download(path, timeout)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights file {path} does not exist")
    sha = _sha256_file(path)
    if expected_sha256 is not None and sha != expected_sha256:
        raise WeightsError(f"Inception weights {path} have SHA-256 {sha[:16]}…, not that of pytorch-fid's "
                           f"{FID_WEIGHTS_FILENAME} ({expected_sha256[:16]}…): a different or damaged file")
    converted = _converted_path(sha, directory)
    variables = _load_converted(converted, sha) if os.path.isfile(converted) else None
    if variables is None:
        variables = variables_from_state_dict(torch_checkpoint.load_state_dict(path), where=path)
        _save_converted(converted, variables, sha)
    return InceptionWeights(variables, sha)


# ------------------------------------------------------------------------------------------------
# Preprocessing and batched extraction
# ------------------------------------------------------------------------------------------------


def check_images(images, where: str = "images") -> np.ndarray:
    """Validates images for :func:`extract`: (N, H, W, C) with C ∈ {1, 3} (or (N, H, W)), uint8
    0..255 or floats in [0, 1] (a float32 rounding of 1e-6 outside is tolerated), finite.

    Returns the array (not copied, not converted; (N, H, W) gains a channel axis).
    Raises ValueError / TypeError naming what is wrong, in one line.
    """
    x = np.asarray(images) if not hasattr(images, "dtype") else images
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or min(x.shape[1:3]) < 1:
        raise ValueError(f"{where}: expected (N, H, W, C) images with C = 1 or 3, got shape {tuple(np.shape(images))}")
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{where}: expected uint8 or float images in [0, 1], got dtype {x.dtype}")
    if x.shape[0]:
        lo, hi = float(np.min(x)), float(np.max(x))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"{where}: images contain NaN or inf")
        if lo < -1e-6 or hi > 1.0 + 1e-6:
            raise ValueError(f"{where}: Inception features need images in [0, 1], these span [{lo:.4g}, {hi:.4g}] "
                             "(map [-1, 1] data with ddpm_jax.data.unscale_images, clipping samples to the range)")
    return x


def preprocess(x):
    """pytorch-fid's input pipeline: (B, H, W, C) floats in [0, 1], C ∈ {1, 3} → (B, 299, 299, 3)
    in [−1, 1]: bilinear resize to 299 (half-pixel centres, no antialiasing), 2x − 1, one channel
    repeated to three. Jit-safe; an input of 299 × 299 is not resampled."""
    x = jnp.asarray(x, jnp.float32)
    b, h, w, ch = x.shape
    if (h, w) != (INPUT_SIZE, INPUT_SIZE):
        x = jax.image.resize(x, (b, INPUT_SIZE, INPUT_SIZE, ch), method="linear", antialias=False)
    x = 2.0 * x - 1.0
    if ch == 1:
        x = jnp.broadcast_to(x, (b, INPUT_SIZE, INPUT_SIZE, 3))
    return x


@functools.partial(jax.jit, static_argnames=("precision", "outputs"))
def _forward(variables, x, precision: str, outputs: Tuple[str, ...]):
    out = FIDInceptionV3(precision=precision).apply(variables, x)
    return {k: out[k] for k in outputs}


@jax.jit
def _preprocess_batch(x):
    if x.dtype == jnp.uint8:
        x = x.astype(jnp.float32) / 255.0
    return preprocess(x)


def _placement(batch_size: int):
    """(batch sharding or None, replicated sharding or None) over this process's devices."""
    from ddpm_jax import sharding  # noqa: PLC0415

    sh = sharding.batch_sharding(batch_size)
    if sh is None:
        return None, None
    return sh, jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec())


def _batch_size_for_devices(batch_size: int, n: int) -> int:
    devices = len(jax.local_devices())
    bs = max(1, min(int(batch_size), n))
    return -(-bs // devices) * devices if jax.process_count() == 1 else bs


def extract(images, weights, batch_size: int = 200, *, outputs: Sequence[str] = ("pool3", "logits_unbiased"),
            precision: str = "highest", progress: bool = False, desc: str = "Inception") -> Dict[str, np.ndarray]:
    """Inception outputs of ``images``, batched and jit-compiled, each batch split over this
    process's devices.

    Args:
      images: (N, H, W, C) uint8 or floats in [0, 1], C ∈ {1, 3} (:func:`check_images`); any H, W
        (resized to 299 as pytorch-fid does). A NumPy array or memmap: converted a batch at a time.
      weights: :class:`InceptionWeights` or a Flax variables dict.
      batch_size: images per compiled call (rounded up to a multiple of the local device count;
        the last batch is padded, so every batch compiles once). Device memory is O(batch_size).
      outputs: any of 'pool3' (N, 2048), 'logits_unbiased' (N, 1008), 'logits' (N, 1008).
      precision: 'highest' (full float32) or 'default' (:class:`FIDInceptionV3`).
      progress: show a tqdm progress bar.

    Returns:
      dict output name -> (N, dim) float32 NumPy array.
    """
    outputs = tuple(outputs)
    bad = [o for o in outputs if o not in ("pool3", "logits_unbiased", "logits")]
    if bad or not outputs:
        raise ValueError(f"outputs must be among 'pool3', 'logits_unbiased', 'logits', got {outputs}")
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    x = check_images(images)
    variables = weights.variables if isinstance(weights, InceptionWeights) else weights
    n = int(x.shape[0])
    dims = {"pool3": FEATURE_DIM, "logits_unbiased": NUM_LOGITS, "logits": NUM_LOGITS}
    result = {o: np.empty((n, dims[o]), np.float32) for o in outputs}
    if n == 0:
        return result
    bs = _batch_size_for_devices(batch_size, n)
    batch_sh, repl = _placement(bs)
    variables = jax.device_put(variables, repl) if repl is not None else jax.device_put(variables)

    from tqdm.auto import tqdm  # noqa: PLC0415

    def launch(start):
        xb = np.asarray(x[start:start + bs])
        m = xb.shape[0]
        if m < bs:
            xb = np.concatenate([xb, np.zeros((bs - m,) + xb.shape[1:], xb.dtype)])
        xb = jax.device_put(xb, batch_sh) if batch_sh is not None else jnp.asarray(xb)
        return start, m, _forward(variables, _preprocess_batch(xb), precision, outputs)

    pending = None
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for start in list(range(0, n, bs)) + [None]:
            current = launch(start) if start is not None else None  # dispatch the next batch first
            if pending is not None:
                s, m, out = pending
                for o in outputs:
                    result[o][s:s + m] = np.asarray(out[o])[:m]
                bar.update(m)
            pending = current
    return result
