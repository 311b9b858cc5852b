"""bnref's torch layers under PyTorch's own tools: autograd of every order, torch.func, torch.export,
torch.fx, TorchScript, and the tools that look for BatchNorm layers (update_bn, fusion, conversion).

Each test runs the tool on bnref's layer and on torch.nn's (or on the spec) and compares, so a
tool that silently skips bnref's layer, or a derivative that is silently wrong, fails here.
"""

import copy
import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, replace_all_batch_norm_modules_, stack_module_state, vmap

from bnref import spec, testing
from bnref.torch import BatchNorm1d, BatchNorm2d, BatchNorm3d, LeNetBN, batch_norm

pytestmark = pytest.mark.usefixtures("torch_one_thread")

PAIRS = [  # (bnref class, torch.nn class, input shape)
    pytest.param(BatchNorm1d, nn.BatchNorm1d, (6, 3), id="1d"),
    pytest.param(BatchNorm1d, nn.BatchNorm1d, (5, 3, 4), id="1d-NCL"),
    pytest.param(BatchNorm2d, nn.BatchNorm2d, (4, 3, 3, 2), id="2d"),
    pytest.param(BatchNorm3d, nn.BatchNorm3d, (3, 3, 2, 2, 2), id="3d"),
]


def _same_init(ours: nn.Module, theirs: nn.Module, seed: int = 0) -> None:
    """Non-trivial, identical parameters and running statistics in both layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in (ours, theirs):
            m.weight.copy_(torch.rand(m.num_features, generator=torch.Generator().manual_seed(seed)) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=torch.Generator().manual_seed(seed + 1)))
            m.running_mean.copy_(torch.randn(m.num_features, generator=torch.Generator().manual_seed(seed + 2)))
            m.running_var.copy_(torch.rand(m.num_features, generator=torch.Generator().manual_seed(seed + 3)) + 0.5)
    del g


def _x(shape, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype) * 2 + 1).requires_grad_(requires_grad)


# --- being torch.nn's class -----------------------------------------------------------------------


@pytest.mark.parametrize("ours_cls,theirs_cls,shape", PAIRS)
def test_layers_are_torch_nn_batch_norms(ours_cls, theirs_cls, shape):
    layer = ours_cls(3, convention="d2l")
    assert isinstance(layer, theirs_cls) and isinstance(layer, nn.modules.batchnorm._BatchNorm)
    assert layer.convention == spec.D2L  # the convention is kept on the subclass


@pytest.mark.parametrize("ours_cls,theirs_cls,shape", PAIRS[:1] + PAIRS[2:3])
def test_load_state_dict_without_counter_keeps_it_like_torch_nn(ours_cls, theirs_cls, shape):
    layers = [ours_cls(3), theirs_cls(3)]
    for m in layers:
        for _ in range(4):
            m(_x(shape, torch.float32))
        sd = {k: v for k, v in m.state_dict().items() if k != "num_batches_tracked"}
        m.load_state_dict(sd, strict=False)
    assert [int(m.num_batches_tracked) for m in layers] == [4, 4]


# --- derivatives of every order ----------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("shape,axis", [((5, 3), 1), ((3, 2, 3, 2), 1), ((3, 2, 2, 3), -1)], ids=["NC", "NCHW", "NHWC"])
def test_gradgradcheck_functional(shape, axis, affine):
    c = shape[axis]
    x = _x(shape, requires_grad=True)
    params = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_(), torch.randn(c, dtype=torch.float64).requires_grad_()

    def f(x, *p):
        return batch_norm(x, *(p if affine else (None, None)), None, None, train=True, axis=axis)[0]

    inputs = (x, *params) if affine else (x,)
    assert torch.autograd.gradcheck(f, inputs, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, inputs, check_batched_grad=True)


@pytest.mark.parametrize("ours_cls,theirs_cls,shape", PAIRS)
def test_gradgradcheck_layer(ours_cls, theirs_cls, shape):
    layer = ours_cls(3, dtype=torch.float64)
    _same_init(layer, theirs_cls(3, dtype=torch.float64))
    x = _x(shape, requires_grad=True)

    def f(x, w, b):
        return functional_call(layer, {"weight": w, "bias": b}, (x,))

    w, b = (layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_())
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def _gradient_penalty_grads(bn_cls):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3).double()
    bn = bn_cls(3).double()
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    y = bn(conv(x))
    (g,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    ((g * g).sum() + y.sum()).backward()
    return [p.grad.clone() for p in (*conv.parameters(), *bn.parameters())]


def test_gradient_penalty_matches_torch_nn():
    # On main at 7b1ede4 the once-differentiable backward gave a conv-weight gradient off by ~170%.
    for ours, theirs in zip(_gradient_penalty_grads(BatchNorm2d), _gradient_penalty_grads(nn.BatchNorm2d)):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


# --- torch.func -----------------------------------------------------------------------------------------


def _lenet_pair():
    torch.manual_seed(0)
    ours = LeNetBN(bn="bnref", convention="torch").double()
    theirs = LeNetBN(bn="builtin", convention="torch").double()
    theirs.load_state_dict(ours.state_dict())
    X = torch.rand(6, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(0))
    return ours, theirs, X, y


def test_func_grad_with_functional_call_matches_torch_nn_in_training():
    grads = []
    for model in _lenet_pair()[:2]:
        _, _, X, y = _lenet_pair()
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.clone() for k, v in model.named_buffers()}

        def loss(p, b):
            return nn.functional.cross_entropy(functional_call(model, (p, b), (X,)), y)

        grads.append(grad(loss)(params, buffers))
        assert int(buffers["bn1.num_batches_tracked"]) == 1  # the running update happened on the passed buffers
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], msg=k)


@pytest.mark.parametrize("ours_cls,theirs_cls,shape", PAIRS)
def test_func_jacrev_matches_torch_nn_in_training(ours_cls, theirs_cls, shape):
    jacobians = []
    for cls in (ours_cls, theirs_cls):
        layer = cls(3, dtype=torch.float64)
        _same_init(layer, layer)
        buffers = {k: v.clone() for k, v in layer.named_buffers()}
        jacobians.append(jacrev(lambda x, b: functional_call(layer, b, (x,)))(_x(shape), buffers))
    torch.testing.assert_close(jacobians[0], jacobians[1])


def test_func_vmap_over_a_batch_of_models_equals_a_loop():
    torch.manual_seed(0)
    models = [LeNetBN(bn="bnref", convention="d2l") for _ in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    X = torch.rand(8, 1, 28, 28)
    out = vmap(lambda p, b, x: functional_call(base, (p, b), (x,)), in_dims=(0, 0, None))(params, buffers, X)
    loop = torch.stack([m(X) for m in models])
    torch.testing.assert_close(out, loop)
    for name in ("bn1.running_mean", "bn3.running_var", "bn4.num_batches_tracked"):
        torch.testing.assert_close(buffers[name], torch.stack([m.get_buffer(name) for m in models]), msg=name)


def test_replace_all_batch_norm_modules_patches_bnref_layers_for_vmap():
    torch.manual_seed(0)
    model = LeNetBN(bn="bnref")
    replace_all_batch_norm_modules_(model)
    for bn in (model.bn1, model.bn2, model.bn3, model.bn4):
        assert bn.running_mean is None and not bn.track_running_stats
    X = torch.rand(4, 8, 1, 28, 28)  # 4 independent batches
    out = vmap(model)(X)
    torch.testing.assert_close(out, torch.stack([model(x) for x in X]))


# --- torch.export, torch.fx, TorchScript ---------------------------------------------------------------------


def test_export_in_training_mode_matches_eager():
    torch.manual_seed(0)
    model = LeNetBN(bn="bnref", convention="d2l").train()
    X = torch.rand(8, 1, 28, 28)
    exported = torch.export.export(copy.deepcopy(model), (X,)).module()
    eager = copy.deepcopy(model)
    torch.testing.assert_close(exported(X), eager(X))
    for name, value in eager.named_buffers():  # the running update is part of the exported program
        torch.testing.assert_close(exported.get_buffer(name), value, msg=name)


def test_fx_symbolic_trace_keeps_the_layer_and_its_mode():
    torch.manual_seed(0)
    model = LeNetBN(bn="bnref", convention="d2l")
    traced = torch.fx.symbolic_trace(copy.deepcopy(model))
    reference = copy.deepcopy(model)
    X = torch.rand(8, 1, 28, 28)
    torch.testing.assert_close(traced(X), reference(X))  # training: batch statistics, running update
    torch.testing.assert_close(traced.bn1.running_var, reference.bn1.running_var)
    traced.eval(), reference.eval()  # the mode is not frozen into the graph
    torch.testing.assert_close(traced(X), reference(X))
    assert isinstance(traced.bn3, BatchNorm1d)


# TorchScript is deprecated in torch 2.13 but still what torch.nn's layers support.
JIT_DEPRECATED = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


@JIT_DEPRECATED
@pytest.mark.parametrize("ours_cls,theirs_cls,shape", PAIRS)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
def test_jit_script_matches_eager_and_saves(ours_cls, theirs_cls, shape, momentum):
    layer = ours_cls(3, momentum=momentum, convention="d2l", dtype=torch.float64)
    _same_init(layer, layer)
    scripted = torch.jit.script(copy.deepcopy(layer))
    for step in range(2):
        x = _x(shape, seed=step)
        torch.testing.assert_close(scripted(x), layer(x))
    for name, value in layer.named_buffers():
        torch.testing.assert_close(getattr(scripted, name), value, msg=name)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf).eval()
    layer.eval()
    torch.testing.assert_close(loaded(_x(shape, seed=9)), layer(_x(shape, seed=9)))


@JIT_DEPRECATED
def test_jit_script_refuses_a_one_value_batch_in_training():
    scripted = torch.jit.script(BatchNorm1d(3))
    with pytest.raises(Exception, match="more than 1 value per channel"):
        scripted(torch.randn(1, 3))


# --- tools that look for BatchNorm layers -----------------------------------------------------------------


def test_update_bn_recalibrates_bnref_layers_with_their_convention():
    from torch.optim.swa_utils import update_bn

    torch.manual_seed(0)
    ours = LeNetBN(bn="bnref", convention="d2l")
    theirs = LeNetBN(bn="builtin", convention="torch")
    theirs.load_state_dict(ours.state_dict())
    loader = [torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for m in (ours, theirs):
        with torch.no_grad():
            m.bn3.running_mean.fill_(7.0)
        update_bn(loader, m)
    # Both are the plain mean of the 3 batches' statistics (cumulative average); the means agree,
    # the variances differ only by Bessel's correction (d2l averages the biased batch variance).
    torch.testing.assert_close(ours.bn3.running_mean, theirs.bn3.running_mean)
    n = 16
    torch.testing.assert_close(ours.bn3.running_var * n / (n - 1), theirs.bn3.running_var)
    assert ours.bn3.momentum == 0.1 and int(ours.bn3.num_batches_tracked) == 3  # update_bn restores momentum


@pytest.mark.parametrize("with_relu", [False, True], ids=["conv-bn", "conv-bn-relu"])
def test_quantization_fuse_modules_folds_bnref_layers(with_relu):
    from torch.ao.quantization import fuse_modules

    torch.manual_seed(0)
    results = []
    for bn_cls in (BatchNorm2d, nn.BatchNorm2d):
        layers = [nn.Conv2d(2, 3, 3), bn_cls(3)] + ([nn.ReLU()] if with_relu else [])
        model = nn.Sequential(*layers)
        torch.manual_seed(1)
        model[0].reset_parameters()
        _same_init(model[1], model[1])
        model.eval()
        fused = fuse_modules(copy.deepcopy(model), [[str(i) for i in range(len(layers))]])
        assert isinstance(fused[1], nn.Identity)  # the BN layer was folded away
        X = torch.randn(4, 2, 7, 7)
        torch.testing.assert_close(fused(X), model(X))
        results.append(fused(X))
    torch.testing.assert_close(results[0], results[1])


def test_convert_sync_batchnorm_converts_bnref_layers_keeping_state():
    # torch's converter replaces every BatchNorm by torch.nn.SyncBatchNorm: bnref's layers are
    # converted (not silently skipped), parameters and buffers kept; the convention is not
    # (torch.nn.SyncBatchNorm keeps the unbiased running variance; README, differences).
    model = LeNetBN(bn="bnref", convention="d2l")
    model(torch.rand(8, 1, 28, 28))
    before = copy.deepcopy(model.state_dict())
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert all(isinstance(getattr(converted, f"bn{i}"), nn.SyncBatchNorm) for i in range(1, 5))
    after = converted.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# --- behaviours torch.nn has ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ours_cls,theirs_cls,shape", PAIRS)
def test_empty_batch_in_training_matches_torch_nn(ours_cls, theirs_cls, shape):
    empty = (0,) + shape[1:]
    results = []
    for cls in (ours_cls, theirs_cls):
        layer = cls(3)
        _same_init(layer, layer)
        x = torch.randn(empty, requires_grad=True)
        y = layer(x)
        y.sum().backward()
        results.append((y.shape, x.grad.shape, layer.weight.grad, layer.bias.grad, {k: v.clone() for k, v in layer.state_dict().items()}))
    (ys, gs, dw, db, state), (ys2, gs2, dw2, db2, state2) = results
    assert ys == ys2 == empty and gs == gs2 == empty
    torch.testing.assert_close(dw, dw2), torch.testing.assert_close(db, db2)
    for k in state:  # running statistics unchanged, the step counted, in both
        torch.testing.assert_close(state[k], state2[k], msg=k)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bad_eps_raises_like_torch_nn_and_changes_nothing(eps, training):
    ours, theirs = BatchNorm2d(3, eps=eps).train(training), nn.BatchNorm2d(3, eps=eps).train(training)
    x = torch.randn(4, 3, 2, 2)
    try:
        theirs(x)
        theirs_error = None
    except Exception as e:  # noqa: BLE001 - the type is what is compared
        theirs_error = e
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    if theirs_error is None:
        torch.testing.assert_close(ours(x), theirs(x))
    else:
        with pytest.raises(type(theirs_error), match="eps must be"):
            ours(x)
        assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("shape", [(256, 6, 24, 24), (256, 120), (16, 4, 8, 8, 3)], ids=["NCHW", "NC", "NCDHW"])
def test_float32_input_near_1e35_stays_finite_like_torch_nn(shape):
    cls = {2: BatchNorm1d, 4: BatchNorm2d, 5: BatchNorm3d}[len(shape)]
    x = torch.full(shape, 1e35) + torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1e29
    ours, theirs = cls(shape[1]), {2: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](shape[1])
    assert torch.isfinite(theirs(x)).all()
    y = ours(x)
    assert torch.isfinite(y).all() and torch.isfinite(ours.running_mean).all()
    y, new_mean, _ = batch_norm(x, None, None, torch.zeros(shape[1]), torch.ones(shape[1]), train=True)
    assert torch.isfinite(y).all() and torch.isfinite(new_mean).all()


@pytest.mark.parametrize(
    "x,error",
    [
        (torch.ones(4, 3, dtype=torch.int64), "floating-point"),
        (torch.ones(4, 3, dtype=torch.bool), "floating-point"),
        (torch.ones(4, 3, dtype=torch.complex64), "floating-point"),
    ],
    ids=["int64", "bool", "complex64"],
)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_functional_refuses_non_floating_input(x, error, train):
    with pytest.raises(TypeError, match=error):
        batch_norm(x, None, None, torch.zeros(3), torch.ones(3), train=train)


@pytest.mark.parametrize("train", ["False", 0, 1, None, np.float64(1.0)])
def test_functional_mode_must_be_a_bool(train):
    with pytest.raises(TypeError, match="train must be a bool"):
        batch_norm(torch.randn(4, 3), None, None, torch.zeros(3), torch.ones(3), train=train)


def test_functional_empty_batch_matches_spec():
    x = torch.zeros(0, 3, 2, dtype=torch.float64)
    gamma, beta = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    y, new_rm, new_rv = batch_norm(x, gamma, beta, rm, rv, train=True)
    y_spec, rm_spec, rv_spec = spec.batch_norm_train(x.numpy(), gamma.numpy(), beta.numpy(), rm.numpy(), rv.numpy(),
                                                    "torch")  # fmt: skip
    testing.assert_close({"y": y.numpy(), "running_mean": new_rm.numpy(), "running_var": new_rv.numpy()},
                         {"y": y_spec, "running_mean": rm_spec, "running_var": rv_spec},
                         context="empty batch", dtype="float64")  # fmt: skip
