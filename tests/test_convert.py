"""bnref.convert: one LeNet-BN, two frameworks — same logits, same loss, same gradients."""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from bnref import convert, spec
from bnref.jax.models import LeNetBN as FlaxLeNetBN
from bnref.torch.models import LeNetBN as TorchLeNetBN

ATOL32 = 1e-5  # float32: logits, loss and gradients of a converted model agree to this


def _torch_model(bn, seed=0):
    torch.manual_seed(seed)
    model = TorchLeNetBN(bn=bn, convention=spec.D2L)
    if bn != "none":  # move the running statistics away from (0, 1) so conversion is visible
        model.train()
        with torch.no_grad():
            for i in range(3):
                model(torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(i)))
    return model


def _batch(seed=0, n=16):
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, n)


@pytest.mark.parametrize("bn", ["bnref", "builtin", "none"])
def test_torch_flax_torch_is_the_identity(bn):
    model = _torch_model(bn)
    sd = model.state_dict()
    count = int(sd["bn1.num_batches_tracked"]) if bn != "none" else 0
    back = convert.flax_to_torch(convert.torch_to_flax(sd), num_batches_tracked=count, as_torch=True)
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype, k
        assert torch.equal(back[k], sd[k]), k
    TorchLeNetBN(bn=bn).load_state_dict(back)  # strict load works


@pytest.mark.parametrize("bn", ["bnref", "builtin", "none"])
def test_converted_model_gives_same_eval_logits(bn):
    model = _torch_model(bn).eval()
    x, _ = _batch()
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    variables = convert.torch_to_flax(model.state_dict())
    got = FlaxLeNetBN(bn=bn, convention=spec.D2L).apply(variables, x.transpose(0, 2, 3, 1), train=False)
    np.testing.assert_allclose(np.asarray(got), want, atol=ATOL32, rtol=0)


@pytest.mark.parametrize("bn", ["bnref", "none"])
def test_converted_model_gives_same_loss_gradients_and_stats_in_training(bn):
    model = _torch_model(bn).train()
    x, y = _batch(1, n=32)
    variables = convert.torch_to_flax(model.state_dict())
    loss_t = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
    loss_t.backward()
    fmodel = FlaxLeNetBN(bn=bn, convention=spec.D2L)
    stats = variables.get("batch_stats", {})

    def loss_fn(params):
        logits, updates = fmodel.apply({"params": params, **({"batch_stats": stats} if stats else {})},
                                       x.transpose(0, 2, 3, 1), train=True, mutable=["batch_stats"])  # fmt: skip
        onehot = jax.nn.one_hot(y, 10)
        return -(jax.nn.log_softmax(logits) * onehot).sum(-1).mean(), updates

    (loss_j, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    assert abs(float(loss_j) - loss_t.item()) < ATOL32
    new_stats = updates.get("batch_stats", {})
    grads_t = convert.flax_to_torch({"params": grads, **({"batch_stats": new_stats} if bn != "none" else {})})
    for name, p in model.named_parameters():
        np.testing.assert_allclose(grads_t[name], p.grad.numpy(), atol=ATOL32, rtol=1e-4, err_msg=f"grad {name}")
    for name, buf in model.state_dict().items():
        if name.endswith(("running_mean", "running_var")):
            np.testing.assert_allclose(grads_t[name], buf.numpy(), atol=ATOL32, rtol=1e-5, err_msg=name)


def test_single_torch_nn_batchnorm_layer_ports_to_flax():
    import flax.linen as nn

    layer = torch.nn.BatchNorm2d(5, momentum=0.1)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
        for i in range(3):
            layer(torch.randn(8, 5, 4, 4) * 3 + 2)
    layer.eval()
    x = torch.randn(4, 5, 6, 6)
    want = layer(x).detach().numpy()
    variables = convert.batch_norm_torch_to_flax(layer.state_dict())
    flax_bn = nn.BatchNorm(use_running_average=True, momentum=spec.Convention.from_torch(0.1).flax_momentum, epsilon=layer.eps)
    got = flax_bn.apply(variables, x.numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=1e-5)
    back = convert.batch_norm_flax_to_torch(variables, num_batches_tracked=int(layer.num_batches_tracked))
    fresh = torch.nn.BatchNorm2d(5)
    fresh.load_state_dict({k: torch.as_tensor(v) for k, v in back.items()})
    fresh.eval()
    assert torch.equal(fresh(x), layer(x))


# --- bad input: a clear error naming the key, nothing half-converted ------------------------


def _state():
    return {k: v.clone() for k, v in _torch_model("bnref").state_dict().items()}


def _drop(sd, key):
    del sd[key]
    return sd


def _add(sd, key, value):
    sd[key] = value
    return sd


BAD_TORCH = {
    "missing": (lambda sd: _drop(sd, "bn3.running_var"), "missing key 'bn3.running_var'"),
    "extra": (lambda sd: _add(sd, "fc4.weight", torch.zeros(3)), "unexpected key 'fc4.weight'"),
    "extra counter": (lambda sd: _add(sd, "bn9.num_batches_tracked", torch.tensor(0)), "unexpected key 'bn9.num_batches_tracked'"),
    "misshapen conv": (lambda sd: _add(sd, "conv2.weight", torch.zeros(16, 6, 3, 3)), r"'conv2.weight' has shape \(16, 6, 3, 3\), expected \(16, 6, 5, 5\)"),
    "misshapen stat": (lambda sd: _add(sd, "bn2.running_mean", torch.zeros(6)), r"'bn2.running_mean' has shape \(6,\), expected \(16,\)"),
}


@pytest.mark.parametrize("name", sorted(BAD_TORCH))
def test_torch_to_flax_rejects_bad_state_dicts(name):
    corrupt, message = BAD_TORCH[name]
    sd = corrupt(_state())
    snapshot = {k: v.clone() for k, v in sd.items()}
    with pytest.raises(ValueError, match=message):
        convert.torch_to_flax(sd)
    assert list(sd) == list(snapshot) and all(torch.equal(sd[k], snapshot[k]) for k in sd)


def _variables():
    return convert.torch_to_flax(_state())


BAD_FLAX = {
    "missing param": (lambda v: v["params"]["fc2"].pop("bias"), "missing key 'fc2/bias'"),
    "extra param": (lambda v: v["params"].__setitem__("fc4", {"kernel": np.zeros(3), "bias": np.zeros(3)}), "unexpected key 'fc4/bias'"),
    "missing stats": (lambda v: v.pop("batch_stats"), "missing collection 'batch_stats'"),
    "missing stat": (lambda v: v["batch_stats"]["bn4"].pop("var"), "missing key 'bn4/var'"),
    "extra collection": (lambda v: v.__setitem__("cache", {}), "unexpected collection 'cache'"),
    "misshapen kernel": (lambda v: v["params"]["fc1"].__setitem__("kernel", np.zeros((120, 256))), r"params/fc1/kernel' has shape \(120, 256\), expected \(256, 120\)"),
    "misshapen scale": (lambda v: v["params"]["bn1"].__setitem__("scale", np.zeros(5)), r"params/bn1/scale has shape \(5,\), expected \(6,\)"),
}


@pytest.mark.parametrize("name", sorted(BAD_FLAX))
def test_flax_to_torch_rejects_bad_variables(name):
    corrupt, message = BAD_FLAX[name]
    v = _variables()
    corrupt(v)
    with pytest.raises(ValueError, match=message):
        convert.flax_to_torch(v)


def test_trajectory_agrees_for_20_steps():
    from bnref.parity import trajectory

    report = trajectory(20, dtype="float32", lr=1.0, batch_size=64)
    assert len(report["rows"]) == 20
    assert report["passed"], report["max_loss_diff"]
    assert report["max_loss_diff"] < 1e-3
    assert all(r["weight_diff"] < 1e-3 for r in report["rows"])
    assert report["rows"][-1]["loss_torch"] < report["rows"][0]["loss_torch"]  # it is training


# ---- any model: torch_to_flax(torch_module, flax_module, sample_input) and back ----

import flax.linen as nn  # noqa: E402
from torch import nn as tnn  # noqa: E402


class TorchCNN(tnn.Module):
    """A model bnref has never seen: Sequential paths, a conv without bias, max pooling, ReLU,
    nn.Flatten and a BatchNorm1d after the flatten's Linear."""

    def __init__(self, pool=2):
        super().__init__()
        self.features = tnn.Sequential(
            tnn.Conv2d(3, 8, 3, padding=1), tnn.BatchNorm2d(8), tnn.ReLU(), tnn.MaxPool2d(pool),
            tnn.Conv2d(8, 16, 3, padding=1, bias=False), tnn.BatchNorm2d(16), tnn.ReLU(), tnn.MaxPool2d(2),
        )  # fmt: skip
        self.head = tnn.Sequential(tnn.Flatten(), tnn.Linear(16 * 4 * 4, 32), tnn.BatchNorm1d(32), tnn.ReLU(),
                                   tnn.Linear(32, 10))  # fmt: skip

    def forward(self, x):
        return self.head(self.features(x))


class FlaxCNN(nn.Module):
    """Its Flax port, with torch's layer names as Flax names (``features.0`` -> ``features_0``)."""

    momentum: float = 0.9
    epsilon: float = 1e-5
    padding: int = 1

    @nn.compact
    def __call__(self, x, train: bool):
        def bn(name):
            return nn.BatchNorm(use_running_average=not train, momentum=self.momentum, epsilon=self.epsilon, name=name)

        x = nn.Conv(8, (3, 3), padding=self.padding, name="features_0")(x)
        x = nn.max_pool(nn.relu(bn("features_1")(x)), (2, 2), (2, 2))
        x = nn.Conv(16, (3, 3), padding=1, use_bias=False, name="features_4")(x)
        x = nn.max_pool(nn.relu(bn("features_5")(x)), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)  # NHWC flatten: another order than torch's
        x = nn.relu(bn("head_2")(nn.Dense(32, name="head_1")(x)))
        return nn.Dense(10, name="head_4")(x)


class FlaxCNNAutoNames(nn.Module):
    """The same port written the Flax way: automatic names (Conv_0, BatchNorm_0, ...);
    ``head_bn=False`` forgets the BatchNorm1d."""

    head_bn: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3), padding=1)(x)
        x = nn.max_pool(nn.relu(nn.BatchNorm(use_running_average=not train)(x)), (2, 2), (2, 2))
        x = nn.Conv(16, (3, 3), padding=1, use_bias=False)(x)
        x = nn.max_pool(nn.relu(nn.BatchNorm(use_running_average=not train)(x)), (2, 2), (2, 2))
        x = nn.Dense(32)(x.reshape(x.shape[0], -1))
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x) if self.head_bn else x)
        return nn.Dense(10)(x)


class TorchConv1d(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv = tnn.Conv1d(4, 6, 5)
        self.bn = tnn.BatchNorm1d(6)
        self.fc = tnn.Linear(6 * 12, 3)

    def forward(self, x):  # (N, 4, 16)
        return self.fc(torch.flatten(torch.tanh(self.bn(self.conv(x))), 1))


class FlaxConv1d(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):  # (N, 16, 4)
        x = nn.Conv(6, (5,), padding="VALID", name="conv")(x)
        x = jnp.tanh(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x))
        return nn.Dense(3, name="fc")(x.reshape(x.shape[0], -1))


def _trained(model, shape, seed=0):
    """``model`` with its weights and running statistics moved away from their initial values."""
    torch.manual_seed(seed)
    model.train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for i in range(3):
            model(2 * torch.randn(16, *shape) + 1)
    return model.eval()


def _sample(shape, n=8, seed=1):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


MODELS = {
    "cnn": (TorchCNN, FlaxCNN, (3, 16, 16)),
    "cnn, automatic Flax names": (TorchCNN, FlaxCNNAutoNames, (3, 16, 16)),
    "conv1d": (TorchConv1d, FlaxConv1d, (4, 16)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_any_model_converts_with_equal_eval_logits_and_round_trips(name):
    make_torch, make_flax, shape = MODELS[name]
    tm, fm = _trained(make_torch(), shape), make_flax()
    x = _sample(shape)
    snapshot = {k: v.clone() for k, v in tm.state_dict().items()}
    variables = convert.torch_to_flax(tm, fm, x)
    assert tm.training is False and all(torch.equal(v, snapshot[k]) for k, v in tm.state_dict().items())
    x_new = _sample(shape, n=5, seed=7)  # other inputs than the sample the orders were found on
    with torch.no_grad():
        want = tm(torch.from_numpy(x_new)).numpy()
    got = np.asarray(fm.apply(variables, convert.channels_last(x_new), train=False))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert all(np.asarray(a).dtype == np.float32 for a in jax.tree.leaves(variables))

    back = convert.flax_to_torch(fm, variables, tm, x)
    assert list(back) == list(snapshot)
    for k, v in snapshot.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    fresh = _trained(make_torch(), shape, seed=5)  # other weights: the Flax variables win
    fresh.load_state_dict(back)
    with torch.no_grad():
        np.testing.assert_allclose(fresh(torch.from_numpy(x_new)).numpy(), want, atol=1e-6, rtol=0)


def test_lenet_converts_through_the_general_path_as_through_its_state_dict():
    tm = _torch_model("bnref").eval()
    x, _ = _batch(n=8)
    general = convert.torch_to_flax(tm, FlaxLeNetBN(bn="bnref", convention=spec.D2L), x)
    known = convert.torch_to_flax(tm.state_dict())
    assert jax.tree.structure(general) == jax.tree.structure(known)
    for a, b in zip(jax.tree.leaves(general), jax.tree.leaves(known)):
        np.testing.assert_array_equal(a, b)


def test_unmatched_layers_are_listed():
    with pytest.raises(ValueError, match=r"no partner(.|\n)*torch 'head.2' \(bn(.|\n)*flax 'Dense_1'"):
        convert.torch_to_flax(TorchCNN().eval(), FlaxCNNAutoNames(head_bn=False), _sample((3, 16, 16)))


def test_a_port_that_computes_something_else_is_named_at_its_first_layer():
    tm, x = _trained(TorchCNN(), (3, 16, 16)), _sample((3, 16, 16))
    with pytest.raises(ValueError, match=r"input of torch 'features.1' <-> Flax 'features_1' has shape"):
        convert.torch_to_flax(tm, FlaxCNN(padding=0), x)  # padding 0 in Flax: shapes differ, caught at BN's input
    with pytest.raises(ValueError, match=r"input of torch 'features.4' <-> Flax 'features_4' differs"):
        convert.torch_to_flax(tm, FlaxCNN(epsilon=1e-3), x)  # eps 1e-3: values differ after the first BN
    variables = convert.torch_to_flax(tm, FlaxCNN(epsilon=1e-3), x, check=False)  # weights still convert
    assert variables["params"]["features_0"]["kernel"].shape == (3, 3, 3, 8)


@pytest.mark.parametrize("case", ["unsupported layer", "bias mismatch", "no running stats", "bad sample"])
def test_models_the_converter_cannot_convert_are_clear_errors(case):
    tm, fm, x = TorchCNN().eval(), FlaxCNN(), _sample((3, 16, 16))
    if case == "unsupported layer":
        tm.features[2] = tnn.PReLU()  # holds a parameter bnref.convert does not know
        match = r"does not convert: 'features.2' \(PReLU\)"
    elif case == "bias mismatch":
        tm.features[0] = tnn.Conv2d(3, 8, 3, padding=1, bias=False)
        match = r"Flax layer has params/bias and the torch layer has no bias"
    elif case == "no running stats":
        tm.features[1] = tnn.BatchNorm2d(8, track_running_stats=False)
        match = "keeps no running statistics"
    else:
        x = x[:1]
        match = "N >= 2"
    with pytest.raises(ValueError, match=match):
        convert.torch_to_flax(tm, fm, x)
