"""bnref's PyTorch BatchNorm: parity with the spec and with torch.nn, properties, errors, LeNet-BN."""

import inspect

import numpy as np
import pytest
import torch

from bnref import spec, testing
from bnref.torch import BatchNorm1d, BatchNorm2d, BatchNorm3d, LeNetBN, batch_norm
from bnref.torch._runners import run_builtin, run_functional, run_layer

pytestmark = pytest.mark.usefixtures("torch_one_thread")


PRESETS = sorted(spec.PRESETS)
#: (shape, axis): every layout the backends must handle, channels first and last
LAYOUTS = [((16, 3), 1), ((8, 3, 5), 1), ((4, 3, 5, 6), 1), ((8, 5, 3), -1), ((4, 5, 6, 3), -1)]
LAYOUT_IDS = [testing.layout_name(len(s), a) for s, a in LAYOUTS]
MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]
TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --- parity with the spec ---------------------------------------------------------------


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_functional_matches_spec(dtype, preset, shape, axis, train):
    testing.assert_matches_spec(run_functional, "torch", preset, shape, axis, dtype, train)


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_layer_matches_spec(preset, shape, axis, train):
    testing.assert_matches_spec(run_layer, "torch-layer", preset, shape, axis, "float64", train)


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("shape,axis", LAYOUTS[:3], ids=LAYOUT_IDS[:3])
@pytest.mark.parametrize("preset", PRESETS)
def test_builtin_runner_matches_spec_or_says_why(preset, shape, axis, train):
    if spec.preset(preset).running_var == "biased":
        with pytest.raises(testing.NotExpressible, match="unbiased"):
            run_builtin(testing.make_inputs(shape, axis), spec.preset(preset), axis, "float64", train)
    else:
        testing.assert_matches_spec(run_builtin, "torch.nn", preset, shape, axis, "float64", train)


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("shape,axis", [LAYOUTS[0], LAYOUTS[2], LAYOUTS[4]], ids=["NC", "NCHW", "NHWC"])
@pytest.mark.parametrize("runner", [run_functional, run_layer], ids=["functional", "layer"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_keeps_dtype_and_matches_spec(dtype, runner, shape, axis, train):
    inputs = testing.make_inputs(shape, axis)
    if runner is run_functional:  # output dtype straight from the backend, before NumPy
        x = torch.from_numpy(inputs["x"]).to(TORCH_DTYPES[dtype])
        y, rm, rv = batch_norm(x, None, None, torch.zeros(shape[axis]), torch.ones(shape[axis]), train=train, axis=axis)
        assert y.dtype == x.dtype and rm.dtype == rv.dtype == torch.float32  # buffers keep their dtype
    rounded = {k: torch.from_numpy(v).to(TORCH_DTYPES[dtype]).double().numpy() for k, v in inputs.items()}
    expected = testing.spec_run(rounded, spec.TORCH, axis, train)
    actual = runner(inputs, spec.TORCH, axis, dtype, train)
    # bfloat16 comes back as float32 arrays (NumPy has no bfloat16), so no dtype check here.
    testing.assert_close(actual, expected, context=f"torch, {dtype}", dtype=dtype, check_dtype=False)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("shape", [(5, 3), (3, 2, 3, 2)], ids=["NC", "NCHW"])
def test_gradcheck_functional(shape, affine):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3).requires_grad_()
    gamma = (torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    beta = torch.randn(shape[1], generator=g, dtype=torch.float64).requires_grad_() if affine else None
    rm, rv = torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64)

    def f(*args):
        return batch_norm(args[0], *(args[1:] if affine else (None, None)), rm, rv, train=True)[0]

    assert torch.autograd.gradcheck(f, (x, gamma, beta) if affine else (x,))


# --- properties --------------------------------------------------------------------------


def test_normalized_channels_have_zero_mean_unit_variance():
    x = torch.randn(64, 4, 5, 5, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1, 3.0]).view(1, 4, 1, 1) + 7
    y, _, _ = batch_norm(x, None, None, None, None, train=True, convention=spec.Convention(decay=0.9, eps=0.0))
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(y.var((0, 2, 3), unbiased=False), torch.ones(4, dtype=torch.float64))


def test_large_offset_small_spread_is_stable_in_float32():
    # E[x^2] - E[x]^2 would lose everything here (both terms ~1e8 in float32).
    x = 1e4 + 0.1 * torch.randn(256, 8, generator=torch.Generator().manual_seed(0))
    y, rm, rv = batch_norm(x, None, None, torch.zeros(8), torch.ones(8), train=True)
    torch.testing.assert_close(y.std(0, unbiased=False), torch.ones(8), rtol=1e-2, atol=0)
    torch.testing.assert_close(rv, 0.9 + 0.1 * x.double().var(0).float(), rtol=1e-2, atol=0)


def test_running_update_closed_form_after_one_step():
    x = torch.randn(10, 3, 4, dtype=torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    c = spec.Convention(decay=0.7, running_var="unbiased")
    _, new_rm, new_rv = batch_norm(x, None, None, rm, rv, train=True, convention=c)
    torch.testing.assert_close(new_rm, 0.7 * rm + 0.3 * x.mean((0, 2)))
    torch.testing.assert_close(new_rv, 0.7 * rv + 0.3 * x.var((0, 2), unbiased=True))


def test_decay_zero_makes_eval_equal_train():
    x = torch.randn(32, 5, dtype=torch.float64)
    c = spec.Convention(decay=0.0, running_var="biased")
    y_train, rm, rv = batch_norm(x, None, None, torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64),
                                 train=True, convention=c)
    y_eval, _, _ = batch_norm(x, None, None, rm, rv, train=False, convention=c)
    torch.testing.assert_close(y_eval, y_train)


def test_functional_never_mutates_its_arguments_and_returns_new_stats():
    args = [torch.randn(8, 3), torch.rand(3) + 0.5, torch.randn(3), torch.randn(3), torch.rand(3) + 0.5]
    before = [a.clone() for a in args]
    y, rm, rv = batch_norm(*args, train=True)
    assert all(torch.equal(a, b) for a, b in zip(args, before))
    assert rm is not args[3] and rv is not args[4] and rm.data_ptr() != args[3].data_ptr()


def test_running_update_is_not_in_the_autograd_graph():
    x = torch.randn(8, 3, requires_grad=True)
    gamma, beta = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    _, rm, rv = batch_norm(x, gamma, beta, torch.zeros(3), torch.ones(3), train=True)
    assert rm.grad_fn is None and rv.grad_fn is None and not rm.requires_grad and not rv.requires_grad
    layer = BatchNorm1d(3)
    layer(x).sum().backward()
    assert layer.running_mean.grad_fn is None and not layer.running_mean.requires_grad
    assert layer.running_var.grad_fn is None and not layer.running_var.requires_grad


def test_mode_is_explicit_not_grad_mode():
    x = torch.randn(8, 3)
    with torch.no_grad():  # d2l would switch to eval here; bnref must not
        y, rm, _ = batch_norm(x, None, None, torch.zeros(3), torch.ones(3), train=True)
    assert not torch.equal(rm, torch.zeros(3))
    torch.testing.assert_close(y.mean(0), torch.zeros(3), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: batch_norm(torch.randn(1, 3), None, None, None, None, train=True), "more than 1 value per channel"),
        (lambda: batch_norm(torch.randn(1, 3, 1, 1), None, None, None, None, train=True), "more than 1 value per channel"),
        (lambda: batch_norm(torch.randn(4, 3), torch.ones(2), None, None, None, train=True), "gamma must have shape"),
        (lambda: batch_norm(torch.randn(4, 3), None, None, torch.zeros(4), torch.ones(4), train=False), "running_mean"),
        (lambda: batch_norm(torch.randn(4, 3), None, None, torch.zeros(4), torch.ones(4), train=True), "running_mean"),
        (lambda: batch_norm(torch.randn(4), None, None, None, None, train=True), "rank >= 2"),
        (lambda: batch_norm(torch.randn(4, 3), None, None, torch.zeros(3), None, train=True), "both"),
        (lambda: batch_norm(torch.randn(4, 3), None, None, None, None, train=True, axis=2), "axis"),
        (lambda: batch_norm(torch.randn(4, 3), None, None, None, None, train=True, convention="nope"), "preset"),
    ],
    ids=["n1-NC", "n1-NCHW", "gamma-C", "eval-stats-C", "train-stats-C", "rank1", "half-stats", "axis", "preset"],
)
def test_functional_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- drop-in parity with torch.nn ------------------------------------------------------------

BN_CASES = [  # (bnref class, torch.nn class, input shape)
    pytest.param(BatchNorm1d, torch.nn.BatchNorm1d, (16, 4), id="1d-NC"),
    pytest.param(BatchNorm1d, torch.nn.BatchNorm1d, (8, 4, 5), id="1d-NCL"),
    pytest.param(BatchNorm2d, torch.nn.BatchNorm2d, (6, 4, 3, 5), id="2d-NCHW"),
    pytest.param(BatchNorm3d, torch.nn.BatchNorm3d, (4, 4, 2, 3, 2), id="3d-NCDHW"),
]


def _pair(ours_cls, theirs_cls, dtype, **kw):
    ours = ours_cls(4, dtype=dtype, **kw)
    theirs = theirs_cls(4, dtype=dtype, **kw)
    if ours.weight is not None:  # non-trivial affine parameters, the same in both
        with torch.no_grad():
            for m in (ours, theirs):
                m.weight.copy_(torch.linspace(0.5, 2.0, 4, dtype=dtype))
                m.bias.copy_(torch.linspace(-1.0, 1.0, 4, dtype=dtype))
    return ours, theirs


def _compare_layers(ours, theirs, context, dtype):
    actual = {k: v.detach().double().numpy() for k, v in ours.state_dict().items()}
    expected = {k: v.detach().double().numpy() for k, v in theirs.state_dict().items()}
    assert actual.keys() == expected.keys()
    testing.assert_close(actual, expected, context=context, dtype=dtype, check_dtype=False)


@pytest.mark.parametrize("track", [True, False], ids=["track", "no-track"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("momentum", [0.1, 0.3, None], ids=["m0.1", "m0.3", "cumulative"])
@pytest.mark.parametrize("ours_cls,theirs_cls,shape", BN_CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_layer_matches_torch_nn_over_steps(dtype, ours_cls, theirs_cls, shape, momentum, affine, track):
    tdtype = TORCH_DTYPES[dtype]
    ours, theirs = _pair(ours_cls, theirs_cls, tdtype, momentum=momentum, affine=affine, track_running_stats=track)
    g = torch.Generator().manual_seed(1)
    for step in range(3):  # train: outputs, all gradients and buffers after each step
        x = (torch.randn(shape, generator=g, dtype=tdtype) * 3 + 2).requires_grad_()
        dy = torch.randn(shape, generator=g, dtype=tdtype)
        results = []
        for m in (ours, theirs):
            m.train()
            y = m(x)
            params = [p for p in (x, m.weight, m.bias) if p is not None]
            grads = torch.autograd.grad((y * dy).sum(), params)
            results.append({"y": y.detach().numpy(), **{f"d{i}": gr.numpy() for i, gr in enumerate(grads)}})
        testing.assert_close(results[0], results[1], context=f"vs torch.nn, train step {step}", dtype=dtype)
        _compare_layers(ours, theirs, f"vs torch.nn, state after step {step}", dtype)
    if track:
        assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 3
    x = torch.randn(shape, generator=g, dtype=tdtype) * 3 + 2
    ours.eval(), theirs.eval()
    testing.assert_close({"y": ours(x).detach().numpy()}, {"y": theirs(x).detach().numpy()},
                         context="vs torch.nn, eval", dtype=dtype)
    _compare_layers(ours, theirs, "vs torch.nn, state after eval", dtype)


@pytest.mark.parametrize("direction", ["torch.nn->bnref", "bnref->torch.nn"])
@pytest.mark.parametrize("ours_cls,theirs_cls,shape", BN_CASES[1:3])
def test_state_dict_round_trips_with_torch_nn(ours_cls, theirs_cls, shape, direction):
    src, dst = (theirs_cls(4), ours_cls(4)) if direction == "torch.nn->bnref" else (ours_cls(4), theirs_cls(4))
    with torch.no_grad():
        src.weight.uniform_(0.5, 2.0)
        src.bias.uniform_(-1, 1)
    for _ in range(3):
        src(torch.randn(shape) * 2 + 1)
    dst.load_state_dict(src.state_dict())  # strict: same keys
    assert int(dst.num_batches_tracked) == 3
    for name, t in src.state_dict().items():
        assert torch.equal(dst.state_dict()[name], t), name
    x = torch.randn(shape) * 2 + 1
    src.eval(), dst.eval()
    testing.assert_close({"y": dst(x).detach().numpy()}, {"y": src(x).detach().numpy()},
                         context=f"eval after load {direction}", dtype="float32")


def test_constructor_signature_is_torch_nns_plus_convention():
    ours = inspect.signature(BatchNorm2d.__init__).parameters
    theirs = inspect.signature(torch.nn.BatchNorm2d.__init__).parameters
    assert list(ours) == list(theirs) + ["convention"]
    for name, p in theirs.items():
        assert ours[name].kind == p.kind, name
        if name not in ("eps", "momentum"):  # those default to the convention's (1e-5 / 0.1 for torch)
            assert ours[name].default == p.default, name
    ours_layer, theirs_layer = BatchNorm2d(5, bias=False), torch.nn.BatchNorm2d(5, bias=False)
    assert (ours_layer.eps, ours_layer.momentum) == (theirs_layer.eps, theirs_layer.momentum) == (1e-5, 0.1)
    assert ours_layer.extra_repr() == theirs_layer.extra_repr()
    assert ours_layer.state_dict().keys() == theirs_layer.state_dict().keys()


def test_explicit_eps_and_momentum_override_the_convention():
    layer = BatchNorm1d(3, eps=1e-3, momentum=0.25, convention="flax")
    assert layer.convention == spec.Convention(decay=0.75, eps=1e-3, running_var="biased")
    d2l = BatchNorm1d(3, convention=spec.D2L)
    assert (d2l.eps, d2l.momentum, d2l.convention) == (1e-5, 0.1, spec.D2L)
    assert "running_var='biased'" in d2l.extra_repr()


def test_d2l_convention_keeps_biased_running_var_unlike_torch_nn():
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 2 + 1
    ours = BatchNorm2d(3, convention="d2l", dtype=torch.float64)
    theirs = torch.nn.BatchNorm2d(3, momentum=0.1, dtype=torch.float64)
    ours(x), theirs(x)
    _, expected_rm, expected_rv = spec.batch_norm_train(x.numpy(), None, None, np.zeros(3), np.ones(3), spec.D2L)
    testing.assert_close({"running_mean": ours.running_mean.numpy(), "running_var": ours.running_var.numpy()},
                         {"running_mean": expected_rm, "running_var": expected_rv}, context="d2l layer", dtype="float64")
    n = x.numel() // 3
    torch.testing.assert_close(theirs.running_var - 0.9, (ours.running_var - 0.9) * n / (n - 1))  # Bessel
    assert not torch.allclose(ours.running_var, theirs.running_var)


BAD_INPUTS = [  # (bnref class, torch.nn class, input, training)
    pytest.param(BatchNorm1d, torch.nn.BatchNorm1d, (2, 4, 3, 3), True, id="1d-rank4"),
    pytest.param(BatchNorm1d, torch.nn.BatchNorm1d, (4,), True, id="1d-rank1"),
    pytest.param(BatchNorm2d, torch.nn.BatchNorm2d, (2, 4, 3), True, id="2d-rank3"),
    pytest.param(BatchNorm1d, torch.nn.BatchNorm1d, (5, 3), True, id="1d-channels-train"),
    pytest.param(BatchNorm1d, torch.nn.BatchNorm1d, (5, 3), False, id="1d-channels-eval"),
    pytest.param(BatchNorm2d, torch.nn.BatchNorm2d, (2, 5, 3, 3), True, id="2d-channels-train"),
    pytest.param(BatchNorm1d, torch.nn.BatchNorm1d, (1, 4), True, id="1d-one-value"),
    pytest.param(BatchNorm1d, torch.nn.BatchNorm1d, (1, 4, 1), True, id="1d-one-value-NCL"),
    pytest.param(BatchNorm2d, torch.nn.BatchNorm2d, (1, 4, 1, 1), True, id="2d-one-value"),
]


@pytest.mark.parametrize("ours_cls,theirs_cls,shape,training", BAD_INPUTS)
def test_bad_input_raises_like_torch_nn_and_changes_nothing(ours_cls, theirs_cls, shape, training):
    x = torch.randn(shape)
    ours, theirs = ours_cls(4), theirs_cls(4).train(training)
    good_rank = {BatchNorm1d: 2, BatchNorm2d: 4, BatchNorm3d: 5}[ours_cls]
    ours(torch.randn((8, 4) + (3,) * (good_rank - 2)) + 5)  # non-default state first
    ours.train(training)
    with pytest.raises(Exception) as theirs_error:
        theirs(x)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(theirs_error.type):
        ours(x)
    after = ours.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # num_batches_tracked included


def test_one_value_per_channel_is_fine_in_eval():
    ours, theirs = BatchNorm1d(4).eval(), torch.nn.BatchNorm1d(4).eval()
    x = torch.randn(1, 4)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("track", [True, False], ids=["track", "no-track"])
def test_eval_leaves_state_bit_identical(track):
    layer = BatchNorm2d(3, track_running_stats=track)
    layer(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.eval()
    layer(torch.randn(4, 3, 2, 2))
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def test_no_tracking_uses_batch_statistics_in_eval():
    layer = BatchNorm1d(3, track_running_stats=False).eval()
    assert layer.running_mean is None and layer.num_batches_tracked is None
    y = layer(torch.randn(50, 3) * 4 + 9)
    torch.testing.assert_close(y.mean(0), torch.zeros(3), atol=1e-5, rtol=0)


def test_half_input_keeps_float32_buffers_and_half_output():
    layer = BatchNorm2d(3)  # float32 buffers, as torch.nn's
    y = layer(torch.randn(4, 3, 5, 5).to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and layer.running_var.dtype == torch.float32
    half = BatchNorm2d(3, dtype=torch.float16)
    assert half(torch.randn(4, 3, 5, 5).half()).dtype == half.running_mean.dtype == torch.float16


def test_reset_running_stats_and_parameters():
    layer = BatchNorm1d(3)
    with torch.no_grad():
        layer.weight.fill_(3)
    layer(torch.randn(8, 3) + 5)
    layer.reset_running_stats()
    assert torch.equal(layer.running_mean, torch.zeros(3)) and int(layer.num_batches_tracked) == 0
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.ones(3)) and torch.equal(layer.bias, torch.zeros(3))


def test_buffers_move_and_cast_with_to():
    layer = BatchNorm1d(3).to(torch.float64)
    assert layer.running_mean.dtype == layer.weight.dtype == torch.float64
    assert layer.num_batches_tracked.dtype == torch.int64
    assert layer(torch.randn(4, 3, dtype=torch.float64)).dtype == torch.float64


# --- LeNet-BN ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bn", ["bnref", "builtin", "none"])
def test_lenet_output_shape(bn):
    model = LeNetBN(bn=bn)
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)
    assert [name for name, _ in model.named_children()] == ["conv1", "bn1", "conv2", "bn2", "fc1", "bn3", "fc2",
                                                            "bn4", "fc3"]


def test_lenet_state_dict_keys_match_between_bnref_and_builtin():
    ours, theirs = LeNetBN(bn="bnref").state_dict(), LeNetBN(bn="builtin").state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    LeNetBN(bn="bnref").load_state_dict(theirs)


def test_lenet_without_bn_has_no_bn_state():
    keys = LeNetBN(bn="none").state_dict().keys()
    assert not any(k.startswith("bn") for k in keys)
    assert isinstance(LeNetBN(bn="none").bn1, torch.nn.Identity)


def test_lenet_builtin_uses_the_conventions_momentum_and_eps():
    model = LeNetBN(bn="builtin", convention="keras")
    assert isinstance(model.bn1, torch.nn.BatchNorm2d) and isinstance(model.bn3, torch.nn.BatchNorm1d)
    assert model.bn1.momentum == pytest.approx(0.01) and model.bn1.eps == 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_layer_runs_on_cuda_like_on_cpu():
    cpu = BatchNorm2d(3, convention="d2l")
    gpu = BatchNorm2d(3, convention="d2l").to("cuda")
    x = torch.randn(8, 3, 5, 5)
    for _ in range(2):
        y_cpu, y_gpu = cpu(x), gpu(x.cuda())
    assert y_gpu.device.type == "cuda" and gpu.running_var.device.type == "cuda"
    torch.testing.assert_close(y_gpu.cpu(), y_cpu)
    torch.testing.assert_close(gpu.running_var.cpu(), cpu.running_var)


# --- the axis rule, shared with the spec and the JAX backend ---------------------------------


@pytest.mark.parametrize("axis", [np.int64(1), np.int32(-1), np.intp(1)], ids=["np.int64(1)", "np.int32(-1)", "np.intp(1)"])
def test_functional_axis_accepts_numpy_integers_like_the_spec(axis):
    """b02e4a9: spec.batch_norm_train took axis=np.int64(1), bnref.torch.batch_norm refused it."""
    ax = int(axis)
    i = testing.make_inputs((4, 3, 5) if ax == 1 else (4, 5, 3), ax, seed=3)
    t = {k: torch.from_numpy(v) for k, v in i.items()}
    args = (t["x"], t["gamma"], t["beta"], t["running_mean"], t["running_var"])
    got = batch_norm(*args, train=True, axis=axis)
    want = batch_norm(*args, train=True, axis=ax)
    for name, a, b in zip(("y", "running_mean", "running_var"), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    y_spec = spec.batch_norm_train(i["x"], i["gamma"], i["beta"], i["running_mean"], i["running_var"], "torch", axis=axis)[0]
    np.testing.assert_allclose(got[0].numpy(), y_spec, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("axis", [True, np.bool_(True), 1.0, "1", torch.tensor(1)],
                         ids=["True", "np.bool_(True)", "1.0", "'1'", "tensor(1)"])
def test_functional_axis_refuses_what_the_spec_refuses(axis):
    with pytest.raises(ValueError, match="axis must be an int"):
        batch_norm(torch.randn(4, 3, 5), None, None, None, None, train=True, axis=axis)


# --- float32 means near overflow --------------------------------------------------------------

HUGE_SHAPES = [(4096, 3), (4096, 3, 2), (8, 3, 4096), (64, 3, 8, 8)]
HUGE_IDS = ["x".join(map(str, s)) for s in HUGE_SHAPES]


def _huge_batch(shape):
    """float32 values 1e35 + N(0, 1e29): a sum of 4096 of them (4e38) overflows float32."""
    g = torch.Generator().manual_seed(0)
    return torch.full(shape, 1e35) + torch.randn(shape, generator=g) * 1e29, torch.randn(shape, generator=g)


def _huge_run(path, x, dy):
    """``(y, dx, running_mean, running_var)`` of one training step of bnref on ``x``."""
    gamma, beta = torch.tensor([1.5, 0.5, 2.0]), torch.tensor([0.25, -1.0, 3.0])
    if path in ("layer", "scripted"):
        layer = (BatchNorm1d if x.dim() < 4 else BatchNorm2d)(3)
        with torch.no_grad():
            layer.weight.copy_(gamma), layer.bias.copy_(beta)
        call = torch.jit.script(layer) if path == "scripted" else layer
        x = x.clone().requires_grad_()
        y = call(x)
        y.backward(dy)
        return y.detach(), x.grad, layer.running_mean, layer.running_var

    def loss(x):
        y, rm, rv = batch_norm(x, gamma, beta, torch.zeros(3), torch.ones(3), train=True)
        return (y * dy).sum(), (y, rm, rv)

    if path == "composite":  # under a torch.func transform: the composite path
        dx, (y, rm, rv) = torch.func.grad(loss, has_aux=True)(x)
        return y, dx, rm, rv
    x = x.clone().requires_grad_()
    (_, (y, rm, rv)) = loss(x)
    y.backward(dy)
    return y.detach(), x.grad, rm, rv


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")  # the scripted path
@pytest.mark.parametrize("path", ["layer", "functional", "composite", "scripted"])
@pytest.mark.parametrize("shape", HUGE_SHAPES, ids=HUGE_IDS)
def test_float32_mean_near_overflow_stays_finite(shape, path):
    """b02e4a9: at (4096, 3), (4096, 3, 2) and (8, 3, 4096) one level of the channel mean summed
    4096 values of 1e35 in float32 and overflowed: NaN output and gradient, inf running mean.
    Now the mean is finite on every path. The variance (~1e58) is beyond float32 here, as in
    torch.nn: 1/sqrt(var) is 0, so the output is beta, the gradient 0, the running variance inf."""
    x, dy = _huge_batch(shape)
    y, dx, rm, rv = _huge_run(path, x, dy)
    bshape = [1] * x.dim()
    bshape[1] = 3
    torch.testing.assert_close(y, torch.tensor([0.25, -1.0, 3.0]).view(bshape).expand_as(x), msg=f"y ({path})")
    torch.testing.assert_close(dx, torch.zeros_like(x), msg=f"dx ({path})")
    dims = [0] + list(range(2, x.dim()))
    torch.testing.assert_close(rm.double(), 0.1 * x.double().mean(dims), rtol=1e-6, atol=0, msg=f"running_mean ({path})")
    assert torch.isinf(rv).all(), f"running_var ({path}): {rv}"


# torch.nn on one CPU thread is itself NaN at (4096, 3) (float32 sums in that kernel; finite
# with 2 threads), so the side-by-side comparison leaves that shape out.
@pytest.mark.parametrize("shape", HUGE_SHAPES[1:], ids=HUGE_IDS[1:])
def test_float32_mean_near_overflow_matches_torch_nn(shape):
    x, dy = _huge_batch(shape)
    ref = (torch.nn.BatchNorm1d if x.dim() < 4 else torch.nn.BatchNorm2d)(3)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([1.5, 0.5, 2.0])), ref.bias.copy_(torch.tensor([0.25, -1.0, 3.0]))
    xr = x.clone().requires_grad_()
    y_ref = ref(xr)
    y_ref.backward(dy)
    assert torch.isfinite(y_ref).all() and torch.isfinite(ref.running_mean).all()  # the premise
    y, dx, rm, rv = _huge_run("layer", x, dy)
    torch.testing.assert_close(y, y_ref.detach(), msg="y")
    torch.testing.assert_close(dx, xr.grad, msg="dx")
    torch.testing.assert_close(rm, ref.running_mean, rtol=1e-6, atol=0, msg="running_mean")
    torch.testing.assert_close(rv, ref.running_var, msg="running_var")  # inf in both


@pytest.mark.parametrize("shape", HUGE_SHAPES, ids=HUGE_IDS)
def test_non_finite_input_still_gives_nan_not_a_rescued_mean(shape):
    """The overflow recomputation must not hide bad input: inf or NaN in x gives a NaN output."""
    x, _ = _huge_batch(shape)
    x = x / 1e35
    x.view(-1)[5] = float("nan")
    y, rm, _ = batch_norm(x, None, None, torch.zeros(3), torch.ones(3), train=True)
    assert torch.isnan(rm).any() and torch.isnan(y).any()


# --- the dtype rule: torch.nn's on the CPU -------------------------------------------------------

DTYPE_NAMES = ["float16", "bfloat16", "float32", "float64"]


def _dtype_pair(x_dtype, param_dtype, buffer_dtype, training):
    """bnref's and torch.nn's BatchNorm2d, identical, with weight/bias in ``param_dtype`` (None:
    affine=False) and the running statistics in ``buffer_dtype``."""
    layers = []
    for cls in (BatchNorm2d, torch.nn.BatchNorm2d):
        m = cls(3, affine=param_dtype is not None).train(training)
        with torch.no_grad():
            if param_dtype is not None:
                m.weight.data = torch.tensor([1.5, 0.5, 2.0], dtype=TORCH_DTYPES[param_dtype])
                m.bias.data = torch.tensor([0.25, -1.0, 3.0], dtype=TORCH_DTYPES[param_dtype])
            m.running_mean = torch.tensor([0.5, -0.5, 1.0], dtype=TORCH_DTYPES[buffer_dtype])
            m.running_var = torch.tensor([2.0, 0.5, 1.5], dtype=TORCH_DTYPES[buffer_dtype])
        layers.append(m)
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0)).to(TORCH_DTYPES[x_dtype])
    return layers, x


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("buffer_dtype", DTYPE_NAMES, ids=[f"buffers-{d}" for d in DTYPE_NAMES])
@pytest.mark.parametrize("param_dtype", DTYPE_NAMES + [None], ids=[f"params-{d}" for d in DTYPE_NAMES] + ["no-affine"])
@pytest.mark.parametrize("x_dtype", DTYPE_NAMES, ids=[f"x-{d}" for d in DTYPE_NAMES])
def test_dtype_matrix_accepts_and_refuses_like_torch_nn(x_dtype, param_dtype, buffer_dtype, training):
    """b02e4a9 accepted a float16/bfloat16 input with float64 or bfloat16/float16 parameters,
    which torch.nn on the CPU refuses ("mixed dtype"). Now: refused exactly where torch.nn
    refuses, with RuntimeError, before any state changes; where both run, the same output and
    buffers, in the same dtypes."""
    (ours, theirs), x = _dtype_pair(x_dtype, param_dtype, buffer_dtype, training)
    try:
        y_ref = theirs(x)
    except RuntimeError:
        y_ref = None
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    if y_ref is None:
        with pytest.raises(RuntimeError, match="mixed dtype"):
            ours(x)
        for k, v in ours.state_dict().items():  # nothing changed, num_batches_tracked included
            assert torch.equal(v, before[k]) and v.dtype == before[k].dtype, k
        return
    y = ours(x)
    assert y.dtype == y_ref.dtype == x.dtype
    tol = {"float16": 1e-2, "bfloat16": 5e-2, "float32": 1e-5, "float64": 1e-10}[x_dtype]
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    for k, v in theirs.state_dict().items():
        assert ours.state_dict()[k].dtype == v.dtype, k
        torch.testing.assert_close(ours.state_dict()[k], v, rtol=tol, atol=tol, msg=k)


CITING_MODULES = ["bnref/torch/functional.py", "bnref/torch/layers.py", "bnref/jax/functional.py",
                  "bnref/jax/layers.py", "bnref/spec.py"]


@pytest.mark.parametrize("module", CITING_MODULES)
def test_cited_test_files_exist(module):
    """b02e4a9: bnref/torch/functional.py sent readers to tests/test_torch_autograd.py, which
    does not exist."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    cited = set(re.findall(r"tests/test_\w+\.py", (root / module).read_text()))
    missing = sorted(c for c in cited if not (root / c).is_file())
    assert not missing, f"{module} cites {missing}"
