"""Everywhere bnref takes a Flax model, it takes an NNX one: precise BN
(bnref.nnx.precise_batch_stats, and --backend nnx --precise-bn), bnref.convert (torch <-> an NNX
model's state) and bnref.diagnose (bn_report, and python -m bnref.diagnose on an NNX port or a
--backend nnx run), each on NNX models bnref has never seen (other layer names, an nnx.List, a
mix of flax.nnx.BatchNorm and bnref.nnx.BatchNorm) as well as on LeNet-BN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx, serialization
from test_convert import _sample, _trained
from test_precise import C1, F, H, _batches, _expected, _Lazy
from torch import nn as tnn

from bnref import convert, diagnose, spec
from bnref.nnx import BatchNorm, precise_batch_stats
from bnref.nnx.layers import write
from bnref.nnx.variables import linen_variables

# --- models bnref has never seen ------------------------------------------------------------------


class PreciseNet(nnx.Module):
    """test_precise's network (conv 3x3 SAME -> BN -> ReLU -> flatten -> linear -> BN) in NNX, in
    float64, named otherwise: bnref.nnx.BatchNorm (d2l) in an nnx.List, flax.nnx.BatchNorm last."""

    def __init__(self, rngs, shared=False):
        f64 = dict(dtype=jnp.float64, param_dtype=jnp.float64, rngs=rngs)
        self.stem = nnx.Conv(1, C1, (3, 3), padding="SAME", **f64)
        self.blocks = nnx.List([BatchNorm(C1, convention="d2l", **f64)])
        self.proj = nnx.Linear(C1 * H * H, F, **f64)
        self.head_bn = nnx.BatchNorm(F, **f64)
        self.shared = shared

    def __call__(self, x):
        x = nnx.relu(self.blocks[0](self.stem(x)))
        if self.shared:  # the same layer a second time
            x = self.blocks[0](x)
        return self.head_bn(self.proj(x.reshape(x.shape[0], -1)))


def _precise_net(shared=False):
    model = PreciseNet(nnx.Rngs(0), shared=shared)
    rng = np.random.default_rng(3)
    for bn in (model.blocks[0], model.head_bn):
        write(bn.scale, jnp.asarray(rng.uniform(0.5, 1.5, bn.scale.shape)))
        write(bn.bias, jnp.asarray(rng.uniform(-0.5, 0.5, bn.bias.shape)))
    return model


def _nhwc_batches():
    return [np.moveaxis(x, 1, -1) for x in _batches()]


def _snapshot(model):
    """Everything that must not change: every state leaf, each module's class and mode."""
    state = jax.tree.map(lambda a: np.array(jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
                                            else a), nnx.to_pure_dict(nnx.state(model)))  # fmt: skip
    kinds = [(path, type(m), getattr(m, "use_running_average", None)) for path, m in nnx.iter_modules(model)]
    return state, kinds


def _assert_unchanged(model, snapshot):
    state, kinds = _snapshot(model)
    jax.tree.map(np.testing.assert_array_equal, state, snapshot[0])
    assert kinds == snapshot[1]


# --- precise BN -----------------------------------------------------------------------------------


#: flax.nnx.BatchNorm in float64 training writes its float64 batch statistics into its float32 BatchStats
#: (``self.mean[...] = ...``, a scatter JAX warns about); Flax's own behaviour, met by batch_average's pass
FLAX_F64_STATS = pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types:FutureWarning")


@FLAX_F64_STATS
@pytest.mark.parametrize("variant", ["population", "batch_average"])
def test_nnx_precise_batch_stats_equals_the_spec(variant):
    with jax.enable_x64(True):
        model = _precise_net()
        nchw = _batches()
        snapshot = _snapshot(model)
        stats = precise_batch_stats(model, [(x, np.zeros(len(x))) for x in _nhwc_batches()], variant=variant,
                                    update=False)  # fmt: skip
        _assert_unchanged(model, snapshot)  # update=False: the model as it was
        p = jax.tree.map(np.asarray, linen_variables(model)["params"])
        conv_w = p["stem"]["kernel"].transpose(3, 2, 0, 1)  # HWIO -> OIHW
        lin_w = p["proj"]["kernel"].reshape(H, H, C1, F).transpose(2, 0, 1, 3).reshape(C1 * H * H, F).T  # NCHW flatten
        (m1, v1), (m2, v2) = _expected(nchw, conv_w, p["stem"]["bias"], lin_w, p["proj"]["bias"],
                                       p["blocks"][0]["scale"], p["blocks"][0]["bias"], p["head_bn"]["scale"],
                                       spec.preset("d2l"), spec.FLAX, variant)  # fmt: skip
        for got, want in ((stats["blocks"][0]["mean"], m1), (stats["blocks"][0]["var"], v1),
                          (stats["head_bn"]["mean"], m2), (stats["head_bn"]["var"], v2)):  # fmt: skip
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-9)  # BatchStats are float32
        assert jax.tree.structure(stats) == jax.tree.structure(linen_variables(model)["batch_stats"])

        again = precise_batch_stats(model, _nhwc_batches(), variant=variant)  # update=True: written into the model
        jax.tree.map(np.testing.assert_array_equal, linen_variables(model)["batch_stats"], again)
        jax.tree.map(np.testing.assert_array_equal, again, stats)
        assert type(model.blocks[0]) is BatchNorm and model.blocks[0].use_running_average is False  # mode kept


def _lenet_and_variables(bn):
    from bnref.jax.models import LeNetBN as LinenLeNet
    from bnref.nnx.models import LeNetBN
    from bnref.nnx.variables import load_linen

    linen = LinenLeNet(bn=bn)
    variables = linen.init(jax.random.key(1), jnp.zeros((1, 28, 28, 1)), train=False)
    return linen, variables, load_linen(LeNetBN(rngs=nnx.Rngs(0), bn=bn), variables)


@pytest.mark.parametrize("variant", ["population", "batch_average"])
@pytest.mark.parametrize("bn", ["bnref", "builtin"])
def test_nnx_precise_batch_stats_is_the_linen_version_s_on_lenet(bn, variant):
    """The same network and variables in linen and NNX: the same statistics, to the bit."""
    from bnref.jax.precise import precise_batch_stats as linen_precise

    linen, variables, model = _lenet_and_variables(bn)
    rng = np.random.default_rng(0)
    batches = [rng.random((16, 28, 28, 1), dtype=np.float32) for _ in range(3)]
    want = linen_precise(linen, variables, batches, variant=variant)
    got = precise_batch_stats(model, batches, variant=variant)
    assert jax.tree.structure(got) == jax.tree.structure(dict(want))
    jax.tree.map(np.testing.assert_array_equal, got, want)


class _WithDropout(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(H * H, 4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.drop(self.proj(x.reshape(x.shape[0], -1))))


def test_nnx_precise_batch_stats_sets_the_mode_nnx_s_way_on_a_copy():
    """population: model.eval() (dropout off: the exact moments of the layer's input); batch
    average: model.train() (dropout on), its random draws on a copy of the model's RNG state."""
    model = _WithDropout(nnx.Rngs(0))
    batches = [x.astype(np.float32) for x in _nhwc_batches()]
    snapshot = _snapshot(model)
    population = precise_batch_stats(model, batches, update=False)
    average = precise_batch_stats(model, batches, variant="batch_average", update=False)
    _assert_unchanged(model, snapshot)  # the RNG counters too
    mean, var = spec.population_stats([np.asarray(model.proj(x.reshape(len(x), -1)), np.float64) for x in batches])
    np.testing.assert_allclose(population["bn"]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(population["bn"]["var"], var, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(average["bn"]["var"]) > 1.2 * var)  # dropout's zeros and 2x: a larger spread


class _NoBN(nnx.Module):
    def __init__(self, rngs, unused_bn=False):
        self.proj = nnx.Linear(H * H, 2, rngs=rngs)
        self.unused = nnx.BatchNorm(2, rngs=rngs) if unused_bn else None

    def __call__(self, x):
        return self.proj(x.reshape(x.shape[0], -1))


def _nnx_case(case):
    """(model, batches, the error's match) of one bad-input case."""
    good = _nhwc_batches()
    if case == "shared layer":
        return _precise_net(shared=True), good, r"BN layer 'blocks/0' is called more than once per forward pass"
    if case == "one example in one batch":
        return _precise_net(), [good[0][:1]], r"layer head_bn got 1 value\(s\) per feature"
    if case == "dict batches":
        return _precise_net(), [{"image": x} for x in good], r"batch 0 is a dict; a batch must be an array"
    if case == "dict yielded after good batches":
        return _precise_net(), _Lazy(good, {"image": good[0]}), r"batch 4 is a dict"
    if case == "no BN layer":
        return _NoBN(nnx.Rngs(0)), good, r"the model has no flax.nnx.BatchNorm or bnref.nnx.BatchNorm layer"
    if case == "a BN layer never called":
        return _NoBN(nnx.Rngs(0), unused_bn=True), good, r"no flax.nnx.BatchNorm or bnref.nnx.BatchNorm layer was"
    raise AssertionError(case)


@FLAX_F64_STATS
@pytest.mark.parametrize("variant", ["population", "batch_average"])
@pytest.mark.parametrize("case", ["shared layer", "one example in one batch", "dict batches",
                                  "dict yielded after good batches", "no BN layer",
                                  "a BN layer never called"])  # fmt: skip
def test_nnx_precise_batch_stats_refuses_and_changes_nothing(case, variant):
    with jax.enable_x64(True):
        model, batches, match = _nnx_case(case)
        model.eval()  # a mode that must come back as it was
        snapshot = _snapshot(model)
        with pytest.raises(ValueError, match=match):
            precise_batch_stats(model, batches, variant=variant)  # update=True: nothing is written on an error
        _assert_unchanged(model, snapshot)


def test_nnx_precise_batch_stats_refuses_bad_arguments_before_any_work():
    with jax.enable_x64(True):
        model = _precise_net()
        batches = _nhwc_batches()
        snapshot = _snapshot(model)
        with pytest.raises(ValueError, match="variant must be one of"):
            precise_batch_stats(model, batches, variant="ema")
        with pytest.raises(ValueError, match="at least one batch"):
            precise_batch_stats(model, [])
        with pytest.raises(ValueError, match="not a one-shot iterator"):
            precise_batch_stats(model, iter(batches))
        _assert_unchanged(model, snapshot)


# --- precise BN in training: --backend nnx --precise-bn --------------------------------------------


@pytest.mark.parametrize("variant", ["population", "batch_average"])
def test_the_nnx_training_loop_s_precise_bn_is_linen_s_on_the_same_variables(variant):
    """bnref.nnx.train.NNX.precise (what fit calls with --precise-bn) against the JAX backend's."""
    from bnref.config import TrainConfig
    from bnref.jax import train as jtrain
    from bnref.nnx import train as ntrain

    face = ntrain.make_model(TrainConfig(backend="nnx"))
    variables = face.init(jax.random.key(2), jnp.zeros((1, 28, 28, 1)))
    rng = np.random.default_rng(1)
    batches = [jnp.asarray(rng.random((32, 28, 28, 1), dtype=np.float32)) for _ in range(3)]
    got = ntrain.NNX.precise(face, variables, batches, variant=variant, progress=False)
    want = jtrain.LINEN.precise(jtrain.make_model(TrainConfig(backend="jax")), variables, batches, variant=variant,
                                progress=False)  # fmt: skip
    assert jax.tree.structure(got) == jax.tree.structure(dict(want))
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_nnx_fit_with_precise_bn_gives_the_jax_backend_s_precise_accuracy():
    from bnref.config import TrainConfig
    from bnref.data import synthetic
    from bnref.jax import train as jtrain
    from bnref.nnx import train as ntrain

    data = synthetic(512, 256)
    kw = dict(epochs=1, batch_size=64, lr=0.01, progress=False, precise_bn=True)  # lr 0.01: accuracy not saturated
    nnx_run = ntrain.fit(TrainConfig(backend="nnx", **kw), data, lambda m: None)
    jax_run = jtrain.fit(TrainConfig(backend="jax", **kw), data, lambda m: None)
    assert nnx_run[0]["test_acc_precise"] is not None and 0 < nnx_run[0]["test_acc_precise"] < 1
    assert nnx_run[0]["test_acc_precise"] == jax_run[0]["test_acc_precise"]
    assert nnx_run[0]["step_losses"] == jax_run[0]["step_losses"]  # precise BN leaves training as it was


# --- convert ------------------------------------------------------------------------------------

SHAPE = (3, 6, 6)


class TorchNet(tnn.Module):
    """A torch model with a ModuleList, torch.nn BN after a conv and after a linear."""

    def __init__(self):
        super().__init__()
        self.stem = tnn.Conv2d(3, 4, 3, padding=1)
        self.blocks = tnn.ModuleList([tnn.BatchNorm2d(4)])
        self.proj = tnn.Linear(4 * 6 * 6, 5)
        self.head_norm = tnn.BatchNorm1d(5)

    def forward(self, x):
        x = torch.relu(self.blocks[0](self.stem(x)))
        return self.head_norm(self.proj(torch.flatten(x, 1)))


class NNXNet(nnx.Module):
    """Its NNX port: an nnx.List (``blocks/0`` pairs with torch's ``blocks.0``), flax.nnx.BatchNorm
    (torch's momentum 0.1 is Flax's 0.9) and bnref.nnx.BatchNorm (torch's convention) after the
    linear, whose input is the NHWC flatten."""

    def __init__(self, rngs, momentum=0.9, epsilon=1e-5):
        self.stem = nnx.Conv(3, 4, (3, 3), padding=1, rngs=rngs)
        self.blocks = nnx.List([nnx.BatchNorm(4, momentum=momentum, epsilon=epsilon, rngs=rngs)])
        self.proj = nnx.Linear(4 * 6 * 6, 5, rngs=rngs)
        self.head_norm = BatchNorm(5, convention="torch", rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.blocks[0](self.stem(x)))
        return self.head_norm(self.proj(x.reshape(x.shape[0], -1)))


def make_torch_net():  # factories for python -m bnref.diagnose --torch-model / --flax-model
    return TorchNet()


def make_nnx_net():
    return NNXNet(nnx.Rngs(0))


def make_nnx_flipped():
    return NNXNet(nnx.Rngs(0), momentum=0.1)  # torch's momentum copied as is


@pytest.fixture(scope="module")
def port():
    """A trained TorchNet, a sample batch, and an NNXNet holding its converted weights."""
    tm = _trained(TorchNet(), SHAPE)
    x = _sample(SHAPE, n=16)
    model = make_nnx_net()
    nnx.update(model, convert.torch_to_flax(tm, model, x))
    return tm, x, model


def test_an_nnx_model_converts_from_torch_to_its_state_and_back():
    tm, model = _trained(TorchNet(), SHAPE), make_nnx_net()
    x = _sample(SHAPE)
    before = _snapshot(model)
    sd = {k: v.clone() for k, v in tm.state_dict().items()}
    state, report = convert.torch_to_flax(tm, model, x, report=True)
    _assert_unchanged(model, before)  # the model is not modified: its state comes out
    assert isinstance(state, nnx.State)
    assert [(p.torch, p.flax, p.paired_by) for p in report.pairs] == [
        ("stem", "stem", "path"), ("blocks.0", "blocks/0", "path"), ("proj", "proj", "path"),
        ("head_norm", "head_norm", "path")]  # fmt: skip
    assert report.pairs[2].input_order == "(C=4, S=36)"  # the flatten's order found
    nnx.update(model, state)
    model.eval()
    x_new = _sample(SHAPE, n=5, seed=7)
    with torch.no_grad():
        want = tm(torch.from_numpy(x_new)).numpy()
    np.testing.assert_allclose(np.asarray(model(convert.channels_last(x_new))), want, atol=1e-5, rtol=0)
    assert all(np.asarray(a).dtype == np.float32 for a in jax.tree.leaves(nnx.to_pure_dict(state)))

    for back in (convert.flax_to_torch(model, tm, x),  # the model's own state
                 convert.flax_to_torch(model, nnx.state(model), tm, x),  # an nnx.State
                 convert.flax_to_torch(model, convert.nnx_to_linen(model), tm, x)):  # linen variables  # fmt: skip
        assert list(back) == list(sd)
        for k, v in sd.items():
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    fresh = _trained(TorchNet(), SHAPE, seed=5)  # other weights: the NNX model's win
    fresh.load_state_dict(convert.flax_to_torch(model, fresh, x))
    with torch.no_grad():
        np.testing.assert_allclose(fresh(torch.from_numpy(x_new)).numpy(), want, atol=1e-6, rtol=0)


def test_lenet_converts_into_an_nnx_model_as_into_its_linen_variables():
    from bnref.nnx.models import LeNetBN
    from bnref.torch.models import LeNetBN as TorchLeNet

    torch.manual_seed(0)
    tm = _trained(TorchLeNet(bn="bnref", convention=spec.D2L), (1, 28, 28))
    x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    model = LeNetBN(rngs=nnx.Rngs(0), bn="bnref")
    general = convert.torch_to_flax(tm, model, x)
    known = convert.linen_to_nnx(convert.torch_to_flax(tm.state_dict()), model)
    assert jax.tree.structure(general) == jax.tree.structure(known)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(general), nnx.to_pure_dict(known))
    nnx.update(model, general)
    sd = tm.state_dict()
    count = int(sd["bn1.num_batches_tracked"])
    for back in (convert.flax_to_torch(model, num_batches_tracked=count, as_torch=True),  # LeNet-BN's form
                 convert.flax_to_torch(nnx.state(model), num_batches_tracked=count, as_torch=True)):  # fmt: skip
        assert list(back) == list(sd) and all(torch.equal(back[k], v) for k, v in sd.items())


def test_linen_and_nnx_variables_convert_both_ways_checked():
    model = make_nnx_net()
    linen = convert.nnx_to_linen(model)
    assert sorted(linen) == ["batch_stats", "params"] and "0" in linen["params"]["blocks"]  # linen's string keys
    changed = jax.tree.map(lambda a: np.asarray(a) + 1, linen)
    state = convert.linen_to_nnx(changed, model)
    jax.tree.map(np.testing.assert_array_equal, convert.nnx_to_linen(state), changed)
    assert float(model.head_norm.var[...][0]) == 1.0  # model untouched
    del changed["batch_stats"]["blocks"]["0"]["var"]
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"batch_stats/blocks/0/var: the NNX model has it, the linen variables do not"):
        convert.linen_to_nnx(changed, model)
    with pytest.raises(ValueError, match=r"flax_to_torch: the variables do not fit the NNX model: batch_stats/blocks"):
        convert.flax_to_torch(model, changed, TorchNet(), _sample(SHAPE))
    with pytest.raises(ValueError, match=r"must be an nnx.State or linen's"):
        convert.flax_to_torch(model, [1, 2], TorchNet(), _sample(SHAPE))
    _assert_unchanged(model, before)


class _NeedsDeterministic(NNXNet):
    def __call__(self, x, deterministic):
        return super().__call__(x)


class _TakesTrain(NNXNet):
    def __call__(self, x, train: bool):  # a required mode argument named train: given by default
        assert isinstance(train, bool)
        return super().__call__(x)


def test_an_nnx_model_s_own_call_arguments():
    tm, x = _trained(TorchNet(), SHAPE), _sample(SHAPE)
    want = convert.torch_to_flax(tm, make_nnx_net(), x)
    got = convert.torch_to_flax(tm, _TakesTrain(nnx.Rngs(0)), x)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(got), nnx.to_pure_dict(want))
    needs = r"torch_to_flax: eval_kwargs=\{\} do not fit .*eval_kwargs=\{'deterministic': True\}"
    with pytest.raises(ValueError, match=needs):
        convert.torch_to_flax(tm, _NeedsDeterministic(nnx.Rngs(0)), x)
    got = convert.torch_to_flax(tm, _NeedsDeterministic(nnx.Rngs(0)), x, eval_kwargs={"deterministic": True})
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(got), nnx.to_pure_dict(want))


# --- diagnose -----------------------------------------------------------------------------------


def _kinds(items):
    return sorted({f.kind for f in items})


def test_bn_report_on_a_correct_nnx_port_finds_nothing_and_changes_nothing(port):
    tm, x, model = port
    before = _snapshot(model)
    given = jax.tree.map(np.array, convert.nnx_to_linen(model))  # writable NumPy: an in-place write would show
    kept = jax.tree.map(np.copy, given)
    for report in (diagnose.bn_report(tm, model, x),  # its own state
                   diagnose.bn_report(tm, model, nnx.state(model), x),
                   diagnose.bn_report(tm, model, given, x)):  # fmt: skip
        assert report.findings == [], str(report)
        assert [(c.torch_layer, c.flax_layer) for c in report.layers] == [("blocks.0", "blocks/0"),
                                                                        ("head_norm", "head_norm")]  # fmt: skip
        # torch.nn's unbiased running variance against flax.nnx.BatchNorm's biased one: a note; bnref's
        # layer keeps torch's estimator (convention 'torch'): nothing
        assert [(n.kind, n.flax_layer) for n in report.notes] == [("running_var", "blocks/0")]
    _assert_unchanged(model, before)
    jax.tree.map(np.testing.assert_array_equal, given, kept)


@pytest.mark.parametrize("bug, kwargs, kind", [("torch's momentum copied", {"momentum": 0.1}, "decay"),
                                               ("Keras's eps", {"epsilon": 1e-3}, "eps")])  # fmt: skip
def test_bn_report_finds_the_bugs_of_an_nnx_port(port, bug, kwargs, kind):
    tm, x, model = port
    buggy = NNXNet(nnx.Rngs(0), **kwargs)
    nnx.update(buggy, nnx.state(model))
    report = diagnose.bn_report(tm, buggy, x)
    assert [(f.kind, f.flax_layer) for f in report.findings] == [(kind, "blocks/0")], str(report)


def test_bn_report_finds_an_nnx_port_whose_statistics_were_never_converted(port):
    tm, x, model = port
    fresh = make_nnx_net()
    nnx.update(fresh, nnx.state(model, nnx.Param))  # the weights, not the BatchStats
    report = diagnose.bn_report(tm, fresh, x)
    assert "stats" in _kinds(report.findings) and "still their initial values" in str(report)


def test_cli_on_an_nnx_port_from_its_factory(port, tmp_path, capsys):
    tm, x, model = port
    torch.save(tm.state_dict(), tmp_path / "model.pt")
    linen = jax.tree.map(np.asarray, convert.nnx_to_linen(model))
    (tmp_path / "model.msgpack").write_bytes(serialization.msgpack_serialize(linen))
    argv = [str(tmp_path / "model.pt"), str(tmp_path / "model.msgpack"), "--input-shape", "3,6,6", "-n", "16",
            "--torch-model", "test_nnx_tools:make_torch_net", "--flax-model"]  # fmt: skip
    assert diagnose.main(argv + ["test_nnx_tools:make_nnx_net"]) == 0
    assert "No BatchNorm differences found." in capsys.readouterr().out
    assert diagnose.main(argv + ["test_nnx_tools:make_nnx_flipped"]) == 1
    assert "[decay] blocks.0 / blocks/0" in capsys.readouterr().out
    del linen["params"]["proj"]["bias"]
    (tmp_path / "model.msgpack").write_bytes(serialization.msgpack_serialize(linen))
    assert diagnose.main(argv + ["test_nnx_tools:make_nnx_net"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'model.msgpack'}: the variables do not fit the NNX model" in err, err


def test_cli_on_a_torch_run_and_an_nnx_run(tmp_path, tiny_fashion_dir, capsys):
    from bnref import train

    common = ["--epochs", "1", "--train-limit", "128", "--test-limit", "32", "--batch-size", "32", "--no-progress",
              "--data-dir", str(tiny_fashion_dir)]  # fmt: skip
    train.main(["--backend", "torch", "--out", str(tmp_path / "t"), *common])
    train.main(["--backend", "nnx", "--out", str(tmp_path / "n"), *common])
    capsys.readouterr()
    t, n = str(tmp_path / "t"), str(tmp_path / "n")
    assert diagnose.main([t, n, "-n", "32", "--data-dir", str(tiny_fashion_dir)]) == 0
    out = capsys.readouterr().out
    assert "4 pairs of BN layers measured" in out and "No BatchNorm differences found." in out
    assert diagnose.main([n, t, "--data-dir", str(tiny_fashion_dir)]) == 2  # an NNX run where the torch one goes
    assert "is a nnx run; a torch run goes here" in capsys.readouterr().err
    assert diagnose.main([t, t, "--data-dir", str(tiny_fashion_dir)]) == 2
    assert "is a torch run; a jax or nnx run goes here" in capsys.readouterr().err
