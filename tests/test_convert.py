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
