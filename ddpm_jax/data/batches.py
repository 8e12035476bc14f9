"""Deterministic, resumable batches over in-memory arrays: a pure function of ``(seed, step)``.

Epoch ``e`` is the permutation drawn from ``np.random.default_rng([seed, e])``, so a run resumed at
global step ``s`` sees exactly the batches it would have seen without the interruption; the global
step is the only "data position" a checkpoint needs. Random horizontal flips are a pure function of
``(seed, step, position in the global batch)`` too. Every process computes the same global batch
indices and takes its contiguous slice (:class:`BatchIterator`).
"""

from __future__ import annotations

import functools
from typing import Iterator

import numpy as np

from ddpm_jax.data.splits import _check_count

__all__ = ["steps_per_epoch", "batch_indices", "flip_mask", "flip_images", "BatchIterator"]

def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Number of full batches per epoch (the remainder is dropped).

    Raises:
      ValueError: non-positive sizes, or ``global_batch > num_examples``.
    """
    num_examples = _check_count(num_examples, "num_examples", 1)
    global_batch = _check_count(global_batch, "train.batch_size", 1)
    if global_batch > num_examples:
        raise ValueError(
            f"train.batch_size={global_batch} exceeds the {num_examples} training examples"
        )
    return num_examples // global_batch


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    perm.setflags(write=False)  # shared through the cache
    return perm


def batch_indices(seed: int, step: int, num_examples: int, global_batch: int) -> np.ndarray:
    """Indices of the global batch at ``step``: a pure function of ``(seed, step)``.

    ``epoch = step // steps_per_epoch``; each epoch is the permutation
    ``np.random.default_rng([seed, epoch]).permutation(num_examples)`` (cached, so consecutive
    steps do not recompute it), and the batch is its ``step % steps_per_epoch``-th block of
    ``global_batch`` indices. Within an epoch no index repeats; the dropped remainder differs
    from epoch to epoch.

    Returns:
      (global_batch,) int64 array of indices into the ``num_examples`` examples.
    """
    seed = _check_count(seed, "seed", 0)
    step = _check_count(step, "step", 0)
    spe = steps_per_epoch(num_examples, global_batch)
    epoch, i = divmod(step, spe)
    perm = _epoch_permutation(seed, epoch, int(num_examples))
    return perm[i * global_batch : (i + 1) * global_batch].copy()


#: Entry of the flips' seed sequence that keeps it apart from the epoch permutations'.
_FLIP_STREAM = 0x666C6970


def flip_mask(seed: int, step: int, global_batch: int) -> np.ndarray:
    """Which examples of the global batch at ``step`` are flipped left-right: ``(global_batch,)``
    bool, ``np.random.default_rng([seed, step, _FLIP_STREAM]).random(global_batch) < 0.5``, a
    pure function of ``(seed, step, position in the global batch)`` (so a resumed run, and every
    process's slice of the batch, sees the same flips)."""
    seed = _check_count(seed, "seed", 0)
    step = _check_count(step, "step", 0)
    return np.random.default_rng([seed, step, _FLIP_STREAM]).random(global_batch) < 0.5


def flip_images(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``images`` ``(B, H, W, C)`` with those where ``mask`` ``(B,)`` is True mirrored along W
    (one vectorised ``np.where``); same dtype."""
    return np.where(np.asarray(mask, bool)[:, None, None, None], images[:, :, ::-1], images)


class BatchIterator:
    """Deterministic, resumable, process-sharded batches over an in-memory array.

    Iterating yields ``(step, local_batch)`` forever, starting at ``start_step``. ``local_batch``
    is ``images[idx]`` with ``idx`` this process's contiguous slice
    ``[process_index * lb : (process_index + 1) * lb]`` of :func:`batch_indices` (``lb =
    global_batch // process_count``): shape ``(lb,) + images.shape[1:]``, one NumPy fancy-indexing
    operation per batch. Resuming at step ``s`` (``start_step=s``) reproduces exactly the batches
    of an uninterrupted run.

    ``images`` may also be a tuple/list/dict of arrays with the same leading size (e.g. images and
    labels); ``local_batch`` then has the same structure.

    With ``random_flip=True`` each example is mirrored left-right where :func:`flip_mask` (over
    the global batch, this process's slice of it) says so; only rank-4 ``(N, H, W, C)`` arrays
    are flipped (labels pass through).
    """

    def __init__(
        self,
        images,
        global_batch: int,
        *,
        seed: int,
        start_step: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        random_flip: bool = False,
    ):
        self.arrays = images
        self.random_flip = bool(random_flip)
        leaves = _leaves(images)
        if not leaves:
            raise ValueError("BatchIterator needs at least one array")
        self.num_examples = int(leaves[0].shape[0])
        for leaf in leaves[1:]:
            if leaf.shape[0] != self.num_examples:
                raise ValueError(
                    f"BatchIterator arrays differ in leading size: {self.num_examples} vs "
                    f"{leaf.shape[0]}"
                )
        self.global_batch = _check_count(global_batch, "train.batch_size", 1)
        self.steps_per_epoch = steps_per_epoch(self.num_examples, self.global_batch)
        self.seed = _check_count(seed, "seed", 0)
        self.step = _check_count(start_step, "start_step", 0)
        process_count = _check_count(process_count, "process_count", 1)
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        if self.global_batch % process_count:
            raise ValueError(
                f"train.batch_size={self.global_batch} is not divisible by the {process_count} "
                f"processes"
            )
        self.process_index, self.process_count = int(process_index), process_count
        self.local_batch = self.global_batch // process_count

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self.step // self.steps_per_epoch

    def local_indices(self, step: int) -> np.ndarray:
        """(local_batch,) indices of this process's part of the global batch at ``step``."""
        idx = batch_indices(self.seed, step, self.num_examples, self.global_batch)
        lo = self.process_index * self.local_batch
        return idx[lo : lo + self.local_batch]

    def batch(self, step: int):
        """This process's batch at ``step`` (random access; does not move the iterator)."""
        idx = self.local_indices(step)
        if not self.random_flip:
            return _map(lambda a: a[idx], self.arrays)
        lo = self.process_index * self.local_batch
        mask = flip_mask(self.seed, step, self.global_batch)[lo : lo + self.local_batch]
        return _map(lambda a: flip_images(a[idx], mask) if a.ndim == 4 else a[idx], self.arrays)

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self):
        step = self.step
        out = (step, self.batch(step))
        self.step = step + 1
        return out

    def take(self, num_steps: int) -> Iterator:
        """Yields the next ``num_steps`` ``(step, local_batch)`` pairs, advancing the iterator."""
        for _ in range(_check_count(num_steps, "num_steps", 0)):
            yield next(self)


def _leaves(tree) -> list:
    if isinstance(tree, dict):
        return [a for k in sorted(tree) for a in _leaves(tree[k])]
    if isinstance(tree, (tuple, list)):
        return [a for t in tree for a in _leaves(t)]
    return [tree]


def _map(fn, tree):
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map(fn, t) for t in tree)
    return fn(tree)
