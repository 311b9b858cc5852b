"""Precise BN: bnref.torch.precise_bn and bnref.jax.precise_batch_stats against the spec's two
variants (bnref.spec.population_stats / batch_average_stats), computed here along an independent
path: the network's layers in NumPy, BN from the spec."""

import numpy as np
import pytest

from bnref import spec

C1, H, F = 3, 6, 5  # conv channels, feature map side, dense features


def _batches(k=4, n=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, 1, H, H)) * 2.0 + 0.5 for _ in range(k)]  # NCHW float64


def _expected(batches, conv_w, conv_b, lin_w, lin_b, g1, b1, g2, conv1, conv2, variant):
    """The spec's statistics of both BN layers of conv(1->C1, 3x3, pad 1) -> BN2d -> ReLU -> flatten ->
    linear -> BN1d, in NumPy (NCHW; linear weights (F, C1*H*H) as torch's)."""
    import torch

    t = lambda a: torch.from_numpy(np.array(a, np.float64))  # noqa: E731  (a writable copy)
    conv = [torch.nn.functional.conv2d(t(x), t(conv_w), t(conv_b), padding=1).numpy() for x in batches]
    if variant == "population":
        m1, v1 = spec.population_stats(conv)
        h = [np.maximum(spec.batch_norm_eval(c, g1, b1, m1, v1, conv1), 0) for c in conv]
    else:
        m1, v1 = spec.batch_average_stats(conv, conv1)
        h = [np.maximum(spec.batch_norm_train(c, g1, b1, np.zeros(C1), np.ones(C1), conv1)[0], 0) for c in conv]
    dense = [a.reshape(len(a), -1) @ lin_w.T + lin_b for a in h]
    m2, v2 = spec.population_stats(dense) if variant == "population" else spec.batch_average_stats(dense, conv2)
    return (m1, v1), (m2, v2)


# --- torch ---------------------------------------------------------------------------------------


def _torch_model(seed=0):
    import torch
    from torch import nn

    from bnref.torch import BatchNorm2d

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, C1, 3, padding=1), BatchNorm2d(C1, convention="d2l"), nn.ReLU(), nn.Flatten(),
                          nn.Linear(C1 * H * H, F), nn.BatchNorm1d(F)).double()  # fmt: skip
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5), model[1].bias.uniform_(-0.5, 0.5)
        model[5].weight.uniform_(0.5, 1.5), model[5].bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("variant", ["population", "batch_average"])
def test_torch_precise_bn_equals_the_spec(variant):
    import torch

    from bnref.torch import precise_bn

    model = _torch_model()
    batches = [torch.from_numpy(x) for x in _batches()]
    model.train()
    before_counts = [int(model[i].num_batches_tracked) for i in (1, 5)]
    out = precise_bn(model, [(x, None) for x in batches], variant=variant)
    p = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    (m1, v1), (m2, v2) = _expected(_batches(), p["0.weight"], p["0.bias"], p["4.weight"], p["4.bias"], p["1.weight"],
                                   p["1.bias"], p["5.weight"], spec.preset("d2l"), spec.TORCH, variant)  # fmt: skip
    for got, want in ((p["1.running_mean"], m1), (p["1.running_var"], v1), (p["5.running_mean"], m2),
                      (p["5.running_var"], v2)):  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert set(out) == {"1", "5"} and model.training  # mode kept
    assert [int(model[i].num_batches_tracked) for i in (1, 5)] == before_counts


def test_torch_batch_average_is_what_update_bn_computes():
    """torch.optim.swa_utils.update_bn (torch.nn layers: cumulative average of the unbiased batch
    variance) and precise_bn(variant="batch_average") agree."""
    import copy

    import torch
    from torch import nn

    from bnref.torch import precise_bn

    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 6),
                          nn.BatchNorm1d(6))  # fmt: skip
    batches = [torch.randn(16, 1, 6, 6) for _ in range(5)]
    theirs = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, theirs)
    precise_bn(model, batches, variant="batch_average")
    for k, v in theirs.state_dict().items():
        if "running" in k:
            torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_torch_precise_bn_bad_input_changes_nothing():
    import torch
    from torch import nn

    from bnref.torch import precise_bn

    model = _torch_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.from_numpy(x) for x in _batches()]
    with pytest.raises(ValueError, match="variant must be one of"):
        precise_bn(model, batches, variant="ema")
    with pytest.raises(ValueError, match="not a one-shot iterator"):
        precise_bn(model, iter(batches))
    with pytest.raises(ValueError, match="at least one batch"):
        precise_bn(model, [])
    with pytest.raises(ValueError, match="no BatchNorm layer"):
        precise_bn(nn.Linear(2, 2), [torch.zeros(2, 2)])
    with pytest.raises(ValueError, match=r"\['unused'\] are never called"):
        precise_bn(_Skips(model), batches)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def _Skips(inner):
    """A module with a BN layer its forward never calls."""
    from torch import nn

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.unused = inner, nn.BatchNorm1d(2).double()

        def forward(self, x):
            return self.inner(x)

    return Skips()


# --- JAX -----------------------------------------------------------------------------------------


def _flax_model_and_variables():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from bnref.jax import BatchNorm

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            f64 = {"dtype": jnp.float64, "param_dtype": jnp.float64}
            x = nn.Conv(C1, (3, 3), padding="SAME", name="conv", **f64)(x)
            x = BatchNorm(use_running_average=not train, convention="d2l", name="bn_a", **f64)(x)
            x = nn.relu(x).reshape(x.shape[0], -1)
            x = nn.Dense(F, name="dense", **f64)(x)
            return nn.BatchNorm(use_running_average=not train, name="bn_b", **f64)(x)

    net = Net()
    variables = net.init(jax.random.key(0), jnp.zeros((2, H, H, 1)), train=False)
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda a: a, variables["params"])
    for bn in ("bn_a", "bn_b"):
        params[bn]["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, params[bn]["scale"].shape))
        params[bn]["bias"] = jnp.asarray(rng.uniform(-0.5, 0.5, params[bn]["bias"].shape))
    return net, {"params": params, "batch_stats": variables["batch_stats"]}


@pytest.mark.parametrize("variant", ["population", "batch_average"])
def test_jax_precise_batch_stats_equals_the_spec(variant):
    import jax

    from bnref.jax.precise import precise_batch_stats

    with jax.enable_x64(True):
        net, variables = _flax_model_and_variables()
        nchw = _batches()
        batches = [(np.moveaxis(x, 1, -1), np.zeros(len(x))) for x in nchw]
        before = jax.tree.map(np.asarray, variables)
        stats = precise_batch_stats(net, variables, batches, variant=variant)
        p = jax.tree.map(np.asarray, variables["params"])
        conv_w = p["conv"]["kernel"].transpose(3, 2, 0, 1)  # HWIO -> OIHW
        lin_w = p["dense"]["kernel"].reshape(H, H, C1, F).transpose(2, 0, 1, 3).reshape(C1 * H * H, F).T  # NCHW flatten
        (m1, v1), (m2, v2) = _expected(nchw, conv_w, p["conv"]["bias"], lin_w, p["dense"]["bias"], p["bn_a"]["scale"],
                                       p["bn_a"]["bias"], p["bn_b"]["scale"], spec.preset("d2l"), spec.FLAX, variant)  # fmt: skip
        for got, want in ((stats["bn_a"]["mean"], m1), (stats["bn_a"]["var"], v1), (stats["bn_b"]["mean"], m2),
                          (stats["bn_b"]["var"], v2)):  # fmt: skip
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-9)  # batch_stats are float32 in Flax
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, variables), before)  # not modified


def test_jax_precise_batch_stats_bad_input():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from bnref.jax.precise import precise_batch_stats

    with jax.enable_x64(True):
        net, variables = _flax_model_and_variables()
        batches = [np.moveaxis(x, 1, -1) for x in _batches()]
        with pytest.raises(ValueError, match="variant must be one of"):
            precise_batch_stats(net, variables, batches, variant="ema")
        with pytest.raises(ValueError, match="not a one-shot iterator"):
            precise_batch_stats(net, variables, iter(batches))
        with pytest.raises(ValueError, match="at least one batch"):
            precise_batch_stats(net, variables, [])
    dense = nn.Dense(2)
    with pytest.raises(ValueError, match="no batch_stats"):
        precise_batch_stats(dense, dense.init(jax.random.key(0), jnp.zeros((1, 2))), [jnp.zeros((2, 2))])


# --- refusals, and state unchanged on any error --------------------------------------------------


def _torch_shared():
    """One BatchNorm2d module called twice per forward."""
    import torch
    from torch import nn

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2, self.bn = nn.Conv2d(1, C1, 3, padding=1), nn.Conv2d(C1, C1, 3, padding=1), nn.BatchNorm2d(C1)

        def forward(self, x):
            return self.bn(self.conv2(torch.relu(self.bn(self.conv1(x)))))

    torch.manual_seed(0)
    return Shared().double()


class _Lazy:
    """A re-iterable, DataLoader-like source (not a list, so nothing is checked up front) that
    yields good batches, then ``last``."""

    def __init__(self, good, last):
        self.good, self.last = good, last

    def __iter__(self):
        yield from self.good
        yield self.last


def _torch_case(case):
    """(model, batches, the error's match) of one bad-input case."""
    import torch

    good = [torch.from_numpy(x) for x in _batches()]
    if case == "shared layer":
        return _torch_shared(), good, r"BN layer 'bn' is called 2 times per forward \(a shared layer\)"
    if case == "one example in one batch":
        return _torch_model(), [good[0][:1]], r"layer '5' got 1 value\(s\) per channel"
    if case == "dict batches":
        return _torch_model(), [{"image": x} for x in good], r"batch 0 is a dict; a batch must be a torch.Tensor or a NumPy"
    if case == "dict yielded after good batches":
        return _torch_model(), _Lazy(good, {"image": good[0]}), r"batch 4 is a dict"
    if case == "a batch the model rejects after good ones":
        return _torch_model(), _Lazy(good, torch.zeros(8, 2, H, H, dtype=torch.float64)), "channels"
    raise AssertionError(case)


TORCH_BAD = ["shared layer", "one example in one batch", "dict batches", "dict yielded after good batches",
             "a batch the model rejects after good ones"]  # fmt: skip


@pytest.mark.parametrize("variant", ["population", "batch_average"])
@pytest.mark.parametrize("case", TORCH_BAD)
def test_torch_precise_bn_refuses_and_changes_nothing(case, variant):
    import torch

    from bnref.torch import precise_bn

    model, batches, match = _torch_case(case)
    model.train()
    for m in list(model.modules())[1::2]:  # a mixture of modes, which must come back as it was
        m.eval()
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, RuntimeError), match=match):
        precise_bn(model, batches, variant=variant)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("variant", ["population", "batch_average"])
def test_torch_precise_bn_takes_numpy_batches_as_the_model_dtype(variant):
    """NumPy batches (float32 here, the model float64) give exactly what the same values as
    float64 tensors give."""
    import torch

    from bnref.torch import precise_bn

    arrays = [x.astype(np.float32) for x in _batches()]
    a, b = _torch_model(), _torch_model()
    got = precise_bn(a, [(x, np.zeros(len(x))) for x in arrays], variant=variant)
    want = precise_bn(b, [torch.from_numpy(x.astype(np.float64)) for x in arrays], variant=variant)
    for name in want:
        for g, w in zip(got[name], want[name]):
            assert torch.equal(g, w), name


def _flax_shared():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            bn = nn.BatchNorm(use_running_average=not train, name="bn")
            x = bn(nn.Dense(F, name="d1")(x.reshape(x.shape[0], -1)))
            return bn(nn.Dense(F, name="d2")(nn.relu(x)))

    net = Shared()
    return net, net.init(jax.random.key(0), jnp.zeros((2, H, H, 1)), train=False)


def _jax_case(case):
    good = [np.moveaxis(x, 1, -1) for x in _batches()]
    if case == "shared layer":
        net, variables = _flax_shared()
        return net, variables, [g.astype(np.float32) for g in good], r"BN layer 'bn' is called more than once"
    net, variables = _flax_model_and_variables()
    if case == "one example in one batch":
        return net, variables, [good[0][:1]], r"layer bn_b got 1 value\(s\) per feature"
    if case == "dict batches":
        return net, variables, [{"image": x} for x in good], r"batch 0 is a dict; a batch must be an array"
    if case == "dict yielded after good batches":
        return net, variables, _Lazy(good, {"image": good[0]}), r"batch 4 is a dict"
    raise AssertionError(case)


@pytest.mark.parametrize("variant", ["population", "batch_average"])
@pytest.mark.parametrize("case", ["shared layer", "one example in one batch", "dict batches",
                                  "dict yielded after good batches"])  # fmt: skip
def test_jax_precise_batch_stats_refuses_and_changes_nothing(case, variant):
    import jax

    from bnref.jax.precise import precise_batch_stats

    with jax.enable_x64(True):
        net, variables, batches, match = _jax_case(case)
        variables = jax.tree.map(np.array, variables)  # NumPy leaves: a mutation would show
        before = jax.tree.map(np.copy, variables)
        with pytest.raises(ValueError, match=match):
            precise_batch_stats(net, variables, batches, variant=variant)
        jax.tree.map(np.testing.assert_array_equal, variables, before)
