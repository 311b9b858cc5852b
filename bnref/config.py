"""What a training run is: :class:`TrainConfig` (every choice a run depends on, validated when
it is made) and the choices it takes.

A leaf of bnref's layers: it imports no framework and nothing above it (the backend registry
``bnref.backends`` is beside it) (the backends, run
directories, experiments, diagnose and the CLI ``bnref.train`` import it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from bnref import _io, backends, spec
from bnref._cli import MAX_SEED

__all__ = ["BACKENDS", "BN_CHOICES", "PRECISE_VARIANTS", "PRECISIONS", "TIMING_KEYS", "TrainConfig"]

BACKENDS = backends.NAMES  # the registry's, bnref.backends
BN_CHOICES = ("bnref", "builtin", "none")
#: the metrics that measure time, not training: two runs of the same training differ only in these
TIMING_KEYS = ("examples_per_sec", "compile_seconds", "wall_seconds", "precise_seconds")
PRECISE_VARIANTS = spec.PRECISE_VARIANTS  # the spec's names, as bnref.torch.precise / bnref.jax.precise
PRECISIONS = spec.PRECISIONS  # the compute dtypes a run can train in (BN statistics stay float32: bnref.spec)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on.

    ``bn``: ``"bnref"`` (the from-scratch layer), ``"builtin"`` (torch.nn.BatchNorm /
    flax.linen.BatchNorm: the layer d2l's "concise implementation" uses) or ``"none"`` (plain LeNet).
    ``convention``: a ``bnref.spec.PRESETS`` name for the BN layers' running statistics.
    ``train_limit`` / ``test_limit``: use only the first N examples (quick runs, tests).
    ``plot`` / ``json``: files rewritten (atomically) after every epoch, so a crash or Ctrl-C
    keeps the epochs already done.
    ``replicas`` / ``sync_bn``: data parallelism (see the backends' ``fit``).
    ``precise_bn``: after every epoch, recompute the BN statistics with the weights fixed over
    ``precise_batches`` training batches (default: all), ``precise_variant`` ("population" or
    "batch_average", see ``bnref.spec``), and evaluate with them; the EMA is evaluated too and
    training goes on from the EMA, so the run trains exactly as without the flag.
    ``steps_per_call``: training steps per compiled call (a backend with fused steps, JAX's
    ``lax.scan``; default: the backend's choice for the device); the same numbers at any value.
    ``compile``: compile the training step (a backend with ``compiles_steps``: torch.compile,
    on CUDA with CUDA graphs); float reassociation only, running statistics updated once per step.
    ``precision``: the compute dtype of convolutions and matmuls (``PRECISIONS``); "bfloat16"
    is torch.autocast / Flax ``dtype=bfloat16``, with parameters, BN statistics, running averages
    and the optimizer state in float32 (``bnref.spec.BF16_TOLERANCE``).
    ``tf32``: let float32 matmuls and convolutions use TF32 on GPUs that have it (faster, ~1e-3
    relative error); off by default, as parity and the trajectory need it off.
    ``coordinator`` / ``num_processes`` / ``process_id``: this process's part of a multi-process
    JAX run (``jax.distributed.initialize``'s arguments); ``replicas`` then counts the devices of
    all processes (default: one per process).
    """

    backend: str = "jax"
    epochs: int = 10
    lr: float = 1.0
    batch_size: int = 256
    seed: int = 0
    device: str = "auto"
    bn: str = "bnref"
    convention: str = "d2l"
    data_dir: Optional[str] = None
    download: bool = True
    train_limit: Optional[int] = None
    test_limit: Optional[int] = None
    progress: bool = True
    plot: Optional[str] = None
    json: Optional[str] = None
    replicas: int = 1
    sync_bn: Optional[bool] = None
    coordinator: Optional[str] = None
    num_processes: int = 1
    process_id: int = 0
    join_timeout_s: int = 120
    precise_bn: bool = False
    precise_batches: Optional[int] = None
    precise_variant: str = "population"
    steps_per_call: Optional[int] = None
    compile: bool = False
    precision: str = "float32"
    tf32: bool = False

    def __post_init__(self):
        backends.get(self.backend)  # raises ValueError naming the choices
        if self.bn not in BN_CHOICES:
            raise ValueError(f"bn must be one of {BN_CHOICES}, got {self.bn!r}")
        spec.preset(self.convention)  # raises ValueError naming the choices
        # A BatchNorm layer in training needs two values per channel: batches (and the training
        # set) of at least 2 examples, unless there is no BN at all.
        smallest = 1 if self.bn == "none" else 2
        for name, minimum in (("epochs", 1), ("batch_size", smallest), ("train_limit", smallest), ("test_limit", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                why = " (BatchNorm needs two values per channel in training)" if minimum == 2 else ""
                raise ValueError(f"{name} must be an int >= {minimum}{why}, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an int in [0, {MAX_SEED}], got {self.seed!r}")
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"replicas must be an int >= 1, got {self.replicas!r}")
        self._check_processes()
        self._check_precise()
        self._check_steps_per_call()
        self._check_speed()
        if self.sync_bn is None:  # synchronized BN by default whenever there are several replicas
            object.__setattr__(self, "sync_bn", self.replicas > 1)
        if self.batch_size % self.replicas:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by replicas {self.replicas}: "
                             "each replica takes an equal slice of every global batch")  # fmt: skip
        local = self.batch_size // self.replicas
        if self.bn != "none" and not self.sync_bn and local < 2:
            raise ValueError(f"each replica's slice of a batch is {local} example(s); unsynchronized BatchNorm "
                             "needs at least 2 (use --sync-bn or a larger --batch-size)")  # fmt: skip

    def _check_precise(self) -> None:
        k = self.precise_batches
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"precise_batches must be an int >= 1, got {k!r}")
        if self.precise_variant not in PRECISE_VARIANTS:
            raise ValueError(f"precise_variant must be one of {PRECISE_VARIANTS}, got {self.precise_variant!r}")
        if not self.precise_bn:
            if k is not None:
                raise ValueError("precise_batches needs precise_bn (--precise-bn)")
            return
        if self.bn == "none":
            raise ValueError("precise BN recomputes BatchNorm statistics; --bn none has none")

    def _check_steps_per_call(self) -> None:
        k = self.steps_per_call
        if k is None:
            return
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"steps_per_call must be an int >= 1, got {k!r}")
        if not backends.get(self.backend).fused_steps:
            fused = "/".join(b.title for b in backends.REGISTRY.values() if b.fused_steps)
            raise ValueError(f"steps_per_call runs several steps in one compiled call ({fused}); the {self.backend} "
                             "backend takes one step per call")  # fmt: skip
        if self.replicas > 1:
            raise ValueError("steps_per_call is for one device; data-parallel replicas take one step per call")

    def _check_speed(self) -> None:
        for name in ("compile", "tf32"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.replicas > 1 and (self.compile or self.precision != "float32"):
            what = "compile" if self.compile else f"precision {self.precision}"
            raise ValueError(f"{what} is for one device; data-parallel replicas train eagerly in float32")
        if self.compile and not backends.get(self.backend).compiles_steps:
            owners = "/".join(b.title for b in backends.REGISTRY.values() if b.compiles_steps)
            raise ValueError(f"compile is for {owners}'s eager step (torch.compile); the {self.backend} backend's "
                             "steps are always compiled (jit)")  # fmt: skip

    def _check_processes(self) -> None:
        n, pid = self.num_processes, self.process_id
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_processes must be an int >= 1, got {n!r}")
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < n:
            raise ValueError(f"process_id must be an int in [0, num_processes={n}), got {pid!r}")
        t = self.join_timeout_s
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"join_timeout_s must be an int >= 1 (seconds), got {t!r}")
        if n == 1:
            if self.coordinator is not None:
                raise ValueError("a coordinator address needs num_processes >= 2")
            return
        runtime = backends.get(self.backend).processes
        if runtime != "coordinator":
            also = " or under torchrun" if runtime == "torchrun" else ""
            owners = [b.title for b in backends.REGISTRY.values() if b.processes == "coordinator"]
            whose = f"the {owners[0]} backend's" if len(owners) == 1 else f"the {' and '.join(owners)} backends'"
            raise ValueError(f"num_processes is {whose} multi-process runtime; {self.backend} runs "
                             f"several processes with --replicas R{also}")  # fmt: skip
        host, _, port = (self.coordinator or "").rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"coordinator must be HOST:PORT (process 0's address), got {self.coordinator!r}")
        if self.replicas % n:
            raise ValueError(f"replicas {self.replicas} must be a multiple of num_processes {n}: every process "
                             "brings the same number of devices")  # fmt: skip

    def check_outputs(self) -> None:
        """Raise ``ValueError`` if ``plot`` or ``json`` cannot be written (see ``bnref._io``);
        run before any work, so that a bad path never costs a training run."""
        _io.check_output_paths({"--plot": self.plot, "--json": self.json}, figures=("--plot",))

    @property
    def bn_convention(self) -> spec.Convention:
        return spec.preset(self.convention)
