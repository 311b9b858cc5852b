"""Runners that plug bnref's PyTorch backend into :mod:`bnref.testing`.

Each is ``run(inputs, convention, axis, dtype, train) -> dict`` of NumPy arrays: ``y``,
``running_mean``, ``running_var`` and, in training, ``dx``, ``dgamma``, ``dbeta`` (the
gradients of ``sum(y * dy)``). Inputs are float64 NumPy arrays, cast to ``dtype``
(``"float64"``, ``"float32"``, ``"float16"``, ``"bfloat16"``).

Every tensor, parameters and running statistics included, is created in ``dtype``, as a
``torch.nn.BatchNorm*d(..., dtype=dtype)`` layer holds them; so every returned array has
``dtype`` too. (Statistics of half-precision inputs are still accumulated in float32 and
rounded to the buffers' dtype at the end.) NumPy has no bfloat16: bfloat16 results are
returned as float32 arrays holding the bfloat16 values exactly, so compare them with
``check_dtype=False``.
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from bnref import spec
from bnref.testing import NotExpressible
from bnref.torch.functional import batch_norm
from bnref.torch.layers import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["run_functional", "run_layer", "run_builtin", "RUNNERS"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _tensor(a: np.ndarray, dtype: str, grad: bool = False) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(a, dtype=np.float64)).to(_DTYPES[dtype])
    return t.requires_grad_(grad)


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()  # exact: every bfloat16 is a float32
    return t.numpy().copy()


def _result(y, rm, rv, x, gamma, beta, dy, train: bool) -> Dict[str, np.ndarray]:
    out = {"y": _numpy(y), "running_mean": _numpy(rm), "running_var": _numpy(rv)}
    if train:
        dx, dgamma, dbeta = torch.autograd.grad((y * dy).sum(), (x, gamma, beta))
        out.update(dx=_numpy(dx), dgamma=_numpy(dgamma), dbeta=_numpy(dbeta))
    return out


def run_functional(inputs, convention: spec.Convention, axis: int, dtype: str, train: bool, param_dtype=None):
    """``bnref.torch.batch_norm`` on the inputs, any layout (``axis``). ``param_dtype`` (default
    ``dtype``): of gamma, beta and the running statistics, e.g. float32 for a bfloat16 ``x``
    (what training under ``torch.autocast`` feeds a BN layer)."""
    pd = param_dtype or dtype
    x, dy = _tensor(inputs["x"], dtype, grad=train), _tensor(inputs["dy"], dtype)
    gamma, beta = (_tensor(inputs[k], pd, grad=train) for k in ("gamma", "beta"))
    rm, rv = (_tensor(inputs[k], pd) for k in ("running_mean", "running_var"))
    y, new_rm, new_rv = batch_norm(x, gamma, beta, rm, rv, train=train, convention=convention, axis=axis)
    return _result(y, new_rm, new_rv, x, gamma, beta, dy, train)


def _layer_class(ndim: int, builtin: bool):
    classes = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
    if not builtin:
        classes = {2: BatchNorm1d, 3: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}
    if ndim not in classes:
        raise NotExpressible(f"no BatchNorm layer takes rank-{ndim} input")
    return classes[ndim]


def _run_module(layer, inputs, axis: int, dtype: str, train: bool, param_dtype=None):
    """Load the inputs into ``layer`` (weight, bias, running stats), run one forward/backward.

    Layers take channels first (axis 1). Other layouts are transposed to channels-first and
    the output (and dx) back: a layout change the user would make too, not a different
    computation.
    """
    ndim = inputs["x"].ndim
    ax = axis % ndim
    perm = [0, ax] + [i for i in range(1, ndim) if i != ax]  # to (N, C, ...)
    inv = list(np.argsort(perm))  # back to the original layout
    x = _tensor(inputs["x"], dtype, grad=train)
    dy = _tensor(inputs["dy"], dtype)
    pd = param_dtype or dtype
    with torch.no_grad():
        layer.weight.copy_(_tensor(inputs["gamma"], pd))
        layer.bias.copy_(_tensor(inputs["beta"], pd))
        layer.running_mean.copy_(_tensor(inputs["running_mean"], pd))
        layer.running_var.copy_(_tensor(inputs["running_var"], pd))
    layer.train(train)
    y = layer(x.permute(perm)).permute(inv)
    return _result(y, layer.running_mean, layer.running_var, x, layer.weight, layer.bias, dy, train)


def run_layer(inputs, convention: spec.Convention, axis: int, dtype: str, train: bool, param_dtype=None):
    """bnref's ``BatchNorm1d/2d/3d`` configured with ``convention`` (its parameters and buffers in
    ``param_dtype``, default ``dtype``)."""
    c = inputs["x"].shape[axis]
    layer = _layer_class(inputs["x"].ndim, builtin=False)(c, convention=convention, dtype=_DTYPES[param_dtype or dtype])
    return _run_module(layer, inputs, axis, dtype, train, param_dtype)


def run_builtin(inputs, convention: spec.Convention, axis: int, dtype: str, train: bool, param_dtype=None):
    """``torch.nn.BatchNorm1d/2d/3d`` with ``momentum = 1 - decay`` and the convention's eps
    (parameters and buffers in ``param_dtype``, default ``dtype``)."""
    if convention.running_var == "biased":
        raise NotExpressible("torch.nn always uses the unbiased variance in its running average")
    c = inputs["x"].shape[axis]
    cls = _layer_class(inputs["x"].ndim, builtin=True)
    layer = cls(c, eps=convention.eps, momentum=convention.torch_momentum, dtype=_DTYPES[param_dtype or dtype])
    return _run_module(layer, inputs, axis, dtype, train, param_dtype)


#: name -> runner, for ``python -m bnref.parity`` and the tests
RUNNERS = {"functional": run_functional, "layer": run_layer, "builtin": run_builtin}


# --- data parallel: bnref's SyncBatchNorm on R gloo processes ------------------------------------


def _sync_worker(rank, world, send, shards, dys, gamma, beta, running_mean, running_var, convention, steps, dtype):
    """One replica: bnref's SyncBatchNorm in ``dtype``, ``steps`` training steps on its shard
    (forward, backward of ``sum(y * dy)``), then an eval step. Returns NumPy. (torch.nn's
    SyncBatchNorm refuses CPU tensors, so these gloo processes cannot run it.)"""
    from bnref.torch.sync import SyncBatchNorm

    m = SyncBatchNorm(shards[rank].shape[1], convention=convention, dtype=_DTYPES[dtype])
    with torch.no_grad():
        m.weight.copy_(_tensor(gamma, dtype)), m.bias.copy_(_tensor(beta, dtype))
        m.running_mean.copy_(_tensor(running_mean, dtype)), m.running_var.copy_(_tensor(running_var, dtype))
    out = []
    for _ in range(steps):
        x = _tensor(shards[rank], dtype, grad=True)
        m.zero_grad()
        y = m(x)
        (y * _tensor(dys[rank], dtype)).sum().backward()
        out.append({"y": _numpy(y), "dx": _numpy(x.grad), "dgamma": _numpy(m.weight.grad), "dbeta": _numpy(m.bias.grad),
                    "running_mean": _numpy(m.running_mean), "running_var": _numpy(m.running_var)})  # fmt: skip
    m.eval()
    eval_y = _numpy(m(_tensor(shards[rank], dtype)))
    return {"steps": out, "eval_y": eval_y, "num_batches_tracked": int(m.num_batches_tracked)}


def run_sync_bn(shards, dys, gamma, beta, running_mean, running_var, convention: spec.Convention, dtype: str,
                builtin: bool = False, steps: int = 2, timeout_s: float = 60.0):
    """bnref's ``SyncBatchNorm`` (``builtin``: torch.nn's, which refuses CPU tensors) on one gloo
    process per shard: ``steps`` training steps (gradients of ``sum(y * dy)``) then eval; the
    twin of ``bnref.jax._runners.run_sync_bn``, with its result's shape.

    Shards are ``(n, C, L)`` NumPy arrays, ``n`` may differ and be 0. Returns ``{"steps": per
    step, every replica's ``ys`` and ``dxs``, the summed parameter gradients (what DDP's
    all-reduce adds up) and the running statistics (rank 0's; they are the same everywhere);
    "eval_ys"; "replicas": each process's own results}``."""
    if builtin:
        raise NotExpressible("torch.nn.SyncBatchNorm refuses CPU tensors (CUDA only)")
    from bnref.torch.distributed import launch

    args = (shards, dys, gamma, beta, running_mean, running_var, convention, steps, dtype)
    per_rank = launch(_sync_worker, len(shards), args, backend="gloo", timeout_s=timeout_s, threads=1,
                      deadline_s=4 * timeout_s)  # fmt: skip
    return {"steps": [{"ys": [r["steps"][k]["y"] for r in per_rank], "dxs": [r["steps"][k]["dx"] for r in per_rank],
                       "dgamma": sum(r["steps"][k]["dgamma"] for r in per_rank),
                       "dbeta": sum(r["steps"][k]["dbeta"] for r in per_rank),
                       "running_mean": per_rank[0]["steps"][k]["running_mean"],
                       "running_var": per_rank[0]["steps"][k]["running_var"]} for k in range(steps)],
            "eval_ys": [r["eval_y"] for r in per_rank], "replicas": per_rank}  # fmt: skip


# --- data parallel: LeNet-BN trained by R DDP processes (python -m bnref.parity --trajectory --replicas R) ----


def _trajectory_worker(rank, world, send, state, batches, lr, dtype, convention, modes):
    """One replica of data-parallel LeNet-BN runs, one per entry of ``modes`` (``True``:
    synchronized BN, ``False``: local), each from ``state`` (a torch-layout state_dict of NumPy
    arrays) in ``dtype``: DDP, SGD(``lr``), each global batch split into ``world`` equal
    consecutive slices. Rank 0 returns, per run, the global batch's mean loss per step and the
    final state (running statistics: rank 0's, which DDP gives every replica at each forward when
    BN is not synchronized)."""
    from bnref.torch import distributed, train as ttrain
    from bnref.torch.models import LeNetBN

    cpu = torch.device("cpu")
    runs = []
    for sync_bn in modes:
        model = LeNetBN(bn="bnref", convention=convention).to(_DTYPES[dtype])
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
        model, net = distributed.data_parallel(model, cpu, sync_bn)
        optimizer = torch.optim.SGD(net.parameters(), lr=lr)
        losses = []
        for images, labels in batches:
            local = len(images) // world
            mine = slice(rank * local, (rank + 1) * local)
            X, y = ttrain.load_tensors(images[mine], labels[mine], cpu)
            losses.append(ttrain.train_step(net, optimizer, X.to(_DTYPES[dtype]), y))
        losses = torch.stack(losses).double()  # (steps,) this replica's mean loss
        torch.distributed.all_reduce(losses)
        losses /= world  # equal slices: the global batch's mean loss
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)
        runs.append({"losses": losses.numpy(), "state": {k: _numpy(v) for k, v in model.state_dict().items()}})
    return runs if rank == 0 else None


def run_data_parallel_trajectory(state, batches, lr: float, dtype: str, convention: spec.Convention, replicas: int,
                       modes=(True, False), timeout_s: float = 120.0):
    """LeNet-BN trained with DDP on ``replicas`` gloo processes from ``state`` on ``batches`` (a
    list of (uint8 images (B, 28, 28), labels (B,)) with ``replicas`` dividing B), once per entry
    of ``modes`` (synchronized BN or not) in the same processes: a list of ``{"losses" (steps,),
    "state"}`` (see :func:`_trajectory_worker`)."""
    from bnref.torch.distributed import launch

    args = (state, batches, lr, dtype, convention, tuple(modes))
    return launch(_trajectory_worker, replicas, args, backend="gloo", timeout_s=timeout_s,
                  deadline_s=10 * timeout_s)[0]  # fmt: skip
