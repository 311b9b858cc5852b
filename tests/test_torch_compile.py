"""``--compile`` (``bnref.torch.compiled``): the compiled step against the eager one, BN's running
statistics under compile, its mode switches, what is compiled when, resume, and the seams
(strategy by device type, static batch buffers, the support check) on the CPU.

Inductor compiles each new model in ~30 s the first time on this 2-core CPU and in a few seconds
from its cache (``/tmp/torchinductor_$USER``); the two-epoch runs are module fixtures, shared by
the tests that read them."""

import dataclasses
import types
from typing import Dict, List

import pytest
import torch

from bnref import data, train
from bnref.config import TrainConfig
from bnref.torch import compiled
from bnref.torch import train as torch_train

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CPU = torch.device("cpu")
N, BATCH, EPOCHS = 160, 32, 2  # 5 full batches an epoch, 10 steps


def _graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _state(model) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclasses.dataclass
class Run:
    """What a two-epoch run of train_steps recorded."""

    losses: List[float]
    correct: List[int]
    initial: Dict[str, torch.Tensor]  # before the warm-up
    after_warm_up: Dict[str, torch.Tensor]
    first_step: Dict[str, torch.Tensor]  # after the first training step
    epochs: List[Dict[str, torch.Tensor]]  # the state after each epoch's evaluation
    eval_acc: List[float]  # evaluate() between the epochs (eval mode, running statistics)
    graphs: List[int]  # dynamo's graph count: before the warm-up, after it, after each epoch
    compile_seconds: float


def _run(bn: str, compile: bool, precision: str = "float32") -> Run:
    ds = data.synthetic(N, 64)
    X, y = torch_train.load_tensors(ds.train_images, ds.train_labels, CPU)
    model = torch_train.make_model(TrainConfig(backend="torch", bn=bn))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    step = torch_train.make_step(model, optimizer, CPU, compile=compile, precision=precision)
    initial, graphs = _state(model), [_graphs()]
    seconds = step.warm_up(X, y, torch.arange(BATCH))
    after, losses, correct, states, accs, first = _state(model), [], [], [], [], None
    graphs.append(_graphs())
    for epoch in range(1, EPOCHS + 1):
        for s in torch_train.train_steps(model, optimizer, X, y, seed=0, batch_size=BATCH, epochs=(epoch,), step=step):
            losses.append(float(s.loss))
            correct.append(int(s.correct))
            first = _state(model) if len(losses) == 1 else first
        accs.append(torch_train.evaluate(model, X, y, precision=precision))  # model.eval(), as fit does
        states.append(_state(model))
        graphs.append(_graphs())
    return Run(losses, correct, initial, after, first, states, accs, graphs, seconds)


@pytest.fixture(scope="module", params=["bnref", "builtin"])
def runs(request):
    """``(eager, compiled)`` two-epoch runs of one BN (bnref's, torch.nn's), same seed and data."""
    return request.param, _run(request.param, False), _run(request.param, True)


def test_warm_up_compiles_and_leaves_the_model_exactly_as_it_was(runs):
    bn, eager, comp = runs
    assert comp.compile_seconds > 0 and eager.compile_seconds == 0.0
    assert comp.graphs[1] - comp.graphs[0] == 2, comp.graphs  # the forward (with its backward) and the SGD update
    for k, v in comp.initial.items():
        assert torch.equal(v, comp.after_warm_up[k]), f"{k} ({bn}) changed by the warm-up"


def test_nothing_is_compiled_after_the_warm_up_over_two_epochs(runs):
    bn, _, comp = runs
    # batch_slices gives full batches only, so every step has the warm-up's shape; the
    # evaluation between the epochs (eager, eval mode) does not disturb the compiled train step.
    assert comp.graphs[1:] == [comp.graphs[1]] * (EPOCHS + 1), f"{bn}: graphs {comp.graphs}"


def test_compiled_losses_and_weights_equal_eager_to_float_reassociation(runs):
    bn, eager, comp = runs
    assert len(comp.losses) == len(eager.losses) == EPOCHS * (N // BATCH)
    worst = max(abs(a - b) for a, b in zip(comp.losses, eager.losses))
    assert worst <= 1e-5, f"losses ({bn}) differ by {worst:.2e}: {comp.losses} vs {eager.losses}"
    assert comp.correct == eager.correct, bn
    for k, v in eager.epochs[-1].items():
        if k.endswith("weight") or k.endswith("bias"):
            err = float((comp.epochs[-1][k] - v).abs().max())
            assert err <= 1e-5 * (1 + float(v.abs().max())), f"{k} ({bn}) differs by {err:.2e}"


def test_running_statistics_are_updated_exactly_once_per_step(runs):
    bn, eager, comp = runs
    # After one step (the same weights going in): the running update to float reassociation, and
    # counted once. Updated twice, the means would be off by 10% of the batch's (decay 0.9).
    for k, v in eager.first_step.items():
        a = comp.first_step[k]
        if k.endswith("num_batches_tracked"):
            assert int(a) == int(v) == 1, f"{k} ({bn}): {int(a)}"
        elif "running" in k:
            err = float((a - v).abs().max())
            assert err <= 1e-6 * (1 + float(v.abs().max())), f"{k} ({bn}) after one step differs by {err:.2e}"
    # After each epoch: counted once per step; the statistics follow the weights, which lr 1.0
    # moves apart step after step (measured: torch.nn's bn2 running mean 1.5e-5 apart after 5 steps).
    for epoch, (a, b) in enumerate(zip(comp.epochs, eager.epochs), start=1):
        for k, v in b.items():
            if k.endswith("num_batches_tracked"):
                assert int(a[k]) == int(v) == epoch * (N // BATCH), f"{k} ({bn}) after epoch {epoch}: {int(a[k])}"
            elif "running" in k:
                err = float((a[k] - v).abs().max())
                assert err <= 3e-5 * (1 + float(v.abs().max())), f"{k} ({bn}) after epoch {epoch} differs by {err:.2e}"


def test_evaluation_between_compiled_epochs_uses_the_running_statistics(runs):
    bn, eager, comp = runs
    # evaluate() switched the model to eval mode between the epochs: the compiled epoch after it
    # trained in train mode (its losses matched above) and evaluation agrees with eager's.
    assert comp.eval_acc == eager.eval_acc, bn


@pytest.mark.parametrize("bn", ["bnref", "builtin"])
def test_a_compiled_model_honours_train_eval_train(bn):
    """The layer itself under torch.compile: train mode normalizes with the batch and updates the
    running statistics once, eval mode normalizes with them and changes nothing, and back."""
    import copy

    model = torch_train.make_model(TrainConfig(backend="torch", bn=bn))
    twin = copy.deepcopy(model)
    fast = torch.compile(model, dynamic=False, fullgraph=True)
    X = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    for mode in ("train", "eval", "train"):
        getattr(model, mode)(), getattr(twin, mode)()
        before = _state(model)
        with torch.no_grad():
            out, ref = fast(X), twin(X)
        assert float((out - ref).abs().max()) <= 1e-5, f"{mode} ({bn})"
        for k, v in twin.state_dict().items():
            err = float((model.state_dict()[k].double() - v.double()).abs().max())
            assert err <= 1e-6, f"{k} in {mode} ({bn}) differs by {err:.2e}"
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        if mode == "eval":
            assert changed == [], f"eval changed {changed} ({bn})"
        else:
            assert all(int(model.state_dict()[f"bn{i}.num_batches_tracked"]) - int(before[f"bn{i}.num_batches_tracked"]) == 1
                       for i in (1, 2, 3, 4)), bn  # fmt: skip
            assert {k.rsplit(".", 1)[1] for k in changed} == {"running_mean", "running_var", "num_batches_tracked"}, bn


def test_a_resumed_compiled_run_equals_an_uninterrupted_one(tiny_fashion_dir, tmp_path):
    from bnref.config import TIMING_KEYS

    def cli(out, epochs, *extra):
        return ["--backend", "torch", "--data-dir", str(tiny_fashion_dir), "--no-download", "--batch-size", "128",
                "--no-progress", "--compile", "--epochs", str(epochs), *extra]  # fmt: skip

    whole = train.main(cli(tmp_path, 2, "--out", str(tmp_path / "whole")))
    train.main(cli(tmp_path, 1, "--out", str(tmp_path / "cut")))
    resumed = train.main(cli(tmp_path, 2, "--resume", str(tmp_path / "cut")))
    # (an epoch's "epochs" is the --epochs of the process that trained it: 1 in the cut run)
    strip = lambda h: [{k: v for k, v in m.items() if k not in (*TIMING_KEYS, "epochs")} for m in h]  # noqa: E731
    assert strip(resumed) == strip(whole)
    assert whole[0]["compile_seconds"] > 0 and whole[1]["compile_seconds"] == 0.0
    assert resumed[1]["compile_seconds"] > 0  # the resumed process compiled again, before its first epoch
    a = torch.load(tmp_path / "whole" / "checkpoint", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint", weights_only=True)["model"]
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def test_compiled_bfloat16_keeps_float32_state_and_follows_eager_bfloat16():
    eager, comp = _run("bnref", False, "bfloat16"), _run("bnref", True, "bfloat16")
    assert all(v.dtype in (torch.float32, torch.int64) for v in comp.epochs[-1].values())
    # the same rounding points (autocast's), different fusion: bfloat16's tolerance, not float32's
    worst = max(abs(a - b) for a, b in zip(comp.losses, eager.losses))
    assert worst <= 0.05, f"losses differ by {worst:.3f}"
    assert comp.graphs[2:] == [comp.graphs[1]] * EPOCHS, comp.graphs


# --- the seams, on the CPU -------------------------------------------------------------------


def test_the_cuda_strategy_s_plain_code_runs_on_the_cpu(monkeypatch):
    """CUDA's strategy but inductor's default mode, on the CPU: 3 warm-up calls, static addresses
    marked (the batch buffers, the parameters, BN's buffers), a CUDA-graph step begun per call and
    the outputs cloned; the steps still equal eager ones."""
    cuda = compiled.compile_strategy("cuda")
    monkeypatch.setitem(compiled._STRATEGIES, "cpu", dataclasses.replace(cuda, mode="default"))
    marked = []
    real_mark = torch._dynamo.mark_static_address
    monkeypatch.setattr(torch._dynamo, "mark_static_address", lambda t, *a, **k: marked.append(t) or real_mark(t, *a, **k))
    begun = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: begun.append(1))
    ds = data.synthetic(64, 16)
    X, y = torch_train.load_tensors(ds.train_images, ds.train_labels, CPU)
    results = []
    for compile in (False, True):
        model = torch_train.make_model(TrainConfig(backend="torch"))
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        step = torch_train.make_step(model, optimizer, CPU, compile=compile)
        step.warm_up(X, y, torch.arange(BATCH))
        losses = [step(X, y, torch.arange(i, i + BATCH))[0] for i in (0, 16, 32)]
        results.append((losses, model))
    (eager, _), (comp, model) = results
    assert begun == [1] * (cuda.warmup_calls + 3)  # a new CUDA-graph step at every call, warm-up's included
    assert max(abs(float(a) - float(b)) for a, b in zip(comp, eager)) <= 1e-5
    ids = {id(t) for t in marked}
    expected = [*model.parameters(), *model.buffers()]
    assert all(id(t) in ids for t in expected) and len(marked) == len(expected) + 2  # + the batch's X and y


@pytest.mark.parametrize("device_type,mode,cudagraphs", [("cpu", "default", False), ("cuda", "reduce-overhead", True)])
def test_compile_strategy_by_device_type(device_type, mode, cudagraphs):
    s = compiled.compile_strategy(device_type)
    assert (s.mode, s.cudagraphs, s.static_inputs) == (mode, cudagraphs, cudagraphs)
    assert s.warmup_calls >= (3 if cudagraphs else 1)  # CUDA graph trees: run once, record, then replay


def test_compile_strategy_refuses_another_device_type():
    with pytest.raises(ValueError, match="no compile strategy for device type 'mps'"):
        compiled.compile_strategy("mps")


@pytest.mark.parametrize("fake", [types.SimpleNamespace(__version__="1.13.1"),
                                  types.SimpleNamespace(__version__="2.1.2", compile=lambda *a, **k: None)],
                         ids=["no-torch.compile", "too-old"])  # fmt: skip
def test_a_torch_without_a_usable_compile_is_a_one_line_error(fake):
    with pytest.raises(ValueError) as e:
        compiled.check_compile_support("cpu", torch_module=fake)
    message = str(e.value)
    assert "\n" not in message and fake.__version__ in message and "--compile needs torch >= 2.2" in message


def test_compile_is_refused_before_any_work_for_a_torch_without_it(tiny_fashion_dir, monkeypatch, usage_error):
    monkeypatch.setattr(compiled, "check_compile_support", _refuse)
    err = usage_error(train.main, ["--backend", "torch", "--data-dir", str(tiny_fashion_dir), "--no-download",
                                   "--compile", "--epochs", "1", "--no-progress", "--no-out"]).err  # fmt: skip
    assert "--compile needs torch" in err and "Traceback" not in err, err


def _refuse(device_type, torch_module=None):
    raise ValueError("--compile needs torch >= 2.2 (torch.compile); this is torch 1.13.1")


def test_static_batch_gathers_every_batch_into_the_same_buffers():
    X, y = torch.rand(10, 1, 28, 28), torch.arange(10)
    batch = compiled.StaticBatch(X, y, 4)
    where = batch.X.data_ptr(), batch.y.data_ptr()
    for idx in (torch.tensor([3, 1, 4, 0]), torch.tensor([9, 2, 6, 5])):
        Xb, yb = batch.load(X, y, idx)
        assert (Xb.data_ptr(), yb.data_ptr()) == where
        assert torch.equal(Xb, X[idx]) and torch.equal(yb, y[idx])


@pytest.mark.parametrize("change,message", [
    (lambda X, y, idx: (X, y, idx[:3]), "a batch of (3,) indices; this compiled step takes exactly 4"),
    (lambda X, y, idx: (X.double(), y, idx), "X is (1, 28, 28) torch.float64"),
    (lambda X, y, idx: (X[:, :, :14], y, idx), "X is (1, 14, 28)"),
], ids=["size", "dtype", "features"])  # fmt: skip
def test_static_batch_refuses_a_batch_that_would_recompile(change, message):
    X, y = torch.rand(10, 1, 28, 28), torch.arange(10)
    batch = compiled.StaticBatch(X, y, 4)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        batch.load(*change(X, y, torch.arange(4)))


def test_snapshot_and_restore_put_the_values_back_in_the_same_tensors():
    model = torch_train.make_model(TrainConfig(backend="torch"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    tensors = {k: v for k, v in model.state_dict().items()}
    saved = compiled.snapshot(model, optimizer)
    torch_train.train_step(model, optimizer, torch.rand(8, 1, 28, 28), torch.arange(8))
    compiled.restore(model, optimizer, saved)
    for k, v in model.state_dict().items():
        assert v.data_ptr() == tensors[k].data_ptr() and torch.equal(v, saved[0][k]), k
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kwargs,message", [({"momentum": 0.9}, "'momentum': 0.9"), ({"weight_decay": 1e-4},
                         "'weight_decay': 0.0001")], ids=["momentum", "weight-decay"])  # fmt: skip
def test_the_compiled_step_refuses_an_sgd_it_does_not_implement(kwargs, message):
    model = torch_train.make_model(TrainConfig(backend="torch"))
    with pytest.raises(ValueError, match=message):
        torch_train.make_step(model, torch.optim.SGD(model.parameters(), lr=0.1, **kwargs), CPU, compile=True)
    with pytest.raises(ValueError, match="got Adam"):
        torch_train.make_step(model, torch.optim.Adam(model.parameters()), CPU, compile=True)


def test_the_sgd_update_is_torch_s_sgd_step():
    torch.manual_seed(0)
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    for p, t in zip(params, twins):
        p.grad = torch.randn_like(p)
        t.grad = p.grad.clone()
    compiled._sgd_update(params, [p.grad for p in params], 0.3)
    torch.optim.SGD(twins, lr=0.3).step()
    assert all(torch.equal(p, t) for p, t in zip(params, twins))


def test_train_steps_refuses_a_step_made_for_another_model():
    model, other = (torch_train.make_model(TrainConfig(backend="torch")) for _ in range(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    step = torch_train.make_step(other, torch.optim.SGD(other.parameters(), lr=0.1), CPU)
    X, y = torch.rand(8, 1, 28, 28), torch.arange(8)
    with pytest.raises(ValueError, match="another model or optimizer"):
        next(torch_train.train_steps(model, optimizer, X, y, seed=0, batch_size=4, epochs=(1,), step=step))
