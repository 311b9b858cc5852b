"""The layer-by-layer comparison of two models, and the input orders it decides.

:class:`_Walk` compares every paired layer's input and output in Flax call order, each to the
bound of the precision the Flax model computes in up to there (:data:`CHECK_RTOL`,
:func:`check_rtol`; errors relative to the largest value, :func:`_rel_error`), and names a
difference where the models part: at the layer whose output differs though its input agrees
(``_ITSELF``: padding, stride, eps, ...), or between layers (``_BETWEEN``: an activation,
pooling, a skip connection, ...). :func:`_decide_order` finds the order of a layer fed a flat
vector, once everything called before it agrees. NumPy only (ml_dtypes for other floats).
"""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from bnref.convert.layers import Layer, _pair_where
from bnref.convert.layout import _as_flax_order, _candidate_orders, flatten_permutation
from bnref.convert.values import _is_float


#: relative tolerance of the layer-by-layer comparison, by the lowest precision the Flax model
#: computes or keeps its weights in up to that layer: a float64 run agrees to rounding, a
#: float32 one to ~1e3 ulps, and a half-precision port rounds every activation to 8 (bfloat16)
#: or 11 (float16) bits, so its bound is set by that rounding compounded over a deep network.
#: (Measured: a 17-layer residual CNN ported in float16 parts from torch's float64 by at most
#: 2e-3 at any layer's input, in bfloat16 by 1.4e-2; a port that computes something else, by O(1).)
CHECK_RTOL = {"float64": 1e-7, "float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}
CHECK_RTOL64, CHECK_RTOL32 = CHECK_RTOL["float64"], CHECK_RTOL["float32"]


def check_rtol(dtypes) -> float:
    """The bound (relative to the largest value, see :func:`_rel_error`) for results computed
    in ``dtypes``: that of the least precise one (``CHECK_RTOL``; another float: 10 ulps)."""
    import ml_dtypes

    rtol = CHECK_RTOL["float64"]
    for dt in dtypes:
        dt = np.dtype(dt)
        if _is_float(dt):
            rtol = max(rtol, CHECK_RTOL.get(dt.name, 10 * float(ml_dtypes.finfo(dt).eps)))
    return rtol


def _rel_error(a, b) -> float:
    """``max|a - b| / (max|a| + 1)`` in float64; NaN when either holds a NaN (it never passes)."""
    a, b = np.asarray(a).astype(np.float64), np.asarray(b).astype(np.float64)
    if a.shape != b.shape:
        return float("nan")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b))) / (float(np.max(np.abs(a))) + 1.0)


_BETWEEN = ("an activation (relu vs relu6?), pooling, a skip connection, a channel shuffle, a reshape, or the "
            "layers' order?")  # fmt: skip
_ITSELF = {
    "conv": "padding: Flax's 'SAME' pads a stride-2 layer (0, 1), torch's padding=k//2 pads both sides; stride, "
            "dilation, groups?",
    "dense": "use_bias?",
    "bn": "epsilon, axis, use_scale/use_bias, a mode not set by eval_kwargs? bnref.diagnose.bn_report compares BN "
          "layers in detail",
}  # fmt: skip


class _Walk:
    """Compares the paired layers' inputs and outputs in Flax call order, on runs of both models,
    each against the bound of the precision computed in up to there (:func:`check_rtol`).
    Remembers the first layer whose output differs though its input agrees (``faulty``), so that
    the first input that differs is blamed on that layer, or else on what lies between layers.
    ``strict``: raise at the first difference; otherwise keep its message in ``first_diff``."""

    def __init__(self, where: str, strict: bool, var_dtypes: Optional[Mapping] = None):
        self.where, self.strict, self.var_dtypes = where, strict, dict(var_dtypes or {})
        self.done = 0  # pairs[:done] compared
        self.dtypes = {np.dtype(np.float64)}  # what the Flax layers before pairs[done] computed and kept in
        self.faulty = None  # (torch layer, Flax layer, error)
        self.first_diff = None
        self.rtol = CHECK_RTOL["float64"]

    def blame(self, between: str) -> str:
        if self.faulty is not None:
            t, f, err = self.faulty
            return (f": the output of {_pair_where(t, f)} already differs (by {err:.2g}) though its input agrees, so "
                    f"that layer is set up differently ({_ITSELF[t.kind]})")  # fmt: skip
        return f", though every layer called before it agrees: {between}"

    def differ(self, what: str, err: float, rtol: float, between: str) -> None:
        msg = (f"{self.where}: {what} differs between the models by {err:.2g} (relative; the bound is {rtol:g}) on "
               f"sample_input{self.blame(between)}")  # fmt: skip
        if self.strict:
            raise ValueError(msg)
        if self.first_diff is None:
            self.first_diff = msg

    def run(self, pairs, flayers: Mapping, perms: Mapping, pending=()):
        """Compare ``pairs[done:]`` on this Flax run (``flayers`` by name) up to the first Flax
        layer named in ``pending``; return ``(torch layer, Flax layer, bound)`` for it, or None."""
        for i in range(self.done, len(pairs)):
            t, f = pairs[i][0], flayers[pairs[i][1].name]
            dtypes = self.dtypes | {f.input.dtype}
            rtol = check_rtol(dtypes)
            if f.name in pending:
                return t, f, rtol
            perm = perms.get(f.name)
            err = _rel_error(_as_flax_order(t.input, perm), f.input)
            if not err <= rtol:
                self.differ(f"the input of {_pair_where(t, f)}", err, rtol, f"something between them differs ({_BETWEEN})")
            dtypes = dtypes | {f.output.dtype} | set(self.var_dtypes.get(f.name, ()))
            out_err = _rel_error(_as_flax_order(t.output, perm if t.kind == "bn" else None), f.output)
            if not out_err <= check_rtol(dtypes) and self.faulty is None and self.first_diff is None:
                self.faulty = (t, f, out_err)
            self.dtypes, self.done = dtypes, i + 1
        return None

    def output(self, tout: np.ndarray, fout: np.ndarray) -> None:
        self.rtol = check_rtol(self.dtypes | {fout.dtype})
        a = _as_flax_order(tout, None)
        if a.shape != fout.shape:
            raise ValueError(f"{self.where}: the output has shape {a.shape} in torch (channels-last) and {fout.shape} in "
                             "Flax: the models differ after their last layer")  # fmt: skip
        err = _rel_error(a, fout)
        if not err <= self.rtol:
            self.differ("the output", err, self.rtol, "something after the last layer differs (a final activation, "
                        "pooling, a reshape?)")  # fmt: skip


def _decide_order(t: Layer, f: Layer, pred: Optional[Layer], inherited, model_ndim: int, rtol: float, walk: _Walk,
                  where: str):  # fmt: skip
    """The order ``(P, label)`` of a flat input (``f.input[:, j] == t.input[:, P[j]]``), every
    layer called before it agreeing (``walk``). With no flatten since the torch layer before it
    (``pred``'s output, or the model's input, is already flat) the order is the one that layer
    left (``inherited``; as is after a Linear); after a flatten, the one flatten order (over the
    factorizations C x S of the width) that fits within ``rtol``. Each way it can fail has its
    own message: all-zero inputs, several orders fit, none does."""
    pair, width = _pair_where(t, f), t.input.shape[1]
    flat_before = (pred.output.ndim == 2) if pred is not None else model_ndim == 2
    cands = ([("as the layer before it left it", inherited)] if flat_before and inherited is not None else [])
    cands += _candidate_orders(width)
    errs = [(_rel_error(t.input[:, p], f.input), label, p) for label, p in cands]
    fits, seen = [], set()
    for e in errs:
        if e[0] <= rtol and e[2].tobytes() not in seen:
            seen.add(e[2].tobytes())
            fits.append(e)
    if flat_before and errs[0][0] <= rtol:  # no flatten in between: the order it came in, if it fits
        return errs[0][2], errs[0][1]
    if len(fits) == 1:
        return fits[0][2], fits[0][1]
    if fits:
        if not np.any(t.input) and not np.any(f.input):
            raise ValueError(f"{where}: {pair}: the layer's {width} inputs are zero on every example of sample_input "
                             "(dead ReLUs?), so they cannot tell one flatten order from another: pass examples (or "
                             "weights) that activate them")  # fmt: skip
        dead = int(np.sum(~np.any(t.input != 0, axis=0)))
        note = f"; {dead} of the inputs are zero on every example" if dead else ""
        raise ValueError(f"{where}: {pair}: the sample input does not decide the order of the layer's {width} inputs "
                         f"(the flatten orders {fits[0][1]} and {fits[1][1]} both fit{note}): pass more, and more "
                         "varied, examples")  # fmt: skip
    ranked = sorted(errs, key=lambda e: e[0])
    decided = len(ranked) == 1 or ranked[0][0] * 10 < ranked[1][0]  # check=False: the clearly closest one
    if walk.first_diff is None:
        if flat_before:
            walk.differ(f"the input of {pair}", errs[0][0], rtol, f"something between them differs ({_BETWEEN})")
            return errs[0][2], errs[0][1]  # check=False: no flatten in between, so no other order to try
        before = f"torch {pred.name!r}" if pred is not None else "the model's input"
        msg = (f"{where}: {pair}: no flatten order fits the layer's {width} inputs on sample_input (the closest, "
               f"{ranked[0][1]}, is off by {ranked[0][0]:.2g}; the bound is {rtol:g})"
               + walk.blame(f"the models differ between {before} and it (pooling, an activation, a skip connection, "
                            "a flatten of another layout?)"))  # fmt: skip
        if walk.strict or not decided:
            raise ValueError(msg)
        walk.first_diff = msg
    if decided:
        return ranked[0][2], ranked[0][1]
    # check=False, the models already differ below: the data cannot decide, so take the flatten of
    # the torch layer before's map (C = its channels), when there is one; never a guess among the rest
    c = pred.output.shape[1] if pred is not None and pred.output.ndim >= 3 else None
    if c is not None and width % c == 0:
        return flatten_permutation(c, width), f"(C={c}, S={width // c})"
    raise ValueError(f"{walk.first_diff}; so the order of the inputs of {pair} cannot be found on it")
