"""The compiled training step of the torch backend (``--compile``): torch.compile (inductor) of
one SGD step, and on CUDA CUDA graphs, for ``bnref.torch.train.fit`` and the benchmark.

Owns how a step is compiled: :func:`compile_strategy` (the device type -> mode seam: inductor's
default mode on the CPU, ``mode="reduce-overhead"`` (CUDA graphs) on CUDA), :class:`StaticBatch`
(the fixed input buffers every batch is gathered into, so a CUDA graph replays on the same
addresses), :class:`CompiledStep` (the step itself, and its warm-up, which compiles and is then
undone) and :func:`check_compile_support` (a one-line ``ValueError`` where torch.compile cannot
run, before any work). The eager step and the forward it compiles, :func:`bnref.torch.train.forward_loss`,
are ``bnref.torch.train``'s.

What is compiled, and what is not:

- the forward, the loss and the step's metric (the number of correct predictions): one graph,
  ``fullgraph=True`` and ``dynamic=False``. Its backward is AOTAutograd's, compiled with it. BN
  runs bnref's composite path there (``bnref.torch._core``: a custom autograd Function cannot be
  traced), the same math as the eager fast path, so compiled and eager agree to float
  reassociation (measured on LeNet-BN, 4 steps at lr 1.0: losses within 3e-7, weights 1.2e-6,
  running means 2e-6). The running statistics are buffers written in place in that graph, once
  per step; ``num_batches_tracked`` is counted there too.
- the SGD update ``p -= lr * grad``: a second graph (:func:`_sgd_update`, plain SGD's update;
  why not ``optimizer.step`` compiled: :class:`CompiledStep`); ``zero_grad`` and
  ``loss.backward()`` are the calls between them.
- the gather of a batch from the on-device dataset: plain ``index_select`` into
  :class:`StaticBatch`'s buffers, outside the graphs, so that the graphs' inputs are always the
  same tensors (no guard on a new tensor, and on CUDA no copy of the whole dataset per replay).

Shapes are static: ``bnref.schedule.batch_slices`` gives full batches only (or one batch of the
whole, smaller, training set), so every step of a run has the same batch size and nothing is
compiled after the warm-up (``tests/test_torch_compile.py`` counts dynamo's graphs over two
epochs). The model's mode is set (``model.train()``) before every call, outside the graph; dynamo
guards on it, so a model put into eval mode in between (evaluation) is back in train mode for the
next step, and evaluation itself runs eagerly (its last batch of 10000 % 1024 test examples would
be a second shape, and it is outside the timed loop).
"""

from __future__ import annotations

import dataclasses
import time
import types
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

__all__ = ["Strategy", "compile_strategy", "check_compile_support", "StaticBatch", "CompiledStep", "plain_sgd_lr",
           "snapshot", "restore", "synchronize"]


@dataclasses.dataclass(frozen=True)
class Strategy:
    """How the step is compiled on one device type.

    ``mode``: ``torch.compile``'s mode. ``cudagraphs``: the mode records CUDA graphs, whose
    outputs the next replay overwrites (so the step's loss and count are cloned out, and every
    step is marked as a new one with ``torch.compiler.cudagraph_mark_step_begin``).
    ``static_inputs``: mark :class:`StaticBatch`'s buffers, the parameters and the model's buffers
    as static addresses, so the CUDA graphs read (and write) them where they are instead of
    copying them in. ``warmup_calls``: calls that compile
    and record everything (inductor compiles on the first; CUDA graph trees run eagerly once,
    record on the second, replay from the third)."""

    mode: str
    cudagraphs: bool
    static_inputs: bool
    warmup_calls: int


_STRATEGIES: Dict[str, Strategy] = {
    "cpu": Strategy(mode="default", cudagraphs=False, static_inputs=False, warmup_calls=1),
    "cuda": Strategy(mode="reduce-overhead", cudagraphs=True, static_inputs=True, warmup_calls=3),
}


def compile_strategy(device_type: str) -> Strategy:
    """The :class:`Strategy` for ``device_type`` (``"cpu"``: inductor, default mode; ``"cuda"``:
    ``reduce-overhead``, i.e. inductor plus CUDA graphs); ``ValueError`` for any other."""
    try:
        return _STRATEGIES[device_type]
    except (KeyError, TypeError):
        raise ValueError(f"--compile: no compile strategy for device type {device_type!r}; "
                         f"one of {sorted(_STRATEGIES)}") from None  # fmt: skip


#: the oldest torch whose torch.compile this module is written for (torch.compiler.is_compiling,
#: torch.compiler.cudagraph_mark_step_begin, mark_static_address)
MIN_TORCH = (2, 2)


def _version_tuple(version: str) -> Tuple[int, int]:
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return 0, 0


def check_compile_support(device_type: str, torch_module=torch) -> None:
    """Raise a one-line ``ValueError`` where ``--compile`` cannot run on ``device_type``, before any
    work: a torch without ``torch.compile`` (or older than :data:`MIN_TORCH`), no strategy for the
    device type, no C++ compiler for inductor's CPU kernels, no Triton for its CUDA kernels.
    ``torch_module``: the torch to check (a test passes a stand-in)."""
    version = getattr(torch_module, "__version__", "?")
    if not callable(getattr(torch_module, "compile", None)) or _version_tuple(version) < MIN_TORCH:
        raise ValueError(f"--compile needs torch >= {'.'.join(map(str, MIN_TORCH))} (torch.compile); this is torch "
                         f"{version}: train without --compile, or upgrade torch")  # fmt: skip
    compile_strategy(device_type)
    _import_inductor()
    if device_type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 - whatever inductor's lookup raises, the cause is the same
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"--compile on the CPU needs a C++ compiler for inductor (set CXX): {first[:200]}") from None
    elif device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ValueError("--compile on CUDA needs Triton for inductor's kernels (pip install triton)")


def _import_inductor() -> None:
    """Import inductor now. Its first import warns (DeprecationWarning) that ``torch.jit.script_method``
    is deprecated, from torch's own ``torch.utils.mkldnn``: not bnref's use, nothing a caller can
    change, and an error under ``-W error`` (the test suite's setting), so exactly that warning is
    ignored for this import."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning)
        import torch._inductor.compile_fx  # noqa: F401


class StaticBatch:
    """Two fixed buffers, ``X`` (B, *features) and ``y`` (B,), that :meth:`load` gathers each
    batch into: the compiled graphs always read the same tensors, so a CUDA graph replays
    without copying its input (with ``mark_static=True`` their addresses are marked static for
    dynamo), and the gather is one ``index_select`` per tensor, as ``X[idx]`` costs eagerly."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, size: int, *, mark_static: bool = False):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"StaticBatch: size must be an int >= 1, got {size!r}")
        self.size = size
        self.X = torch.empty((size, *X.shape[1:]), dtype=X.dtype, device=X.device)  # (B, 1, 28, 28)
        self.y = torch.empty((size,), dtype=y.dtype, device=y.device)  # (B,)
        if mark_static:
            torch._dynamo.mark_static_address(self.X)
            torch._dynamo.mark_static_address(self.y)

    def load(self, X: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``X[idx]`` and ``y[idx]``, written into the buffers (returned). ``idx`` must hold exactly
        ``size`` indices and ``X``/``y`` match the buffers' features, dtype and device: a compiled
        step has one static shape, and a batch of another would recompile (``ValueError``)."""
        if idx.dim() != 1 or idx.shape[0] != self.size:
            raise ValueError(f"StaticBatch: a batch of {tuple(idx.shape)} indices; this compiled step takes "
                             f"exactly {self.size}")  # fmt: skip
        for name, src, buf in (("X", X, self.X), ("y", y, self.y)):
            if src.shape[1:] != buf.shape[1:] or src.dtype != buf.dtype or src.device != buf.device:
                raise ValueError(f"StaticBatch: {name} is {tuple(src.shape[1:])} {src.dtype} on {src.device}; the "
                                 f"buffers are {tuple(buf.shape[1:])} {buf.dtype} on {buf.device}")  # fmt: skip
        torch.index_select(X, 0, idx, out=self.X)
        torch.index_select(y, 0, idx, out=self.y)
        return self.X, self.y


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Copies of ``model``'s parameters and buffers and of ``optimizer``'s per-parameter state,
    for :func:`restore`."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = {p: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in s.items()}
           for p, s in optimizer.state.items()}  # fmt: skip
    return state, opt


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, saved) -> None:
    """Put :func:`snapshot`'s values back IN PLACE (the same tensor objects, so compiled graphs
    and CUDA graphs that hold them stay valid), drop optimizer state made since, clear the grads."""
    state, opt = saved
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(state[k])
    for p in list(optimizer.state):
        if p not in opt:
            del optimizer.state[p]
            continue
        mine = optimizer.state[p]
        for k in list(mine):
            if k not in opt[p]:
                del mine[k]
            elif torch.is_tensor(mine[k]) and torch.is_tensor(opt[p][k]) and mine[k].shape == opt[p][k].shape:
                with torch.no_grad():
                    mine[k].copy_(opt[p][k])
            else:
                mine[k] = opt[p][k]
        for k in opt[p].keys() - mine.keys():
            mine[k] = opt[p][k]
    optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA); nothing on the CPU, which runs it as called."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_sgd_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of ``optimizer`` if it is plain SGD (``torch.optim.SGD``, one parameter
    group, no momentum, weight decay, nesterov, maximize: fit's optimizer), whose step is
    ``p -= lr * grad``; ``ValueError`` naming what differs otherwise."""
    if type(optimizer) is not torch.optim.SGD:
        raise ValueError(f"the compiled step updates with plain SGD (fit's optimizer); got {type(optimizer).__name__}")
    if len(optimizer.param_groups) != 1:
        raise ValueError(f"the compiled step updates one SGD parameter group; got {len(optimizer.param_groups)}")
    group = optimizer.param_groups[0]
    plain = {"momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False, "maximize": False}
    differs = {k: group.get(k) for k, v in plain.items() if group.get(k, v) != v}
    if differs:
        raise ValueError(f"the compiled step updates with plain SGD (lr only); this one has {differs}")
    return float(group["lr"])


def _sgd_update(params, grads, lr: float) -> None:
    """``p -= lr * g`` for each parameter: ``torch.optim.SGD(lr).step()``'s update (no momentum,
    no weight decay), as one compiled graph whose inputs are the tensors themselves."""
    with torch.no_grad():
        torch._foreach_add_(params, grads, alpha=-lr)


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own. Dynamo keeps its compiled graphs, and its limit of
    8 of them per function (``torch._dynamo.config.recompile_limit``), on the code object: shared,
    every CompiledStep of a process (each fit, each benchmark variant, each test) would add its
    graphs to one list and, past the limit, run that function EAGERLY with only a log line (seen:
    ``optimizer.step`` compiled by 9 steps in one process, the 9th ran eagerly). With its own, each
    step's functions have exactly the graphs that step compiled."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class CompiledStep:
    """``step(X, y, idx) -> (loss, correct)``: one SGD step of ``model`` on the batch
    ``(X[idx], y[idx])``, compiled per :func:`compile_strategy` of ``device``'s type; the same
    contract as ``bnref.torch.train.EagerStep`` (0-d device tensors, detached, unread).

    ``forward_loss(model, X, y) -> (loss, correct)`` is the forward compiled (the precision's
    autocast inside it). The update is plain SGD's, ``p -= lr * grad`` (:func:`_sgd_update`,
    compiled apart; ``optimizer`` must be plain SGD, :func:`plain_sgd_lr`), rather than
    ``optimizer.step`` compiled: dynamo guards that on the optimizer object, in a cache shared by
    every SGD of the process (see :func:`_own_code`). The optimizer is still the run's: its
    ``lr`` is read at every step and its (empty) state is what checkpoints save. The batch size
    is fixed by the first call (:class:`StaticBatch`). :meth:`warm_up` compiles ahead of the timed
    steps and puts the model back as it was, so ``compile_seconds`` is reported apart and the
    training is the same as without it."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                 forward_loss: Callable, precision: str):  # fmt: skip
        check_compile_support(device.type)
        plain_sgd_lr(optimizer)
        self.model, self.optimizer, self.device, self.precision = model, optimizer, device, precision
        self.strategy = compile_strategy(device.type)
        self.batch: Optional[StaticBatch] = None
        self.compile_seconds = 0.0
        self.params = [p for p in optimizer.param_groups[0]["params"]]
        if self.strategy.static_inputs:
            # Written in place by the graphs (SGD's update; BN's running statistics and count):
            # marked static, a CUDA graph keeps reading and writing them where they are.
            for t in (*self.params, *model.buffers()):
                torch._dynamo.mark_static_address(t)

        def forward(X, y):
            return forward_loss(model, X, y)

        options = dict(mode=self.strategy.mode, dynamic=False, fullgraph=True)
        self._forward = torch.compile(_own_code(forward), **options)
        self._sgd = torch.compile(_own_code(_sgd_update), **options)

    def __call__(self, X: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.batch is None:
            self.batch = StaticBatch(X, y, int(idx.shape[0]), mark_static=self.strategy.static_inputs)
        Xb, yb = self.batch.load(X, y, idx)  # (B, 1, 28, 28), (B,): the graphs' fixed inputs
        self.model.train()  # outside the graph: dynamo guards on the mode, and this keeps it train
        if self.strategy.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss, correct = self._forward(Xb, yb)
        out = loss.detach()
        if self.strategy.cudagraphs:  # CUDA graph outputs: the next step's replay overwrites them
            out, correct = out.clone(), correct.clone()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.params if p.grad is not None]  # (all of LeNet's, every step)
        self._sgd(params, [p.grad for p in params], float(self.optimizer.param_groups[0]["lr"]))
        return out, correct

    def warm_up(self, X: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> float:
        """Compile (and on CUDA record the graphs) with ``strategy.warmup_calls`` steps on the batch
        ``idx``, then restore the model and optimizer in place: seconds taken (kept as
        ``compile_seconds``). Training afterwards is as if it had not happened."""
        saved = snapshot(self.model, self.optimizer)
        synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(self.strategy.warmup_calls):
            self(X, y, idx)
        synchronize(self.device)
        self.compile_seconds = time.perf_counter() - t0
        restore(self.model, self.optimizer, saved)
        return self.compile_seconds
