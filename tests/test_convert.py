"""bnref.convert: one LeNet-BN, two frameworks — same logits, same loss, same gradients."""

import re

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


# ---- a port that computes something else is named where the models part, not at the head ----


def _minimal_torch():
    """The issue's minimal case: a stride-2 conv with torch's symmetric padding=1."""
    torch.manual_seed(0)
    net = tnn.Sequential(tnn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), tnn.BatchNorm2d(8), tnn.ReLU(),
                         tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(8, 4))  # fmt: skip
    return _trained(net, (3, 16, 16))


class FlaxMinimal(nn.Module):
    """Its port; ``padding="SAME"`` pads a stride-2 conv (0, 1) on 16x16, torch (1, 1)."""

    padding: object = 1
    dtype: object = None

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3), strides=2, padding=self.padding, use_bias=False, dtype=self.dtype)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, dtype=self.dtype)(x))
        return nn.Dense(4, dtype=self.dtype)(x.mean(axis=(1, 2)))


def _shuffle_torch(x, groups=2):  # ShuffleNet's channel shuffle, NCHW
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _shuffle_flax(x, groups=2):  # the same on NHWC
    n, h, w, c = x.shape
    return x.reshape(n, h, w, groups, c // groups).swapaxes(3, 4).reshape(n, h, w, c)


class TorchBlocks(tnn.Module):
    """conv0-bn0-relu6, a channel shuffle, conv1-bn1 with a skip connection around it, conv2-bn2,
    pooling and a Linear: the pieces of MobileNetV2, ShuffleNetV2 and ResNet that a port can miss."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = tnn.Conv2d(3, 8, 3, padding=1, bias=False), tnn.BatchNorm2d(8)
        self.conv1, self.bn1 = tnn.Conv2d(8, 8, 3, padding=1, bias=False), tnn.BatchNorm2d(8)
        self.conv2, self.bn2 = tnn.Conv2d(8, 8, 3, padding=1, bias=False), tnn.BatchNorm2d(8)
        self.fc = tnn.Linear(8, 4)

    def forward(self, x):
        y = _shuffle_torch(torch.nn.functional.relu6(self.bn0(self.conv0(x))))
        y = torch.relu(self.bn1(self.conv1(y)) + y)
        return self.fc(torch.relu(self.bn2(self.conv2(y))).mean((2, 3)))


class FlaxBlocks(nn.Module):
    """Its port, with one piece optionally wrong: ``relu`` for relu6, no shuffle, no skip."""

    relu6: bool = True
    shuffle: bool = True
    skip: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        def conv_bn(x, i):
            x = nn.Conv(8, (3, 3), padding=1, use_bias=False, name=f"conv{i}")(x)
            return nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x)

        y = conv_bn(x, 0)
        y = nn.relu6(y) if self.relu6 else nn.relu(y)
        y = _shuffle_flax(y) if self.shuffle else y
        y = nn.relu(conv_bn(y, 1) + (y if self.skip else 0))
        return nn.Dense(4, name="fc")(nn.relu(conv_bn(y, 2)).mean(axis=(1, 2)))


def _blocks_torch():
    tm = _trained(TorchBlocks(), (3, 16, 16))
    with torch.no_grad():  # bn0's output N(3, 4): a good part of it above 6, where relu6 and relu part
        tm.bn0.weight.fill_(4.0)
        tm.bn0.bias.fill_(3.0)
    return tm


class TorchSquareLinears(tnn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = tnn.Linear(8, 8), tnn.Linear(8, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class FlaxSquareLinearsSwapped(nn.Module):
    """The port calls fc2 before fc1: same names, same shapes, another function."""

    @nn.compact
    def __call__(self, x, train: bool):
        fc1, fc2 = nn.Dense(8, name="fc1"), nn.Dense(8, name="fc2")
        return fc1(nn.relu(fc2(x)))


class TorchFlattenHead(tnn.Module):
    """conv-bn-relu, a flatten of the (4, 4, 4) map and a Linear; ``dead`` sets bn's bias to
    -100, so every ReLU after it is zero on any input."""

    def __init__(self, dead=False):
        super().__init__()
        self.conv, self.bn, self.fc = tnn.Conv2d(3, 4, 3, stride=2, padding=1), tnn.BatchNorm2d(4), tnn.Linear(64, 4)
        self.dead = dead

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class FlaxFlattenHead(nn.Module):
    """Its port; ``transposed`` flattens the map as (W, H, C), an order no C x S flatten gives."""

    transposed: bool = False

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(nn.Conv(4, (3, 3), 2, 1, name="conv")(x)))
        x = x.swapaxes(1, 2) if self.transposed else x
        return nn.Dense(4, name="fc")(x.reshape(x.shape[0], -1))


def _flatten_head(dead=False):
    tm = _trained(TorchFlattenHead(), (3, 8, 8))
    if dead:
        with torch.no_grad():
            tm.bn.bias.fill_(-100.0)
    return tm


WRONG_PORTS = {
    # case: (torch model, Flax port, sample shape, the message: where the models part and why)
    "SAME padding, stride 2": (_minimal_torch, lambda: FlaxMinimal(padding="SAME"), (3, 16, 16),
                               r"the input of torch '1' <-> Flax 'BatchNorm_0' differs .*the output of torch '0' <-> "
                               r"Flax 'Conv_0' already differs .* though its input agrees, .*padding: Flax's 'SAME'"),
    "relu for relu6": (_blocks_torch, lambda: FlaxBlocks(relu6=False), (3, 16, 16),
                       r"the input of torch 'conv1' <-> Flax 'conv1' differs .*though every layer called before it "
                       r"agrees: something between them differs \(an activation \(relu vs relu6\?\)"),
    "no channel shuffle": (_blocks_torch, lambda: FlaxBlocks(shuffle=False), (3, 16, 16),
                           r"the input of torch 'conv1' <-> Flax 'conv1' differs .*though every layer called before "
                           r"it agrees: .*a channel shuffle"),
    "no skip connection": (_blocks_torch, lambda: FlaxBlocks(skip=False), (3, 16, 16),
                           r"the input of torch 'conv2' <-> Flax 'conv2' differs .*though every layer called before "
                           r"it agrees: .*a skip connection"),
    "square Linears swapped": (TorchSquareLinears, FlaxSquareLinearsSwapped, (8,),
                               r"the input of torch 'fc2' <-> Flax 'fc2' differs .*though every layer called before "
                               r"it agrees"),
    "no flatten order fits": (_flatten_head, lambda: FlaxFlattenHead(transposed=True), (3, 8, 8),
                              r"torch 'fc' <-> Flax 'fc': no flatten order fits the layer's 64 inputs .*though every "
                              r"layer called before it agrees: the models differ between torch 'bn' and it"),
    "dead ReLUs before the flatten": (lambda: _flatten_head(dead=True), FlaxFlattenHead, (3, 8, 8),
                                      r"torch 'fc' <-> Flax 'fc': the layer's 64 inputs are zero on every example of "
                                      r"sample_input \(dead ReLUs\?\), so they cannot tell one flatten order from "
                                      r"another"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(WRONG_PORTS))
@pytest.mark.parametrize("n", [8, 256])
def test_a_port_that_computes_something_else_is_named_where_the_models_part(case, n):
    make_torch, make_flax, shape, message = WRONG_PORTS[case]
    with pytest.raises(ValueError, match=message) as info:
        convert.torch_to_flax(make_torch(), make_flax(), _sample(shape, n=n))
    assert "pass more" not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("case", ["no flatten order fits", "dead ReLUs before the flatten"])
def test_check_false_still_refuses_a_flatten_order_it_cannot_find(case):
    """``check=False`` converts despite a difference, but not by guessing a flatten order."""
    make_torch, make_flax, shape, message = WRONG_PORTS[case]
    with pytest.raises(ValueError, match=message):
        convert.torch_to_flax(make_torch(), make_flax(), _sample(shape), check=False)


@pytest.mark.parametrize("case", ["SAME padding, stride 2", "relu for relu6", "no skip connection"])
def test_check_false_converts_a_port_that_differs_below_a_pooled_head(case):
    """The models differ below the head, so the sample cannot find its order: ``check=False``
    takes the flatten of the layer before's map (here C = its 8 channels, S = 1: as is)."""
    make_torch, make_flax, shape, message = WRONG_PORTS[case]
    tm = make_torch()
    variables, report = convert.torch_to_flax(tm, make_flax(), _sample(shape), check=False, report=True)
    assert report.checked is False and report.pairs[-1].input_order == "as is"
    fc = tm[5] if isinstance(tm, tnn.Sequential) else tm.fc
    np.testing.assert_array_equal(variables["params"][report.pairs[-1].flax]["kernel"], fc.weight.detach().numpy().T)


@pytest.mark.parametrize("name", sorted(set(WRONG_PORTS) - {"dead ReLUs before the flatten"}))  # no right port
def test_the_right_ports_of_the_wrong_port_cases_convert(name):
    """The positive control: each case's torch model against a correct port converts."""
    make_torch, _, shape, _ = WRONG_PORTS[name]
    right = {_minimal_torch: FlaxMinimal, _blocks_torch: FlaxBlocks, _flatten_head: FlaxFlattenHead}
    if name == "square Linears swapped":
        tm, fm = TorchSquareLinears().eval(), FlaxSquareLinears()
    else:
        tm, fm = make_torch(), right[make_torch]()
    x, x_new = _sample(shape), _sample(shape, n=5, seed=7)
    variables = convert.torch_to_flax(tm, fm, x)
    with torch.no_grad():
        want = tm(torch.from_numpy(x_new)).numpy()
    np.testing.assert_allclose(np.asarray(fm.apply(variables, convert.channels_last(x_new), train=False)), want,
                               atol=1e-4, rtol=0)  # fmt: skip


class FlaxSquareLinears(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        return nn.Dense(8, name="fc2")(nn.relu(nn.Dense(8, name="fc1")(x)))


# ---- the bound follows the port's precision; corrupt weights are named as such ----


@pytest.mark.parametrize("dtype, rtol", [("bfloat16", 1e-1), ("float16", 2e-2), ("float32", 1e-4)])
def test_a_half_precision_port_converts_checked_to_its_own_bound(dtype, rtol):
    tm, fm = _minimal_torch(), FlaxMinimal(dtype=getattr(jnp, dtype))
    x, x_new = _sample((3, 16, 16)), _sample((3, 16, 16), n=16, seed=7)
    variables, report = convert.torch_to_flax(tm, fm, x, report=True)  # the float32 bound refused half precision
    assert report.checked and report.rtol == rtol == convert.CHECK_RTOL[dtype]
    got = np.asarray(fm.apply(variables, convert.channels_last(x_new), train=False), np.float64)
    with torch.no_grad():
        want = tm(torch.from_numpy(x_new)).double().numpy()
    assert convert._rel_error(want, got) <= rtol  # and it does compute torch's function, to that bound


def _poisoned(where, value):
    """A trained TorchCNN whose tensor ``where`` holds ``value`` at flat index 2."""
    tm = _trained(TorchCNN(), (3, 16, 16))
    with torch.no_grad():
        layer, name = where.rsplit(".", 1)
        getattr(tm.get_submodule(layer), name).view(-1)[2] = value
    return tm


CORRUPT_TORCH = {
    "NaN weight": ("features.0.weight", float("nan"), r"torch 'features.0' weight holds NaN \(at index \(0, 0, 0, 2\)\)"),
    "inf bias": ("head.1.bias", float("inf"), r"torch 'head.1' bias holds inf \(at index \(2,\)\)"),
    "NaN running mean": ("features.1.running_mean", float("nan"), r"torch 'features.1' running_mean holds NaN"),
    "negative running variance": ("head.2.running_var", -0.5, r"torch 'head.2' running_var holds a negative variance "
                                                               r"\(-0.5 at index \(2,\)\)"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CORRUPT_TORCH))
def test_corrupt_torch_weights_are_named_as_such(case):
    where, value, message = CORRUPT_TORCH[case]
    tm = _poisoned(where, value)
    with pytest.raises(ValueError, match=message) as info:
        convert.torch_to_flax(tm, FlaxCNN(), _sample((3, 16, 16)))
    assert "padding" not in str(info.value)


CORRUPT_FLAX = {
    "NaN kernel": (("params", "features_0", "kernel"), np.nan, r"params/features_0/kernel holds NaN"),
    "NaN running mean": (("batch_stats", "head_2", "mean"), np.nan, r"batch_stats/head_2/mean holds NaN"),
    "negative running variance": (("batch_stats", "features_5", "var"), -1.0,
                                  r"batch_stats/features_5/var holds a negative variance"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CORRUPT_FLAX))
def test_corrupt_flax_variables_are_named_as_such(case):
    (collection, layer, name), value, message = CORRUPT_FLAX[case]
    tm, fm, x = _trained(TorchCNN(), (3, 16, 16)), FlaxCNN(), _sample((3, 16, 16))
    variables = convert.torch_to_flax(tm, fm, x)
    variables[collection][layer][name] = variables[collection][layer][name].copy()
    variables[collection][layer][name].reshape(-1)[1] = value
    with pytest.raises(ValueError, match=message):
        convert.flax_to_torch(fm, variables, tm, x)


# ---- the converter's own mistakes of use are one-line ValueErrors that say what to pass ----


class FlaxCNNFixedTrainingBN(FlaxCNNAutoNames):
    """A port whose BatchNorms keep ``use_running_average=False`` whatever the mode argument."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3), padding=1)(x)
        x = nn.max_pool(nn.relu(nn.BatchNorm(use_running_average=False)(x)), (2, 2), (2, 2))
        x = nn.Conv(16, (3, 3), padding=1, use_bias=False)(x)
        x = nn.max_pool(nn.relu(nn.BatchNorm(use_running_average=not train)(x)), (2, 2), (2, 2))
        x = nn.Dense(32)(x.reshape(x.shape[0], -1))
        return nn.Dense(10)(nn.relu(nn.BatchNorm(use_running_average=not train)(x)))


class FlaxCNNTraining(nn.Module):
    """A port whose mode argument is called ``training``; ``dropout`` adds an nn.Dropout that
    stays random in evaluation (``deterministic=False`` fixed)."""

    dropout: bool = False

    @nn.compact
    def __call__(self, x, training: bool):
        x = FlaxCNNAutoNames()(x, train=training)
        return nn.Dropout(0.5, deterministic=False)(x) if self.dropout else x


class TorchCNNNamed(tnn.Module):
    """TorchCNN under a wrapper path, so that call order pairs it with FlaxCNNTraining's names."""

    def __init__(self):
        super().__init__()
        self.net = TorchCNN()

    def forward(self, x):
        return self.net(x)


MISUSE = {
    "sample in the wrong layout": (lambda: (TorchCNN(), FlaxCNN()), (1, 16, 16), {},
                                   r"the torch module cannot run on sample_input of shape \(8, 1, 16, 16\) .*pass a "
                                   r"batch in torch's layout"),
    "BatchNorm fixed to training": (lambda: (TorchCNN(), FlaxCNNFixedTrainingBN()), (3, 16, 16), {},
                                    r"Flax layer 'BatchNorm_0' updates its batch_stats when called with "
                                    r"\{'train': False\} .*use_running_average=not train"),
    "mode argument not called train": (lambda: (TorchCNNNamed(), FlaxCNNTraining()), (3, 16, 16), {},
                                       r"eval_kwargs=\{'train': False\} do not fit flax_module.__call__\(x, training: "
                                       r"bool\) .*e.g. eval_kwargs=\{'training': False\}"),
    "Dropout without an rng": (lambda: (TorchCNNNamed(), FlaxCNNTraining(dropout=True)), (3, 16, 16),
                               {"eval_kwargs": {"training": False}},
                               r"Flax layer 'Dropout_0' needs a 'dropout' rng when called with \{'training': False\} "
                               r".*deterministic=not train"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(MISUSE))
@pytest.mark.parametrize("direction", ["torch_to_flax", "flax_to_torch"])
def test_misuse_is_a_one_line_value_error_naming_what_to_pass(case, direction):
    make, shape, kwargs, message = MISUSE[case]
    tm, fm = make()
    tm = _trained(tm, (3, 16, 16))
    x = _sample(shape)
    with pytest.raises(ValueError, match=message) as info:
        if direction == "torch_to_flax":
            convert.torch_to_flax(tm, fm, x, **kwargs)
        else:  # the variables of the right port: it is the module that is wrong
            variables = convert.torch_to_flax(tm, FlaxCNNAutoNames(), _sample((3, 16, 16)))
            if case in ("mode argument not called train", "Dropout without an rng"):
                variables = {c: {"FlaxCNNAutoNames_0": v} for c, v in variables.items()}
            convert.flax_to_torch(fm, variables, tm, x, **kwargs)
    assert "\n" not in str(info.value)


def test_a_mode_argument_of_another_name_converts_with_eval_kwargs():
    tm, fm, x = _trained(TorchCNNNamed(), (3, 16, 16)), FlaxCNNTraining(), _sample((3, 16, 16))
    variables = convert.torch_to_flax(tm, fm, x, eval_kwargs={"training": False})
    with torch.no_grad():
        want = tm(torch.from_numpy(x)).numpy()
    got = np.asarray(fm.apply(variables, convert.channels_last(x), training=False))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


# ---- the pairing is visible: report=True ----


@pytest.mark.parametrize("flax_model, paired_by", [(FlaxCNN, "path"), (FlaxCNNAutoNames, "call order")])
@pytest.mark.parametrize("direction", ["torch_to_flax", "flax_to_torch"])
def test_report_says_how_each_layer_was_paired_and_read(flax_model, paired_by, direction):
    tm, fm, x = _trained(TorchCNN(), (3, 16, 16)), flax_model(), _sample((3, 16, 16))
    variables, report = convert.torch_to_flax(tm, fm, x, report=True)
    if direction == "flax_to_torch":
        _, report = convert.flax_to_torch(fm, variables, tm, x, report=True)
    assert isinstance(report, convert.ConversionReport) and report.checked and report.rtol == 1e-4
    assert [p.torch for p in report.pairs] == ["features.0", "features.1", "features.4", "features.5", "head.1",
                                               "head.2", "head.4"]  # fmt: skip
    assert [p.kind for p in report.pairs] == ["conv", "bn", "conv", "bn", "dense", "bn", "dense"]
    assert {p.paired_by for p in report.pairs} == {paired_by}
    assert [p.input_order for p in report.pairs] == ["as is"] * 4 + ["(C=16, S=16)", "as is", "as is"]
    flax_names = [p.flax for p in report.pairs]
    assert flax_names[4] == ("head_1" if flax_model is FlaxCNN else "Dense_0")
    row = rf"^head\.1 +{flax_names[4]} +dense +{paired_by} +\(C=16, S=16\)$"
    assert re.search(row, str(report), re.M), str(report)


def test_report_true_without_modules_is_a_type_error():
    with pytest.raises(TypeError, match="report=True is for"):
        convert.torch_to_flax(_state(), report=True)


# ---- LeNet-BN's state-dict path: values, not only keys and shapes ----


BAD_VALUES_TORCH = {
    "string array": (lambda sd: _add(sd, "conv1.bias", np.array(["0.1"] * 6)), r"'conv1.bias' has dtype <U3, expected a "
                                                                                r"floating-point array"),
    "int64 weight": (lambda sd: _add(sd, "fc2.weight", torch.ones(84, 120, dtype=torch.int64)),
                     r"'fc2.weight' has dtype int64, expected a floating-point array"),
    "negative running variance": (lambda sd: sd["bn3.running_var"].__setitem__(4, -0.25) or sd,
                                  r"'bn3.running_var' holds a negative variance \(-0.25 at index \(4,\)\)"),
    "NaN weight": (lambda sd: sd["conv2.weight"].view(-1).__setitem__(7, float("nan")) or sd,
                   r"'conv2.weight' holds NaN \(at index \(0, 0, 1, 2\)\)"),
    "fractional counter": (lambda sd: _add(sd, "bn2.num_batches_tracked", torch.tensor(2.7)),
                           r"'bn2.num_batches_tracked' is tensor\(2.7000\), expected a count"),
    "negative counter": (lambda sd: _add(sd, "bn2.num_batches_tracked", torch.tensor(-1)),
                         r"'bn2.num_batches_tracked' is tensor\(-1\), expected a count"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BAD_VALUES_TORCH))
def test_torch_to_flax_refuses_corrupt_values(name):
    corrupt, message = BAD_VALUES_TORCH[name]
    with pytest.raises(ValueError, match=message):
        convert.torch_to_flax(corrupt(_state()))


def _set(v, collection, layer, name, value):
    v[collection][layer][name] = value
    return v


BAD_VALUES_FLAX = {
    "int kernel": (lambda v: _set(v, "params", "fc3", "kernel", np.ones((84, 10), np.int32)),
                   r"params/fc3/kernel has dtype int32, expected a floating-point array"),
    "NaN bias": (lambda v: _set(v, "params", "conv1", "bias", np.full(6, np.nan, np.float32)),
                 r"params/conv1/bias holds NaN \(at index \(0,\)\)"),
    "negative running variance": (lambda v: _set(v, "batch_stats", "bn1", "var", -np.ones(6, np.float32)),
                                  r"batch_stats/bn1/var holds a negative variance"),
    "inf running mean": (lambda v: _set(v, "batch_stats", "bn4", "mean", np.full(84, np.inf, np.float32)),
                         r"batch_stats/bn4/mean holds inf"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BAD_VALUES_FLAX))
def test_flax_to_torch_refuses_corrupt_values(name):
    corrupt, message = BAD_VALUES_FLAX[name]
    with pytest.raises(ValueError, match=message):
        convert.flax_to_torch(corrupt(_variables()))


@pytest.mark.parametrize("count", [2.7, -1, "3", np.array([1, 2])])
@pytest.mark.parametrize("function", ["flax_to_torch", "batch_norm_flax_to_torch"])
def test_a_num_batches_tracked_that_is_no_count_is_refused_not_truncated(count, function):
    v = _variables()
    with pytest.raises(ValueError, match=r"num_batches_tracked is .*, expected a count \(an integer >= 0\)"):
        if function == "flax_to_torch":
            convert.flax_to_torch(v, num_batches_tracked=count)
        else:
            convert.batch_norm_flax_to_torch({c: v[c]["bn1"] for c in v}, num_batches_tracked=count)


@pytest.mark.parametrize("count", [2, np.int64(2), 2.0, torch.tensor(2)])
def test_a_num_batches_tracked_that_is_a_count_is_kept(count):
    back = convert.flax_to_torch(_variables(), num_batches_tracked=count)
    assert back["bn1.num_batches_tracked"].dtype == np.int64 and int(back["bn1.num_batches_tracked"]) == 2


@pytest.mark.parametrize("prefix, message", [
    ("", r"^batch_norm_flax_to_torch: params/scale has shape \(2, 3\), expected a vector \(channels,\)$"),
    ("bn1.", r"^batch_norm_flax_to_torch: params/bn1/scale has shape \(2, 3\), expected a vector \(channels,\)$"),
])  # fmt: skip
def test_single_layer_shape_message_names_the_path_and_the_expected_shape(prefix, message):
    layer = {"params": {"scale": np.ones((2, 3), np.float32), "bias": np.zeros(3, np.float32)},
             "batch_stats": {"mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32)}}  # fmt: skip
    with pytest.raises(ValueError, match=message):
        convert.batch_norm_flax_to_torch(layer, prefix=prefix)
    del layer["params"]["scale"]
    with pytest.raises(ValueError, match=rf"^batch_norm_flax_to_torch: missing params/{prefix.rstrip('.') + '/' if prefix else ''}scale$"):
        convert.batch_norm_flax_to_torch(layer, prefix=prefix)


def test_single_torch_layer_with_a_negative_running_variance_is_refused():
    layer = torch.nn.BatchNorm2d(3)
    layer.running_var[1] = -2.0
    with pytest.raises(ValueError, match=r"'running_var' holds a negative variance \(-2 at index \(1,\)\)"):
        convert.batch_norm_torch_to_flax(layer.state_dict())
