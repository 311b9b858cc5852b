"""PyTorch's own BatchNorm test cases, run against bnref's layers.

``torch.testing._internal.common_modules.module_db`` is where PyTorch's authors describe how
each ``torch.nn`` module must behave: the constructor arguments and inputs to try (affine or
not, momentum None, no running statistics, 3-D input, an empty batch, ``bias=False``), the
dtypes, whether train and eval differ, whether second derivatives are supported, and the
inputs that must raise (with the error type and message). PyTorch's ``test/test_modules.py``
runs generic checks over those entries. These tests drive the same entries through bnref's
``BatchNorm1d/2d/3d`` and check the same properties, and more: every output, gradient and
buffer against torch.nn's on the same case. (test_modules.py itself is not part of the torch
wheel; the README says how its pass counts compare.)
"""

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.testing._internal.common_modules import ModuleErrorEnum, module_db

from bnref.torch import BatchNorm1d, BatchNorm2d, BatchNorm3d

pytestmark = pytest.mark.usefixtures("torch_one_thread")

OURS = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}
INFOS = [info for info in module_db if info.module_cls in OURS]
assert len(INFOS) == 3, "module_db no longer describes BatchNorm1d/2d/3d"


def _samples(info, dtype, training, requires_grad=True):
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=requires_grad, training=training)


def _cases(dtypes=None):
    """(info, dtype, training, sample index) for every sample of every BatchNorm entry, with ids
    like ``BatchNorm2d-float64-train-zero_batch``."""
    out = []
    for info in INFOS:
        for dtype in dtypes or info.dtypes:
            for training in (True, False):
                for i, sample in enumerate(_samples(info, dtype, training)):
                    name = f"{info.module_cls.__name__}-{str(dtype).split('.')[-1]}-{'train' if training else 'eval'}-{sample.desc or i}"
                    out.append(pytest.param(info, dtype, training, i, id=name))
    return out


def _build(cls, sample, dtype, training):
    torch.manual_seed(0)  # the same initialization for both
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    return cls(*args, **kwargs).to(dtype).train(training)


def _pair(info, dtype, training, index):
    sample = _samples(info, dtype, training)[index]
    theirs = _build(info.module_cls, sample, dtype, training)
    ours = _build(OURS[info.module_cls], sample, dtype, training)
    # Non-trivial parameters and running statistics, identical in both.
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, t in theirs.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64).to(t.dtype) + 0.5)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs, sample


def _inputs(sample):
    return [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
            for a in sample.forward_input.args]


def _float_inputs(sample):
    return tuple(a for a in _inputs(sample) if isinstance(a, torch.Tensor) and a.is_floating_point())


def _assert_state_equal(ours, theirs, context):
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys(), context
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=f"{context}: {k}")


@pytest.mark.parametrize("info,dtype,training,index", _cases())
def test_forward_backward_and_state_match_torch_nn(info, dtype, training, index):
    """Two steps: the same outputs, input and parameter gradients, and buffers as torch.nn."""
    ours, theirs, sample = _pair(info, dtype, training, index)
    for step in range(2):
        results = []
        for m in (ours, theirs):
            xs = _inputs(sample)
            y = m(*xs)
            leaves = [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad] + list(m.parameters())
            grads = torch.autograd.grad(y.sum() + (y * y).sum(), leaves, allow_unused=True) if y.requires_grad else ()
            results.append((y.detach(), grads))
        (y_ours, g_ours), (y_theirs, g_theirs) = results
        torch.testing.assert_close(y_ours, y_theirs, msg=f"step {step}: y")
        assert len(g_ours) == len(g_theirs)
        for i, (a, b) in enumerate(zip(g_ours, g_theirs)):
            torch.testing.assert_close(a, b, msg=f"step {step}: gradient {i}")
        _assert_state_equal(ours, theirs, f"after step {step}")


@pytest.mark.parametrize("info,dtype,training,index", _cases(dtypes=[torch.float64]))
def test_gradcheck_and_gradgradcheck(info, dtype, training, index):
    """First and second derivatives against finite differences (module_db says BatchNorm supports
    gradgrad), batched gradients included, as test_modules.py's test_grad / test_gradgrad."""
    assert info.supports_gradgrad
    ours, _, sample = _pair(info, dtype, training, index)
    xs = _float_inputs(sample)
    names = [name for name, _ in ours.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in ours.named_parameters())
    buffers = {k: v.clone() for k, v in ours.named_buffers()}

    def f(*args):
        inputs, ps = args[: len(xs)], args[len(xs):]
        # fresh buffer copies: each evaluation starts from the same state
        state = {**{k: v.clone() for k, v in buffers.items()}, **dict(zip(names, ps))}
        return torch.func.functional_call(ours, state, inputs)

    args = xs + params
    if sum(a.numel() for a in xs) == 0:
        pytest.skip("empty batch: nothing to differentiate")
    assert torch.autograd.gradcheck(f, args, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, args, check_batched_grad=True)


@pytest.mark.parametrize("info,dtype,training,index", _cases())
def test_save_load_and_pickle_round_trip(info, dtype, training, index):
    ours, _, sample = _pair(info, dtype, training, index)
    ours(*_inputs(sample))  # a state that is not the initial one
    buf = io.BytesIO()
    torch.save(ours, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    restored = pickle.loads(pickle.dumps(ours))
    assert type(loaded) is type(ours) and type(restored) is type(ours)
    assert loaded.convention == ours.convention and loaded._running_var_estimator == ours._running_var_estimator
    for m in (loaded, restored):
        _assert_state_equal(m, ours, "round trip")
        torch.testing.assert_close(copy.deepcopy(m)(*_inputs(sample)), copy.deepcopy(ours)(*_inputs(sample)))


@pytest.mark.parametrize("info,dtype,training,index", _cases())
def test_non_contiguous_and_channels_last_inputs(info, dtype, training, index):
    ours, _, sample = _pair(info, dtype, training, index)
    (x,) = _float_inputs(sample)
    expected = copy.deepcopy(ours)(x)
    variants = [x.transpose(0, -1).contiguous().transpose(0, -1)]  # same values, other strides
    if x.dim() == 4:
        variants.append(x.contiguous(memory_format=torch.channels_last))
    if x.dim() == 5:
        variants.append(x.contiguous(memory_format=torch.channels_last_3d))
    for v in variants:
        assert v.stride() != x.stride() or x.numel() <= 1  # really another memory layout
        torch.testing.assert_close(copy.deepcopy(ours)(v), expected)


@pytest.mark.parametrize("info", INFOS, ids=[i.module_cls.__name__ for i in INFOS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factory_kwargs_and_to(info, dtype):
    sample = _samples(info, dtype, True)[0]
    args = sample.constructor_input.args
    ours = OURS[info.module_cls](*args, dtype=dtype, device="cpu")
    theirs = info.module_cls(*args, dtype=dtype, device="cpu")
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert (a.dtype, a.device, a.shape) == (b.dtype, b.device, b.shape), name
    assert repr(ours) == repr(theirs)
    other = torch.float64 if dtype == torch.float32 else torch.float32
    for m in (ours.to(other), theirs.to(other)):
        assert m.weight.dtype == m.running_mean.dtype == other and m.num_batches_tracked.dtype == torch.int64
    empty = OURS[info.module_cls](*args).to_empty(device="cpu")
    assert empty.running_mean.shape == ours.running_mean.shape


@pytest.mark.parametrize("info", INFOS, ids=[i.module_cls.__name__ for i in INFOS])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_train_and_eval_differ(info, training):
    assert info.train_and_eval_differ
    ours, _, sample = _pair(info, torch.float64, True, 0)
    x = _inputs(sample)
    y_train = copy.deepcopy(ours).train()(*x)
    y_eval = copy.deepcopy(ours).eval()(*x)
    assert not torch.allclose(y_train, y_eval)


def _error_cases():
    out = []
    for info in INFOS:
        for dtype in info.dtypes:
            for training in (True, False):
                errors = info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False,
                                                       training=training)  # fmt: skip
                for i, _ in enumerate(errors):
                    name = f"{info.module_cls.__name__}-{str(dtype).split('.')[-1]}-{'train' if training else 'eval'}-{i}"
                    out.append(pytest.param(info, dtype, training, i, id=name))
    return out


@pytest.mark.parametrize("info,dtype,training,index", _error_cases())
def test_error_inputs_raise_what_module_db_says(info, dtype, training, index):
    case = info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False, training=training)[index]
    sample = case.module_error_input
    cls = OURS[info.module_cls]
    if case.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
        with pytest.raises(case.error_type, match=case.error_regex):
            cls(*sample.constructor_input.args, **sample.constructor_input.kwargs)
        return
    # As test_modules.py does: built with the default dtype, in its default (training) mode.
    m = cls(*sample.constructor_input.args, **sample.constructor_input.kwargs)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(case.error_type, match=case.error_regex):
        m(*sample.forward_input.args, **sample.forward_input.kwargs)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # a failed call changes nothing
