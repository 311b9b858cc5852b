"""Find the BatchNorm bugs of a PyTorch <-> Flax port: ``bn_report(torch_module, flax_module,
flax_variables, sample_input)`` (``python -m bnref.diagnose`` on two checkpoints is
:mod:`bnref.diagnose.cli`).

A port whose BN layers differ trains to the same loss (in training mode the running statistics
play no part) and evaluates only a little worse, so nobody notices. This report runs each
model on one batch (``sample_input``, NCHW NumPy; channels-last for Flax) in training mode
(torch ``train()``, Flax ``train_kwargs`` with ``mutable=["batch_stats"]``) and in
evaluation mode, pairs the BN layers as :mod:`bnref.convert` does, and for every pair compares:

- ``decay``: the running-statistics update of that one step, measured per side as the implied
  decay ``d = 1 - (new - old) / (batch_mean - old)`` (median over channels), i.e. the weight of
  the old value. torch's ``momentum=0.1`` and Flax's ``momentum=0.9`` are both ``d = 0.9``;
  Flax's ``momentum=0.1`` copied from torch is ``d = 0.1``: the update is 9x torch's.
- ``eps``: the layers' eps (torch ``eps``, Flax ``epsilon``; Keras uses 1e-3).
- ``running_var``: which batch variance enters the running average (torch.nn: unbiased,
  n/(n-1); flax.linen: biased). Between torch.nn and flax.linen this is not a bug but a
  difference neither layer can remove: it is a *note*, and a *finding* when a bnref layer (whose
  estimator is a choice) is involved.
- ``axis``: a Flax layer must normalize the last (channel) axis of a channels-last input.
- ``mode``: in the training call each layer must normalize with the batch's statistics, in the
  evaluation call with its running statistics (a ``use_running_average`` not tied to ``train``).
- ``stats``: a layer's output in training must be the exact normalization of its input
  (Flax's default ``use_fast_variance=True`` computes ``E[x^2] - E[x]^2``, which cancels when the
  mean is large next to the spread); stored statistics still at their initial values (0, 1)
  while the other side's are trained (a Flax loop that never keeps the ``batch_stats``
  update); stored statistics that differ while the layers' inputs agree (statistics not
  converted).
- ``nonfinite``: a NaN or inf in a layer's stored weights or statistics, in its input or output
  in either call, or in a model's output; nothing else is compared on a pair where one is found
  (every measurement would be NaN), and each side reports only its first (the stored values,
  then the training call, then the evaluation call): the first pair that reports an input is
  nearest the layer that produced it.
- ``sample``: a layer whose input is constant over the batch in every channel on this
  ``sample_input`` (std <= 1e-6 |mean|: zero up to rounding): the normalization leaves nothing
  to measure, so its ``mode`` and ``stats`` are not checked, and saying so is a finding (a
  check not made is not a pass). A layer with only some such channels is measured on the others.

``sample_input`` whose examples are all identical is refused (``ValueError``): the batch
statistics of one example repeated are not a batch's.

Neither model is modified. ``report.findings`` lists what to change (empty for a correct
port), ``report.notes`` inherent differences, ``report.layers`` the measurements; ``str(report)``
is the readable version.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional

import numpy as np

from bnref import spec

__all__ = ["KINDS", "Finding", "LayerComparison", "Report", "bn_report"]

KINDS = ("decay", "eps", "running_var", "axis", "mode", "stats", "nonfinite", "sample")


@dataclasses.dataclass(frozen=True)
class Finding:
    """One difference: ``kind`` (one of :data:`KINDS`), the two layers' names, and a message
    saying what differs and what to change."""

    kind: str
    torch_layer: str
    flax_layer: str
    message: str

    def __str__(self) -> str:
        return f"[{self.kind}] torch {self.torch_layer!r} / Flax {self.flax_layer!r}: {self.message}"


@dataclasses.dataclass(frozen=True)
class LayerComparison:
    """What was measured on one pair of BN layers (``None``: not measurable on this sample)."""

    torch_layer: str
    flax_layer: str
    channels: int
    values_per_channel: int  # n, the values each channel's batch statistics are taken over
    decay: tuple  # (torch, flax): measured weight of the old running value
    eps: tuple  # (torch, flax)
    running_var: tuple  # (torch, flax): "biased" / "unbiased"
    train_error: tuple  # (torch, flax): max |y - exact batch normalization| / max |exact - bias| (None: no spread)
    inputs_agree: bool  # the two layers' inputs on sample_input agree (same weights below)


@dataclasses.dataclass(frozen=True)
class Report:
    layers: List[LayerComparison]
    findings: List[Finding]
    notes: List[Finding]

    @property
    def ok(self) -> bool:
        return not self.findings

    def __str__(self) -> str:
        lines = [f"BatchNorm report: {len(self.layers)} pairs of BN layers measured, "
                 f"{len(self.findings)} finding{'s' * (len(self.findings) != 1)}"]  # fmt: skip
        lines.append(f"  {'torch':<16} {'Flax':<16} {'C':>5} {'decay t/f':>13} {'eps t/f':>15} {'running var t/f':>19}")
        for c in self.layers:
            decay = "/".join("?" if d is None else f"{d:.3g}" for d in c.decay)
            lines.append(f"  {c.torch_layer:<16} {c.flax_layer:<16} {c.channels:>5} {decay:>13} "
                         f"{'/'.join(f'{e:g}' for e in c.eps):>15} {'/'.join(c.running_var):>19}")  # fmt: skip
        for title, items in (("Findings (change these):", self.findings), ("Notes:", self.notes)):
            if items:
                lines.append(title)
                lines += _grouped(items)
        if not self.findings:
            lines.append("No BatchNorm differences found.")
        return "\n".join(lines)


def _grouped(items: List[Finding]) -> List[str]:
    """One line per (kind, message), naming every pair of layers it holds for."""
    groups: Dict[tuple, List[str]] = {}
    for f in items:
        groups.setdefault((f.kind, f.message), []).append(f"{f.torch_layer} / {f.flax_layer}")
    return [f"- [{kind}] {', '.join(where)}: {message}" for (kind, message), where in groups.items()]


# --- reading the layers ---


def _torch_estimator(m) -> str:
    from bnref.torch.layers import running_var_estimator

    return running_var_estimator(m)  # bnref's layers keep a choice; torch.nn: unbiased


def _flax_eps_and_estimator(m) -> tuple:
    if hasattr(m, "resolved_convention"):  # bnref.jax.BatchNorm
        conv = m.resolved_convention()
        return conv.eps, conv.running_var
    return m.epsilon, "biased"  # flax.linen.BatchNorm


def _is_bnref(m) -> bool:
    return type(m).__module__.startswith("bnref.")  # bnref's layers, torch's or JAX's


def _flax_axes(m, ndim: int) -> tuple:
    from bnref.jax._core import feature_axes  # Flax's axis rule, as bnref.jax applies it

    return feature_axes(ndim, m.axis)


def _normalized(x, channel_axis: int, mean, var, eps: float, scale, bias):
    """The spec's normalization of ``x`` with the given statistics (float64): ``(y, y - bias)``."""
    conv = spec.Convention(decay=0.0, eps=eps)  # decay plays no part in evaluation mode
    centered = spec.batch_norm_eval(x, scale, None, mean, var, conv, axis=channel_axis)
    return (centered if bias is None else spec.batch_norm_eval(x, scale, bias, mean, var, conv, axis=channel_axis)), centered


def _rel_error(y, want, centered, axis: int, live) -> Optional[float]:
    """``max |y - want| / max |centered|`` over the channels ``live`` (those whose input has a
    spread: elsewhere ``centered`` is 0 and the ratio would be rounding divided by 0); None when
    no channel is live."""
    if not np.any(live):
        return None
    y, want, centered = (np.compress(live, np.asarray(a, np.float64), axis=axis) for a in (y, want, centered))
    return float(np.max(np.abs(y - want))) / (float(np.max(np.abs(centered))) + 1e-30)


def _count_nonfinite(a) -> int:
    return 0 if a is None else int(np.size(a) - np.count_nonzero(np.isfinite(np.asarray(a, np.float64))))


def _first_nonfinite(side: str, stored: Mapping, updated: Mapping, layer, eval_layer) -> Optional[str]:
    """The first place (stored values, then the training call, then the evaluation call) where
    this side of a BN layer holds a NaN or inf, as a message; None when everything is finite."""
    who = _label(side)
    for what, a in stored.items():
        if k := _count_nonfinite(a):
            return (f"{who}'s stored {what} holds {k} non-finite value(s) (NaN or inf) of {np.size(a)}: the weights "
                    "or statistics given are broken (a diverged run, a bad checkpoint or conversion)")  # fmt: skip
    for call, lay, after in (("training", layer, updated), ("evaluation", eval_layer, {})):
        if k := _count_nonfinite(lay.input):
            return (f"{who}'s input in the {call} call holds {k} non-finite value(s) (NaN or inf) of "
                    f"{lay.input.size}: a layer below it produced them (the first pair reporting its input is "
                    "nearest that layer)")  # fmt: skip
        if k := _count_nonfinite(lay.output):
            return (f"{who}'s output in the {call} call holds {k} non-finite value(s) (NaN or inf) of "
                    f"{lay.output.size} although its input and stored values are finite (a negative variance?)")
        for what, a in after.items():
            if k := _count_nonfinite(a):
                return (f"{who}'s {what} after the training call holds {k} non-finite value(s) (NaN or inf) "
                        "although its input is finite")  # fmt: skip
    return None


def _implied_decay(old, new, batch_mean, spread) -> Optional[float]:
    """The weight of the old value in ``new = d*old + (1-d)*batch_mean``, median over the
    channels whose batch mean is clearly away from the old value."""
    old, new = np.asarray(old, np.float64), np.asarray(new, np.float64)
    gap = batch_mean - old
    usable = np.abs(gap) > 1e-2 * (spread + np.abs(old) + 1e-12)
    if not usable.any():
        return None
    return float(np.median(1.0 - (new[usable] - old[usable]) / gap[usable]))


def _side(layer, before: Mapping, after: Mapping, eval_layer, framework: str) -> Dict:
    """One side's measurements of one BN layer."""
    m = layer.module
    if framework == "torch":
        axis, eps, est = 1, m.eps, _torch_estimator(m)
        scale = m.weight.detach().cpu().numpy() if m.affine else None
        bias = m.bias.detach().cpu().numpy() if m.affine and m.bias is not None else None
        names = {"weight": scale, "bias": bias, "running_mean": before.get("mean"), "running_var": before.get("var")}
        updated = {"running_mean": after.get("mean"), "running_var": after.get("var")}
    else:
        axes = _flax_axes(m, layer.input.ndim)
        axis = axes[0] if len(axes) == 1 else None
        eps, est = _flax_eps_and_estimator(m)
        scale, bias = before.get("scale"), before.get("bias")
        names = {"scale": scale, "bias": bias, "batch_stats mean": before.get("mean"), "batch_stats var": before.get("var")}
        updated = {"batch_stats mean": after.get("mean"), "batch_stats var": after.get("var")}
    out = {"axis": axis, "eps": float(eps), "estimator": est, "module": m, "input": layer.input}
    if axis is None:
        return out
    out.update(channels=layer.input.shape[axis], n=layer.input.size // layer.input.shape[axis])
    out["nonfinite"] = _first_nonfinite(framework, names, updated, layer, eval_layer)
    if out["nonfinite"]:  # every measurement below would be NaN
        return out
    mean, var = spec.batch_stats(layer.input, axis)  # the exact (float64, two-pass) batch statistics
    # A channel constant over the batch (zero spread up to rounding) normalizes to exactly its
    # bias: nothing there tells batch statistics from running ones, so it is left out.
    live = np.sqrt(var) > 1e-6 * np.abs(mean)
    out.update(mean=mean, var=var, live=live, old_mean=before.get("mean"), old_var=before.get("var"),
               new_mean=after.get("mean"))  # fmt: skip
    y_batch, centered = _normalized(layer.input, axis, mean, var, eps, scale, bias)
    out["train_error"] = _rel_error(layer.output, y_batch, centered, axis, live)
    if out["old_mean"] is not None:
        y_run, run_centered = _normalized(layer.input, axis, out["old_mean"], out["old_var"], eps, scale, bias)
        out["train_error_running"] = _rel_error(layer.output, y_run, run_centered, axis, live)
        ev_mean, ev_var = spec.batch_stats(eval_layer.input, axis)
        ev_live = np.sqrt(ev_var) > 1e-6 * np.abs(ev_mean)
        ev_batch, _ = _normalized(eval_layer.input, axis, ev_mean, ev_var, eps, scale, bias)
        ev_run, ev_centered = _normalized(eval_layer.input, axis, out["old_mean"], out["old_var"], eps, scale, bias)
        out["eval_error_batch"] = _rel_error(eval_layer.output, ev_batch, ev_centered, axis, ev_live)
        out["eval_error_running"] = _rel_error(eval_layer.output, ev_run, ev_centered, axis, ev_live)
        out["decay"] = (None if out["new_mean"] is None
                        else _implied_decay(out["old_mean"], out["new_mean"], mean, np.sqrt(var)))  # fmt: skip
    else:
        out["decay"] = None
    return out


def _stats_of(tree: Mapping, path: str) -> Dict:
    from bnref.convert import _layer_variables

    lv = _layer_variables(tree, path)
    return {**lv.get("params", {}), **{k: np.asarray(v) for k, v in lv.get("batch_stats", {}).items()}}


def _torch_stats(module) -> Dict:
    if getattr(module, "running_mean", None) is None:
        return {}
    return {"mean": module.running_mean.detach().cpu().numpy().copy(), "var": module.running_var.detach().cpu().numpy().copy()}


# --- the comparisons ---


def _compare(tn: str, fn: str, t: Dict, f: Dict, findings: List[Finding], notes: List[Finding]) -> Optional[LayerComparison]:
    def add(kind, message, into=findings):
        into.append(Finding(kind, tn, fn, message))

    if f["axis"] is None or f["axis"] != f["input"].ndim - 1 and f["input"].ndim >= 3:
        shape = f["input"].shape
        add("axis", f"Flax normalizes axis {f['axis'] if f['axis'] is not None else _flax_axes(f['module'], len(shape))} "
                    f"of its {shape} input, torch its channels ({t['input'].shape[1]}); Flax data is channels-last: "
                    "use axis=-1 (the default)")  # fmt: skip
        return None
    if t["channels"] != f["channels"]:
        add("axis", f"torch normalizes {t['channels']} channels, Flax {f['channels']} features: the layers do not "
                    "normalize the same axis")  # fmt: skip
        return None
    bad = [(side, s["nonfinite"]) for side, s in (("torch", t), ("flax", f)) if s["nonfinite"]]
    if bad:  # NaN compares false with everything: no other check can be trusted on this pair
        for _, message in bad:
            add("nonfinite", message)
        return None
    inputs_agree = _inputs_agree(t["input"], f["input"])
    flat = [side for side, s in (("torch", t), ("flax", f)) if s["train_error"] is None]
    if flat:
        add("sample", f"on this sample the input of {' and '.join(map(_label, flat))} is constant over the batch in "
                      "every channel: its mode and batch statistics cannot be checked here; use a sample_input "
                      "whose examples reach this layer with different values (real data)")  # fmt: skip
    broken_mode = set()
    # (call, the error of the wrong statistics, of the right ones, what was used, the fix per side)
    checks = (("training", "train_error_running", "train_error", "its running statistics, not the batch's",
               {"torch": "call model.train() before training", "flax": "pass use_running_average=not train"}),
              ("evaluation", "eval_error_batch", "eval_error_running", "the batch's statistics, not its running ones",
               {"torch": "call model.eval() before evaluating", "flax": "evaluate with use_running_average=True"}))
    for side, s in (("torch", t), ("flax", f)):
        for call, wrong, right, used, fix in checks:
            if wrong in s and s[wrong] is not None and s[right] is not None and s[wrong] < s[right] / 10:
                broken_mode.add(side)
                add("mode", f"{_label(side)} normalized with {used} in the {call} call: {fix[side]} to the layer")
    if abs(t["eps"] - f["eps"]) > 1e-9 * max(t["eps"], f["eps"]):
        add("eps", f"eps differs: torch eps={t['eps']:g}, Flax epsilon={f['eps']:g}; set the Flax layer's "
                   f"epsilon={t['eps']:g} (or torch's eps={f['eps']:g}); 1e-3 is Keras's default, 1e-5 torch's and Flax's")
    if t["estimator"] != f["estimator"]:
        msg = (f"torch averages the {t['estimator']} batch variance into its running variance, Flax the "
               f"{f['estimator']} one: each update differs by n/(n-1) (n values per channel and batch: "
               f"{t['n']} here, a factor {t['n'] / (t['n'] - 1):.5g})")  # fmt: skip
        if _is_bnref(t["module"]) or _is_bnref(f["module"]):
            add("running_var", msg + "; set the same running_var in both layers' conventions")
        else:
            add("running_var", msg + "; torch.nn cannot average the biased one nor flax.linen the unbiased one: "
                                     "bnref.jax.BatchNorm(convention='torch') or bnref.torch.BatchNorm2d(..., "
                                     "convention='d2l') removes it", notes)  # fmt: skip
    _compare_update(t, f, broken_mode, add)
    _compare_stats(t, f, inputs_agree, broken_mode, add)
    return LayerComparison(tn, fn, t["channels"], t["n"], (t["decay"], f["decay"]), (t["eps"], f["eps"]),
                           (t["estimator"], f["estimator"]), (t["train_error"], f["train_error"]), inputs_agree)  # fmt: skip


def _label(side: str) -> str:
    return "the torch layer" if side == "torch" else "the Flax layer"


def _compare_update(t: Dict, f: Dict, broken_mode: set, add) -> None:
    dt, df = t["decay"], f["decay"]
    if broken_mode or dt is None or df is None or abs(dt - df) <= 1e-3:
        return
    ratio = (1 - df) / (1 - dt) if dt != 1 else float("inf")
    add("decay", f"one training step moved Flax's running mean {ratio:.3g}x as far as torch's: Flax keeps "
                 f"{df:.3g} of the old value (its momentum), torch {dt:.3g} (torch momentum={1 - dt:.3g}). "
                 f"Flax's momentum is the weight of the OLD value, torch's the weight of the new batch: set the "
                 f"Flax layer's momentum={dt:.3g} (or torch's momentum={1 - df:.3g})")  # fmt: skip


def _compare_stats(t: Dict, f: Dict, inputs_agree: bool, broken_mode: set, add) -> None:
    lo_precision = any(np.dtype(s["input"].dtype).itemsize < 4 for s in (t, f))
    tol = 5e-2 if lo_precision else 1e-3
    for side, s, other in (("torch", t, f), ("flax", f, t)):
        if side in broken_mode:  # it did not normalize with batch statistics at all: that is the finding
            continue
        if s["train_error"] is None or other["train_error"] is None:  # no spread: the "sample" finding
            continue
        if s["train_error"] > tol and s["train_error"] > 100 * other["train_error"]:
            ratio = float(np.max(np.abs(s["mean"][s["live"]]) / np.sqrt(s["var"][s["live"]])))
            fast = getattr(s["module"], "use_fast_variance", False)
            fix = ("its variance is E[x²] - E[x]² (use_fast_variance=True, Flax's default), which cancels when the "
                   "mean is large next to the spread: set use_fast_variance=False" if fast else
                   "its batch statistics are not the exact ones")  # fmt: skip
            add("stats", f"{_label(side)}'s training output differs from the exact normalization of its input by "
                         f"{s['train_error']:.2g} (relative; the other side: {other['train_error']:.2g}); the input's "
                         f"mean is up to {ratio:.3g}x its std: {fix}")  # fmt: skip
    if t["old_mean"] is None or f["old_mean"] is None:
        return
    # sqrt(var + eps): the scale the layer divides by, also where the batch has no spread
    spread = np.sqrt(np.maximum(t["var"], f["var"]) + max(t["eps"], f["eps"]))
    dm = float(np.max(np.abs(t["old_mean"] - f["old_mean"]) / spread))
    dv = float(np.max(np.abs(np.log(np.maximum(t["old_var"], 1e-30) / np.maximum(f["old_var"], 1e-30)))))
    if dm <= 1e-3 and dv <= 1e-3:
        return
    differ = f"means by up to {dm:.2g} batch std, variances by up to a factor {np.exp(dv):.3g}"
    for side, s, other in (("flax", f, t), ("torch", t, f)):
        if _at_init(s) and not _at_init(other):
            fix = ("apply with mutable=['batch_stats'] and keep the returned updates['batch_stats'] "
                   "(state.replace(batch_stats=...)) after every step" if side == "flax" else
                   "train in model.train() mode and do not reset the buffers")  # fmt: skip
            add("stats", f"{_label(side)}'s stored running statistics are still their initial values (mean 0, var 1) "
                         f"while {_label('torch' if side == 'flax' else 'flax')}'s have moved ({differ}): the "
                         f"running-statistics update is never kept; {fix}")  # fmt: skip
            return
    if inputs_agree:
        add("stats", f"the stored running statistics differ ({differ}) although the layers' inputs agree: convert the "
                     "running statistics with the weights (bnref.convert.torch_to_flax does)")  # fmt: skip


def _at_init(s: Dict) -> bool:
    return bool(np.all(s["old_mean"] == 0) and np.all(s["old_var"] == 1))


def _inputs_agree(t_in: np.ndarray, f_in: np.ndarray) -> bool:
    from bnref.convert import channels_last

    a = channels_last(t_in)
    if a.shape != f_in.shape:
        return False
    a, b = np.asarray(a, np.float64), np.asarray(f_in, np.float64)
    if a.ndim == 2:  # a flattened vector may be in another order: compare each feature's sorted values
        a, b = np.sort(a, axis=0), np.sort(b, axis=0)
        a, b = a[:, np.lexsort(a)], b[:, np.lexsort(b)]
    return bool(np.max(np.abs(a - b), initial=0.0) <= 1e-4 * (np.max(np.abs(a), initial=0.0) + 1.0))


# --- the entry point ---


def bn_report(torch_module, flax_module, flax_variables, sample_input=None, *, train_kwargs: Optional[Mapping] = None,
              eval_kwargs: Optional[Mapping] = None) -> Report:  # fmt: skip
    """Compare every BN layer of ``torch_module`` with its partner in ``flax_module`` (with
    ``flax_variables``) on one batch, ``sample_input`` (NumPy, torch's layout: NCHW / NCL /
    NF, N >= 2). ``train_kwargs`` / ``eval_kwargs`` are the Flax module's mode arguments
    (default ``train=True`` / ``train=False``). Returns a :class:`Report`; neither model nor the
    variables change. Raises ``ValueError`` when the models' layers cannot be paired, when they
    have no BN layer, or when the examples of ``sample_input`` are all identical.

    ``flax_module`` may be an ``nnx.Module`` (``bnref.convert.nnx``): ``bn_report(torch_module,
    nnx_model, sample_input)``, its own state compared (or the ``nnx.State`` / linen variables
    given third), its mode NNX's (``model.train()`` / ``model.eval()``), ``train_kwargs`` /
    ``eval_kwargs`` what its own call takes besides."""
    from bnref.convert import as_linen, channels_last, check_sample, flax_layers, is_nnx, match_layers, torch_layers

    if is_nnx(flax_module):
        if sample_input is None and not isinstance(flax_variables, Mapping):  # (torch, nnx_model, sample)
            flax_variables, sample_input = None, flax_variables
        flax_module, flax_variables, train_kwargs, eval_kwargs = as_linen(
            flax_module, flax_variables, "bn_report", train_kwargs=train_kwargs, eval_kwargs=eval_kwargs)
    train_kwargs = {"train": True} if train_kwargs is None else dict(train_kwargs)
    eval_kwargs = {"train": False} if eval_kwargs is None else dict(eval_kwargs)
    x = check_sample(sample_input, "bn_report")
    if np.all(x == x[:1]):
        raise ValueError(f"bn_report: the {len(x)} examples of sample_input are all identical: their batch statistics "
                         "are one example's, not a batch's, and a layer fed the same vector N times has no spread to "
                         "measure; use distinct examples (real data, or random inputs)")  # fmt: skip
    if not isinstance(flax_variables, Mapping) or "params" not in flax_variables:
        raise ValueError("bn_report: flax_variables must be a mapping with a 'params' collection")
    t_train, t_out_train, _ = torch_layers(torch_module, x, train=True)
    t_eval, t_out_eval, _ = torch_layers(torch_module, x, train=False)
    xf = channels_last(x)
    f_train, f_out_train, updates = flax_layers(flax_module, flax_variables, xf, train_kwargs, mutable=["batch_stats"])
    # mutable in evaluation too: a layer that (wrongly) updates there is measured, not an exception
    f_eval, f_out_eval, _ = flax_layers(flax_module, flax_variables, xf, eval_kwargs, mutable=["batch_stats"])
    pairs = [(t, f) for t, f in match_layers(t_train, f_train) if t.kind == "bn"]
    if not pairs:
        raise ValueError("bn_report: the models have no BatchNorm layer: nothing to compare")
    t_originals = dict(torch_module.named_modules())
    t_ev, f_ev = {t.name: t for t in t_eval}, {f.name: f for f in f_eval}
    findings, notes, layers = [], [], []
    for t, f in pairs:
        ts = _side(t, _torch_stats(t_originals[t.name]), _torch_stats(t.module), t_ev[t.name], "torch")
        fs = _side(f, _stats_of(flax_variables, f.name), _stats_of(updates, f.name) if updates else {}, f_ev[f.name],
                   "flax")  # fmt: skip
        comparison = _compare(t.name, f.name, ts, fs, findings, notes)
        if comparison is not None:
            layers.append(comparison)
    for side, outputs in (("torch", (t_out_train, t_out_eval)), ("flax", (f_out_train, f_out_eval))):
        if any(f.kind == "nonfinite" and f.message.startswith(_label(side)) for f in findings):
            continue  # already traced to a BN layer
        model = "the torch model" if side == "torch" else "the Flax model"
        for call, out in zip(("training", "evaluation"), outputs):
            if k := _count_nonfinite(out):
                findings.append(Finding("nonfinite", "(output)", "(output)", f"{model}'s output in the {call} call holds "
                                        f"{k} non-finite value(s) (NaN or inf) although every BN layer's input and "
                                        "output are finite: a layer above the last BN layer (or its weights) produces "
                                        "them"))  # fmt: skip
                break
    return Report(layers, findings, notes)
