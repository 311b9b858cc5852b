"""Train LeNet-BN with PyTorch: ``python -m bnref.train --backend torch``.

:func:`fit` is what ``bnref.training.train_and_evaluate`` calls; :func:`resolve_device`,
:func:`make_model`, :func:`load_tensors` and :func:`train_step` are the reusable pieces
(the cross-framework trajectory code and the benchmark call them too).

The hot loop does no per-example Python work: the whole dataset is put on the training
device once as float tensors ``(N, 1, 28, 28)`` scaled to [0, 1]; each epoch takes one
example-level permutation (``bnref.schedule.epoch_permutation``: NumPy, the same order as the
JAX backend's) and each batch is an index slice of it (``bnref.schedule.batch_slices``: full
batches only, and why). Loss and accuracy are accumulated on the device, so nothing waits for the
device inside an epoch (no ``.item()`` per step). Same seed, same device: same curve.

The step is :class:`EagerStep` by default; ``config.compile`` makes it
:class:`bnref.torch.compiled.CompiledStep` (torch.compile, on CUDA with CUDA graphs: that module
says what is compiled and why), compiled ahead of the first epoch (``compile_seconds``; the
epochs' ``examples_per_sec`` exclude it). ``config.precision == "bfloat16"`` runs the forward (and
evaluation) under ``torch.autocast(device_type, dtype=torch.bfloat16)`` (:func:`compute_context`):
convolutions and matmuls in bfloat16; parameters, gradients, SGD's state, BN's batch statistics
(bnref's layer reduces bfloat16 input in float32, ``bnref.torch._core.normalize_train``) and its
running averages stay float32, and the loss is taken on float32 logits. ``config.tf32`` sets
torch's TF32 switches for the run (:func:`float32_matmuls`), off unless asked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import nn

from bnref import spec
from bnref.torch import distributed
from bnref.torch.compiled import CompiledStep, check_compile_support, synchronize
from bnref.torch.models import LeNetBN
from bnref.schedule import batch_slices, check_finite_loss, epoch_metrics, epoch_permutation

__all__ = ["fit", "resolve_device", "device_name", "make_model", "load_tensors", "train_step", "train_steps", "run_steps",
           "evaluate", "compute_context", "forward_loss", "EagerStep", "make_step", "float32_matmuls"]

#: batch size for test-set evaluation (eval mode: the result does not depend on it)
EVAL_BATCH = 1024


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` (the first GPU when there is one, else the CPU), ``"cpu"``, ``"cuda"``/``"gpu"``
    (the current GPU) or an explicit ``"cuda:1"``; always with an index for CUDA (``cuda:0``).

    Raises ``ValueError`` for an unknown name or a GPU this machine does not have (a CPU-only
    build of torch, no GPU, or an index past the last one), before any work.
    """
    name = (name or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "gpu" or name.startswith("gpu:"):
        name = "cuda" + name[3:]
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda/gpu or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda/gpu or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {name!r} is not available: {why}")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if device.index is None else device.index
        if not 0 <= index < count:
            raise ValueError(f"device {name!r} is not available ({count} CUDA device(s))")
        device = torch.device("cuda", index)
    return device


def device_name(device: torch.device) -> str:
    """``cpu`` or ``cuda:N``: the wording of the per-epoch line and of ``config.json``."""
    return str(device)


def make_model(config) -> LeNetBN:
    """A freshly initialized LeNet-BN for ``config`` (``bn``, ``convention``, ``seed``), on the CPU.

    The initialization depends on ``config.seed`` only, and the global RNG state is left
    as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return LeNetBN(bn=config.bn, convention=config.bn_convention)


def load_tensors(images, labels, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(N, 28, 28)`` images and int labels -> float ``(N, 1, 28, 28)`` in [0, 1] and int64 ``(N,)``, on ``device``."""
    x = torch.as_tensor(images).to(device).unsqueeze(1).float().div_(255.0)  # (N, 1, 28, 28)
    y = torch.as_tensor(labels).to(device=device, dtype=torch.int64)  # (N,)
    return x, y


def _check_precision(precision: str) -> str:
    if precision not in spec.PRECISIONS:
        raise ValueError(f"precision must be one of {spec.PRECISIONS}, got {precision!r}")
    return precision


def compute_context(device_type: str, precision: str = "float32"):
    """Where the forward computes: ``torch.autocast(device_type, dtype=torch.bfloat16)`` for
    ``"bfloat16"`` (convolutions and matmuls in bfloat16, the parameters float32), nothing for
    ``"float32"``; ``ValueError`` for another precision."""
    if _check_precision(precision) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16)


def forward_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor, precision: str = "float32"):
    """``(loss, correct)`` of ``model`` on the batch ``(X, y)`` in the mode it is in: the mean
    cross-entropy, on logits of at least float32 whatever the precision (so the loss and its
    gradient's start are float32 under bfloat16), and the number of correct predictions (0-d int64), both on the device. What the
    compiled step compiles (:mod:`bnref.torch.compiled`)."""
    with compute_context(X.device.type, precision):
        logits = model(X)  # (B, 10), bfloat16 under autocast
    # mean over the batch, on logits of at least float32 (bfloat16 ones under autocast promoted; a
    # float64 model's stay float64: .float() would round the trajectory's float64 loss to float32)
    loss = nn.functional.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y)
    return loss, (logits.argmax(1) == y).sum()


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor,
          precision: str = "float32"):  # fmt: skip
    model.train()
    loss, correct = forward_loss(model, X, y, precision)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # outside autocast, as torch's AMP recipe says: the backward runs in each op's forward dtype
    optimizer.step()
    return loss.detach(), correct


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor,
               precision: str = "float32") -> torch.Tensor:  # fmt: skip
    """One optimizer step on the batch ``(X, y)`` (cross-entropy, model in train mode);
    returns the batch's mean loss as a detached 0-d tensor (no device sync)."""
    return _step(model, optimizer, X, y, _check_precision(precision))[0]


class EagerStep:
    """``step(X, y, idx) -> (loss, correct)``: one eager SGD step of ``model`` on ``(X[idx],
    y[idx])`` (one gather per batch), in ``precision``; the loss detached and the count of correct
    train-mode predictions, 0-d device tensors, unread (no sync). :class:`bnref.torch.compiled.CompiledStep`
    has the same contract; ``warm_up`` is there for symmetry (nothing to compile: 0 seconds)."""

    compile_seconds = 0.0

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, precision: str = "float32"):
        self.model, self.optimizer, self.precision = model, optimizer, _check_precision(precision)

    def __call__(self, X: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return _step(self.model, self.optimizer, X[idx], y[idx], self.precision)  # (B, 1, 28, 28), (B,)

    def warm_up(self, X, y, idx) -> float:
        return 0.0


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, *, compile: bool = False,
              precision: str = "float32"):
    """The step :func:`train_steps` takes: :class:`EagerStep`, or with ``compile``
    :class:`bnref.torch.compiled.CompiledStep` for ``device`` (``ValueError`` where torch.compile
    cannot run there: see ``check_compile_support``)."""
    if not isinstance(compile, bool):
        raise ValueError(f"compile must be True or False, got {compile!r}")
    _check_precision(precision)
    if not compile:
        return EagerStep(model, optimizer, precision)
    return CompiledStep(model, optimizer, device, functools.partial(forward_loss, precision=precision), precision)


@dataclasses.dataclass(frozen=True)
class Step:
    """One SGD step of :func:`train_steps`: step ``step`` of ``steps`` (1-based) of ``epoch``.

    ``loss``: the batch's mean loss and ``correct``: its number of correct train-mode
    predictions, 0-d device tensors (unread: no sync); ``size``: the batch's examples (this
    replica's slice); ``perm``: the epoch's example order (N,) on the device."""

    epoch: int
    step: int
    steps: int
    loss: torch.Tensor
    correct: torch.Tensor
    size: int
    perm: torch.Tensor


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor, *, seed: int,
                batch_size: int, epochs: Iterable[int], rank: int = 0, world: int = 1, step=None) -> Iterator[Step]:
    """The training loop :func:`fit` runs, one :class:`Step` per optimizer step: for each epoch
    of ``epochs`` (1-based numbers; ``itertools.count(1)`` for as many as wanted), the examples of
    ``X`` (N, 1, 28, 28), ``y`` (N,) in ``bnref.schedule.epoch_permutation(seed, epoch, N)``'s
    order, in the full batches of ``batch_slices(N, batch_size)``: one gather per batch on the
    device, no per-example work, no sync. Data parallel (replica ``rank`` of ``world``): each
    global batch split into ``world`` equal consecutive slices, this replica taking its own.

    ``step``: :func:`make_step`'s step for this ``model`` and ``optimizer`` (compiled, bfloat16);
    default an eager float32 :class:`EagerStep`."""
    if step is None:
        step = EagerStep(model, optimizer)
    elif getattr(step, "model", None) is not model or getattr(step, "optimizer", None) is not optimizer:
        raise ValueError("train_steps: step was made for another model or optimizer (make_step(model, optimizer, ...))")
    n = X.shape[0]
    size = min(batch_size // world, n)  # each replica's slice of every global batch
    starts = [start + rank * (full // world) for start, full in batch_slices(n, batch_size)]
    for epoch in epochs:
        perm = torch.from_numpy(epoch_permutation(seed, epoch, n)).long().to(X.device)  # (N,) example order
        for k, i in enumerate(starts, start=1):
            idx = perm[i : i + size]  # (B,) this batch's examples: the step gathers them, no per-example work
            loss, correct = step(X, y, idx)
            yield Step(epoch, k, len(starts), loss, correct, idx.shape[0], perm)


def run_steps(steps: Iterable[Step], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, int, List[torch.Tensor], Step]:
    """Take ``steps`` (from :func:`train_steps`) and add them up on the device, without a sync:
    ``(loss_sum, correct, seen, losses, last)``, the summed per-example loss, the number correct
    (train mode), the examples, each step's mean loss, and the last step taken."""
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen, losses, s = 0, [], None
    for s in steps:
        loss_sum += s.loss * s.size
        correct += s.correct
        seen += s.size
        losses.append(s.loss)
    return loss_sum, correct, seen, losses, s


@torch.inference_mode()
def evaluate(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = EVAL_BATCH,
             precision: str = "float32") -> float:  # fmt: skip
    """Accuracy of ``model`` in eval mode (running statistics) on ``(X, y)``, computing in
    ``precision`` (:func:`compute_context`), eagerly."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=X.device)
    with compute_context(X.device.type, precision):
        for i in range(0, X.shape[0], batch_size):
            correct += (model(X[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum()
    return correct.item() / X.shape[0]


@contextlib.contextmanager
def _deterministic(device: torch.device):
    """cuDNN deterministic kernels for the duration (a no-op on the CPU, already deterministic)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@contextlib.contextmanager
def float32_matmuls(tf32: bool):
    """TF32 for float32 matmuls and cuDNN convolutions (``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.backends.cudnn.allow_tf32``) exactly as asked for the duration, both set either way:
    off unless ``tf32`` (torch's own default lets cuDNN convolutions use TF32; parity and the
    trajectory need full float32), and put back afterwards, so that a run leaves the process's
    switches as it found them (a test or a notebook that trains next is not silently in TF32).
    On the CPU they change nothing but are set all the same."""
    if not isinstance(tf32, bool):
        raise ValueError(f"tf32 must be True or False, got {tf32!r}")
    cudnn = torch.backends.cudnn
    current = {"enabled": cudnn.enabled, "benchmark": cudnn.benchmark, "deterministic": cudnn.deterministic}
    if hasattr(cudnn, "benchmark_limit"):
        current["benchmark_limit"] = cudnn.benchmark_limit
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        # cudnn's flags through its own context manager: setting them directly raises once torch's
        # test tools have called torch.backends.disable_global_flags() (as the test suite does)
        with cudnn.flags(**current, allow_tf32=tf32):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def fit(config, data, on_epoch: Callable[[Dict], None], run=None) -> List[Dict]:
    """Train LeNet-BN per ``config`` (a ``bnref.config.TrainConfig``) on ``data`` (a
    ``bnref.data.FashionMNIST``); returns one metrics dict per epoch, each also passed to
    ``on_epoch`` as soon as it exists.

    Metrics: ``loss`` (mean training loss over the epoch), ``train_acc`` (over the epoch,
    train mode, as the model was while it learned), ``test_acc`` (eval mode),
    ``examples_per_sec`` (training examples / training time, evaluation excluded),
    ``device`` (``"cpu"``, ``"cuda:0"``, ``"2 x cpu"``).

    Data parallel: launched by ``torchrun``, this process is one replica of the group torchrun
    describes; with ``config.replicas > 1`` it starts that many processes itself (gloo on the
    CPU, NCCL with one GPU each). See :func:`_train`.

    ``run`` (a :class:`bnref.runs.RunDir`): a checkpoint after every epoch (rank 0 writes it),
    and with ``run.resuming`` the run starts from its checkpoint.

    ``config.compile`` / ``config.precision`` / ``config.tf32``: the step (see the module
    docstring); with ``compile``, ``compile_seconds`` (epoch ``first``) is the warm-up that compiled
    it, run before the epoch's clock starts and undone, so the run trains as it would without it
    and a resumed compiled run equals an uninterrupted one. TF32's switches are set for the run
    and put back when it returns (:func:`float32_matmuls`).
    """
    env = distributed.torchrun_env()
    if env is not None and env["world"] > 1:
        if config.compile or config.precision != "float32":  # TrainConfig refuses them with replicas > 1 too
            raise ValueError("compile and bfloat16 are for one device; torchrun's replicas train eagerly in float32")
        device = _replica_device(config.device, env["local_rank"])
        distributed.init_from_env(distributed.backend_for(device))
        try:
            return _train(config, data, on_epoch, device, env["rank"], env["world"], run)
        finally:
            torch.distributed.destroy_process_group()
    if config.replicas > 1:
        device = resolve_device(config.device)
        if device.type == "cuda" and torch.cuda.device_count() < config.replicas:
            raise ValueError(f"--replicas {config.replicas} needs {config.replicas} GPUs; "
                             f"{torch.cuda.device_count()} are visible")  # fmt: skip
        if run is not None and run.resuming:  # the metrics so far, for this process's log and figure
            run.resumed(list(_read_checkpoint(run.require_checkpoint(), "cpu")["history"]))
        results = distributed.launch(_replica_worker, config.replicas, (config, data, run), on_message=on_epoch,
                                     backend=distributed.backend_for(device))  # fmt: skip
        return results[0]
    device = resolve_device(config.device)
    if config.compile:
        check_compile_support(device.type)  # before any data moves
    return _train(config, data, on_epoch, device, 0, 1, run)


def _replica_device(name: str, local_rank: int) -> torch.device:
    """The device of one replica: the CPU, or GPU ``local_rank`` (one GPU per process)."""
    device = resolve_device(name)
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


def _replica_worker(rank: int, world: int, send, config, data, run=None):
    """One spawned replica (see :func:`bnref.torch.distributed.launch`): rank 0 streams its
    epoch metrics with ``send`` (the parent logs them) and returns the history."""
    if run is not None:
        run.readonly = True  # the parent logs the streamed metrics; rank 0 here only checkpoints
    return _train(config, data, send, _replica_device(config.device, rank), rank, world, run)


def save_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, history: List[Dict],
                    run_id: Optional[str] = None) -> None:
    """The run's state after ``epoch``: model and optimizer ``state_dict``, the metrics so far and
    the id of the run it belongs to, written atomically (to a temporary file, then renamed): a
    kill leaves the previous one."""
    import io

    from bnref import _io

    buf = io.BytesIO()
    torch.save({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "history": _io.strict_json(history), "run_id": run_id}, buf)  # fmt: skip
    _io.atomic_write_bytes(path, buf.getvalue())


def _read_checkpoint(path: str, device) -> Dict:
    """The checkpoint's contents (``weights_only=True``: tensors and plain data only, never code);
    ``ValueError`` naming the file when it is not a torch checkpoint of bnref's."""
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many kinds on a file that is not its own
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable torch checkpoint ({first[:200]})") from None
    if not isinstance(ck, dict) or not {"epoch", "model", "optimizer", "history"} <= set(ck):
        raise ValueError(f"{path}: not a bnref torch checkpoint (expected epoch, model, optimizer, history)")
    return ck


def check_checkpoint(path: str, config, run_id: Optional[str]) -> int:
    """The epoch of the checkpoint at ``path`` after checking that it resumes the run ``run_id``
    of ``config``: it is readable, names that run (a checkpoint copied in from another run is
    refused; one without a run id is accepted only for a run that has none, i.e. one written
    before runs had ids), and its model and optimizer state load into ``config``'s LeNet-BN.
    ``ValueError`` naming the file otherwise. Run before any data loads."""
    from bnref.runs import check_run_id

    ck = _read_checkpoint(path, "cpu")
    check_run_id(path, ck.get("run_id"), run_id)
    model = make_model(config)
    try:
        model.load_state_dict(ck["model"])
        torch.optim.SGD(model.parameters(), lr=config.lr).load_state_dict(ck["optimizer"])
        epoch = int(ck["epoch"])
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"{path}: does not fit this run's model (--bn {config.bn}): {first[:200]}") from None
    return epoch


def load_checkpoint(path: str, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], device: torch.device):
    """Load :func:`save_checkpoint`'s file (``weights_only=True``: tensors and plain data only)
    into ``model`` and ``optimizer`` (``None``: the model only); returns ``(epoch, history)``."""
    ck = _read_checkpoint(path, device)
    model.load_state_dict(ck["model"])
    if optimizer is not None:
        optimizer.load_state_dict(ck["optimizer"])
    return int(ck["epoch"]), list(ck["history"])


def _train(config, data, on_epoch: Callable[[Dict], None], device: torch.device, rank: int, world: int,
           run=None) -> List[Dict]:
    """The training loop, on one device or as replica ``rank`` of ``world`` (a process group
    exists then). Data parallel: the same initial weights on every replica (DDP broadcasts
    rank 0's anyway), the same example order; each global batch of ``config.batch_size`` is
    split into ``world`` equal consecutive slices, one per replica; DDP averages the
    gradients. With ``config.sync_bn`` every BN layer becomes :class:`bnref.torch.SyncBatchNorm`
    (global-batch statistics, identical running statistics); without, each replica normalizes
    its slice alone and DDP copies rank 0's running statistics to the others at every forward
    (``broadcast_buffers=True``, torch's default), which evaluation then uses. Metrics are
    summed over replicas; only rank 0 calls ``on_epoch``."""
    from bnref._progress import bar

    model = make_model(config).to(device)
    model, net = distributed.data_parallel(model, device, config.sync_bn) if world > 1 else (model, model)
    optimizer = torch.optim.SGD(net.parameters(), lr=config.lr)
    X_train, y_train = load_tensors(data.train_images, data.train_labels, device)
    X_test, y_test = load_tensors(data.test_images, data.test_labels, device)
    first, past = 1, []
    if run is not None and run.resuming:
        done, past = load_checkpoint(run.require_checkpoint(), model, optimizer, device)
        run.resumed(past)
        first = done + 1
    starts = batch_slices(X_train.shape[0], config.batch_size)
    history = []
    with _deterministic(device), float32_matmuls(config.tf32):
        step = make_step(net, optimizer, device, compile=config.compile, precision=config.precision)
        # Compiled: compile now, on a batch of the run's one shape, and undo that step (see warm_up).
        size = min(config.batch_size // world, X_train.shape[0])  # train_steps' batch (eager: nothing to warm up)
        compile_seconds = step.warm_up(X_train, y_train, torch.arange(size, device=device))
        for epoch in range(first, config.epochs + 1):
            synchronize(device)
            t0 = time.perf_counter()
            steps = train_steps(net, optimizer, X_train, y_train, seed=config.seed, batch_size=config.batch_size,
                                epochs=(epoch,), rank=rank, world=world, step=step)  # fmt: skip
            steps = bar(steps, f"epoch {epoch}/{config.epochs}", config.progress and rank == 0, total=len(starts))
            loss_sum, correct, seen, losses, last = run_steps(steps, device)
            perm = last.perm
            totals = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), device=device)])
            step_losses = torch.stack(losses).double()  # (steps,) this replica's mean loss per step
            if world > 1:
                torch.distributed.all_reduce(totals)
                torch.distributed.all_reduce(step_losses)
                step_losses /= world  # equal slices: the global batch's mean loss
                for buffer in model.buffers():  # the running statistics evaluation uses: rank 0's
                    torch.distributed.broadcast(buffer, 0)
            synchronize(device)
            seconds = time.perf_counter() - t0
            test_acc = _evaluate_shared(model, X_test, y_test, rank, world, config.precision)
            t1 = time.perf_counter()
            precise = _precise_test_acc(config, model, X_train, perm, X_test, y_test) if config.precise_bn else None
            where = str(device) if world == 1 else f"{world} x {device.type}"
            m = epoch_metrics(config, epoch, float(totals[0]), float(totals[1]), int(totals[2]), seconds, test_acc, where,
                              test_acc_precise=precise, precise_seconds=time.perf_counter() - t1)  # fmt: skip
            m["step_losses"] = step_losses.tolist()
            m["compile_seconds"] = compile_seconds if epoch == first else 0.0  # eager: 0, nothing is compiled
            check_finite_loss(epoch, m["step_losses"])
            history.append(m)
            if rank == 0:
                on_epoch(m)
                if run is not None:
                    save_checkpoint(run.checkpoint, model, optimizer, epoch, past + history, run.run_id)
    return history if rank == 0 else []


def _precise_test_acc(config, model, X_train, perm, X_test, y_test) -> float:
    """Test accuracy with BN statistics recomputed over the epoch's training batches
    (:func:`bnref.torch.precise_bn`); the running averages are put back afterwards, so training
    goes on exactly as without precise BN."""
    from bnref.torch.precise import precise_bn
    from bnref.schedule import precise_batch_indices

    saved = {k: v.clone() for k, v in model.state_dict().items()}
    idx = precise_batch_indices(config, perm.cpu().numpy())
    try:
        with compute_context(X_train.device.type, config.precision):  # the activations evaluation will see
            precise_bn(model, [X_train[torch.from_numpy(i).to(X_train.device)] for i in idx],
                       variant=config.precise_variant, progress=config.progress)  # fmt: skip
        return evaluate(model, X_test, y_test, precision=config.precision)
    finally:
        model.load_state_dict(saved)


def _evaluate_shared(model, X, y, rank: int, world: int, precision: str = "float32") -> float:
    """Test accuracy, each replica evaluating every ``world``-th example (eval mode: the result
    does not depend on how the examples are grouped), the counts summed."""
    if world == 1:
        return evaluate(model, X, y, precision=precision)
    mine = len(X[rank::world])
    correct = torch.tensor(evaluate(model, X[rank::world], y[rank::world], precision=precision) * mine if mine else 0.0,
                           dtype=torch.float64, device=X.device)  # fmt: skip
    torch.distributed.all_reduce(correct)
    return float(correct) / X.shape[0]
