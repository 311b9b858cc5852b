"""The backend registry: the one place a backend's name becomes a module.

einops' ``_backends.py`` is the model: a small table of backends, each imported lazily, behind
one interface, so that the rest of the library never names a framework. Here a *training
backend* is a subpackage ``bnref.<name>`` (``bnref.torch``, ``bnref.jax``) whose module
``bnref.<name>.backend`` implements :data:`INTERFACE`; everything above the backends (the CLI
``bnref.train``, ``bnref.bench``, ``bnref.parity``, ``bnref.diagnose``, ``bnref.config``) asks
this module for a backend by name and never imports ``bnref.<name>`` itself.

What the registry knows *without* importing a framework is in its :class:`Backend` entry: what
must happen before the framework starts (XLA's host devices), which multi-process runtime the
backend has, and the implementations it brings to the parity matrix. Everything else is
behind :meth:`Backend.load`.

Adding a backend (as the Flax NNX one was) is one subpackage ``bnref/<name>/`` with a ``backend``
module implementing :data:`INTERFACE`, plus one entry in :data:`REGISTRY`;
``tests/test_architecture.py`` checks that every registered backend implements the interface.

A leaf of bnref's layers: no framework import (``import bnref.backends`` imports neither torch
nor jax), nothing above it.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Dict, Mapping, Optional, Tuple

__all__ = ["INTERFACE", "REGISTRY", "NAMES", "Backend", "get", "load", "parity_implementations",
           "parity_runner", "provide_host_devices"]

#: What ``bnref.<name>.backend`` defines (each a function unless said otherwise), and what for:
INTERFACE: Mapping[str, str] = {
    "resolve_device": "resolve_device(name) -> the framework's device for 'auto', 'cpu', 'cuda', 'gpu', 'cuda:1'; "
                      "ValueError for one that is not there",
    "device_name": "device_name(device) -> str, as the metrics and the run directory name it",
    "prepare": "prepare(config) -> str: join the processes and check the devices a run needs (ValueError before any "
               "data loads), returning the device description ('cpu', '2 x cpu')",
    "check_checkpoint": "check_checkpoint(path, config, run_id) -> int: the epoch a checkpoint can resume config's "
                        "run from; ValueError naming the file for another run's, another backend's, a corrupt one",
    "fit": "fit(config, data, on_epoch, run=None) -> list of per-epoch metrics (bnref.schedule.epoch_metrics' keys)",
    "train_steps": "train_steps(...) -> iterator of Step: the training loop fit runs, one SGD step per item, in "
                   "bnref.schedule's example order (the signature takes the framework's model state)",
    "load_run": "load_run(config, checkpoint) -> (model, variables or None): a run's trained model, for diagnose; "
                "ValueError naming the file",
    "bench_args": "bench_args(argv) -> argparse.Namespace: the backend's benchmark options (exit 2 when bad)",
    "bench": "bench(args) -> dict: the benchmark's measurements (ratios measured side by side)",
}


@dataclass(frozen=True)
class Backend:
    """A registered training backend: what is known about it before its framework is imported.

    ``host_devices``: replicas are devices of this process, which on a CPU are XLA host devices
    that must be asked for before JAX starts (:meth:`before_start`).
    ``processes``: the backend's own multi-process runtime: ``"torchrun"`` (a process may be
    launched by torchrun and is then one replica), ``"coordinator"`` (``--coordinator`` /
    ``--num-processes`` / ``--process-id``, one command per process), or None.
    ``parity``: implementation name -> (runner in ``<package>._runners``, channels_last), the
    cells it brings to ``python -m bnref.parity``'s matrix.
    ``packages``: the Python packages it trains with, whose versions a run directory records.
    ``fused_steps``: it can run several training steps in one compiled call
    (``TrainConfig.steps_per_call``).
    ``compiles_steps``: its eager training step can be compiled on request (``TrainConfig.compile``:
    torch.compile); a backend whose steps are always compiled (JAX's jit) has False.
    ``builds_on``: the backends whose packages this one imports (the only imports across
    backends; ``tests/test_architecture.py`` checks it): Flax NNX is another face of the JAX
    backend's functional core, training loop and kernels, not a second copy of them.
    """

    name: str
    package: str
    title: str  # how messages name it
    host_devices: bool = False
    processes: Optional[str] = None
    parity: Mapping[str, Tuple[str, bool]] = field(default_factory=dict)
    packages: Tuple[str, ...] = ()
    fused_steps: bool = False
    compiles_steps: bool = False
    builds_on: Tuple[str, ...] = ()

    def load(self) -> ModuleType:
        """``<package>.backend``, imported now (its framework with it) and checked against
        :data:`INTERFACE`."""
        module = importlib.import_module(f"{self.package}.backend")
        missing = [name for name in INTERFACE if not callable(getattr(module, name, None))]
        if missing:
            raise TypeError(f"backend {self.name!r} ({module.__name__}) does not implement {', '.join(missing)}")
        return module

    def runners(self) -> ModuleType:
        """``<package>._runners``: the parity helper's runners for this backend's implementations."""
        return importlib.import_module(f"{self.package}._runners")

    def before_start(self, config) -> None:
        """What must happen before the framework starts in this process, for ``config`` (a
        ``bnref.config.TrainConfig``): the host devices of this process's replicas."""
        if self.host_devices and config.replicas > 1:
            provide_host_devices(config.replicas // config.num_processes)  # on a CPU: this process's share


#: name -> entry, in the order reports list them (the parity matrix's columns, ``bench --backend all``)
REGISTRY: Dict[str, Backend] = {
    "torch": Backend("torch", "bnref.torch", "PyTorch", processes="torchrun", packages=("torch",), compiles_steps=True,
                     parity={"bnref.torch": ("run_functional", False), "torch.nn": ("run_builtin", False)}),
    "jax": Backend("jax", "bnref.jax", "JAX", host_devices=True, processes="coordinator",
                   packages=("jax", "jaxlib", "flax", "optax"), fused_steps=True,
                   parity={"bnref.jax": ("run_functional", True), "flax.linen": ("run_builtin", True)}),
    "nnx": Backend("nnx", "bnref.nnx", "Flax NNX", host_devices=True, processes="coordinator",
                   packages=("jax", "jaxlib", "flax", "optax"), fused_steps=True, builds_on=("jax",),
                   parity={"bnref.nnx": ("run_layer", True), "flax.nnx": ("run_builtin", True)}),
}  # fmt: skip
#: the names, sorted: the choices of ``--backend``
NAMES: Tuple[str, ...] = tuple(sorted(REGISTRY))


def get(name: str) -> Backend:
    """The registry entry of ``name``; ``ValueError`` naming the choices for an unknown one."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"backend must be one of {NAMES}, got {name!r}") from None


def load(name: str) -> ModuleType:
    """The backend module of ``name`` (see :meth:`Backend.load`)."""
    return get(name).load()


def parity_implementations() -> Dict[str, Tuple[str, str, bool]]:
    """Every backend's parity implementations: name -> (backend, runner name, channels_last),
    in the registry's order."""
    return {impl: (b.name, runner, last) for b in REGISTRY.values() for impl, (runner, last) in b.parity.items()}


def parity_runner(impl: str, runner: Optional[str] = None):
    """The runner function of parity implementation ``impl`` (its matrix runner, or the one
    named ``runner`` in the same backend's ``_runners``)."""
    backend, name, _ = parity_implementations()[impl]
    return getattr(REGISTRY[backend].runners(), runner or name)


def provide_host_devices(count: int) -> None:
    """Ask XLA for ``count`` CPU devices (``--xla_force_host_platform_device_count``), which only
    works before JAX initializes: a no-op once it has (``replica_devices`` then says so)."""
    if "jax" in sys.modules:
        return
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])
