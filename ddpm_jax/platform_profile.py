"""The platform profile: everything that exists for XLA:CPU, chosen and applied in one place.

Every entry point calls :func:`setup` first thing (``--platform=auto|cpu|accelerator``):

==========================  =======================================  ===========================
                            'cpu'                                    'accelerator'
==========================  =======================================  ===========================
glibc malloc settings       re-executes with them (malloc_tuning)    no
devices                     one virtual CPU device per core that     as JAX finds them
                            divides the batch (cpu_devices), with
                            XLA:CPU's collective time-out raised
ScoreNet convolutions       ``conv_impl='phases'`` (im2col, phase-   stock ``nn.Conv`` /
                            split transposed convolutions)           ``nn.ConvTranspose``
ScoreNet GroupNorm + swish  the fused ``GroupNormSwish``             stock ``nn.GroupNorm``
dispatch                    at most one step ahead (DispatchWindow)  fully asynchronous
gradient reduction          one flat all-reduce under ``shard_map``  ``jax.jit`` with the batch's
                            (train_step.psum_flat)                   ``NamedSharding``; XLA's own
checkpoints                 synchronous (with several devices)       asynchronous
==========================  =======================================  ===========================

'auto' is 'cpu' exactly when JAX's backend will be the CPU: ``JAX_PLATFORMS`` names only ``cpu``,
or it is unset and no GPU or TPU plug-in is installed. Both profiles compute the same numbers up
to float rounding and the same parameter trees, so a checkpoint moves between them. The CPU
kernels and their measurements: docs/performance.md. A config's ``model.conv_impl`` other than
'auto' is used as given on either profile.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Iterable, Optional

__all__ = ["PROFILES", "Profile", "resolve", "setup", "current", "backend_will_be_cpu", "dispatch_window",
           "async_checkpoints"]

PROFILES = ("auto", "cpu", "accelerator")

#: Modules whose presence means JAX will pick an accelerator backend when JAX_PLATFORMS is unset.
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu",
                       "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")


@dataclasses.dataclass(frozen=True)
class Profile:
    """What a resolved profile sets (module docstring)."""

    name: str
    conv_impl: str
    fused_group_norm: bool
    tune_malloc: bool
    virtual_cpu_devices: bool
    dispatch_window: bool
    sync_checkpoints: bool
    flat_allreduce: bool


CPU = Profile("cpu", conv_impl="phases", fused_group_norm=True, tune_malloc=True, virtual_cpu_devices=True,
              dispatch_window=True, sync_checkpoints=True, flat_allreduce=True)
ACCELERATOR = Profile("accelerator", conv_impl="xla", fused_group_norm=False, tune_malloc=False,
                      virtual_cpu_devices=False, dispatch_window=False, sync_checkpoints=False, flat_allreduce=False)

_current: Optional[Profile] = None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken install
        return False


def backend_will_be_cpu() -> bool:
    """True when JAX will run on the CPU: ``JAX_PLATFORMS`` lists only 'cpu', or it is unset and
    no accelerator plug-in (``ACCELERATOR_PLUGINS``) is installed. Starts no backend."""
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return all(p == "cpu" for p in platforms)
    return not any(_installed(m) for m in ACCELERATOR_PLUGINS)


def resolve(name: str = "auto") -> Profile:
    """The :class:`Profile` for ``name`` ('auto', 'cpu' or 'accelerator'); ValueError otherwise."""
    if name not in PROFILES:
        raise ValueError(f"unknown platform {name!r}; expected one of {PROFILES}")
    if name == "auto":
        name = "cpu" if backend_will_be_cpu() else "accelerator"
    return CPU if name == "cpu" else ACCELERATOR


def setup(name: str = "auto", *, cpu_devices: int = 0, batch_sizes: Iterable[int] = (), set_devices: bool = True) -> Profile:
    """Resolves the profile and applies it to this process; call before any JAX computation.

    CPU profile: re-executes the process with the glibc malloc settings (``ddpm_jax.malloc_tuning``;
    the new process runs from the start again, so call this before anything that must not run
    twice) and, if ``set_devices``, sets the CPU device count (``ddpm_jax.cpu_devices``:
    ``cpu_devices`` if > 0, else one per core that divides every batch size). The accelerator
    profile changes nothing. Returns the profile, also available as :func:`current`.
    """
    global _current
    profile = resolve(name)
    if profile.tune_malloc:
        from ddpm_jax import malloc_tuning

        malloc_tuning.reexec_if_untuned()
    if profile.virtual_cpu_devices and set_devices:
        from ddpm_jax import cpu_devices as devices

        devices.configure(cpu_devices, list(batch_sizes))
    _current = profile
    return profile


def current() -> Profile:
    """The profile :func:`setup` applied in this process, else the one 'auto' resolves to."""
    return _current if _current is not None else resolve("auto")


def dispatch_window(profile: Optional[Profile] = None):
    """A ``cpu_devices.DispatchWindow`` for a step loop: waiting for the previous step under the
    CPU profile where several CPU devices share XLA:CPU's thread pool (the all-reduce deadlock it
    describes), never waiting otherwise."""
    from ddpm_jax import cpu_devices

    profile = profile or current()
    return cpu_devices.DispatchWindow(profile.dispatch_window and cpu_devices.shared_thread_pool())


def async_checkpoints(profile: Optional[Profile] = None) -> bool:
    """Whether checkpoints may be written in the background: not under the CPU profile where
    several CPU devices share XLA:CPU's thread pool (``ddpm_jax.checkpointing``), else yes."""
    from ddpm_jax import cpu_devices

    profile = profile or current()
    return not (profile.sync_checkpoints and cpu_devices.shared_thread_pool())
