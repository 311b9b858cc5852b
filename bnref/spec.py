r"""The Batch Normalization specification: plain NumPy, float64, pure functions.

This module is the oracle every backend in bnref is tested against. Read it first.

Why BatchNorm exists
--------------------
Training a deep network is easier when every layer sees inputs on a stable scale.
Batch Normalization (Ioffe & Szegedy, 2015) standardizes each channel of a layer's
input with the statistics of the current minibatch, then lets the network undo that
with a learned per-channel scale ``gamma`` and shift ``beta``. The standardization
keeps activations centred and of unit variance however the earlier layers' weights
drift, which permits large learning rates (the d2l LeNet-BN trains at lr 1.0) and
acts as a mild regularizer, because each example's output depends on its batch.

At inference there may be no batch (or a batch of one), so the layer keeps
*running* estimates of each channel's mean and variance during training and uses
those instead. That running average is where frameworks silently disagree, so here
every choice is an explicit field of :class:`Convention`.

Shapes
------
``x`` has rank >= 2; ``axis`` names its channel axis (1 for NC, NCL, NCHW; -1 for
NHWC). Statistics are taken per channel over every other axis, so a channel sees
``n = x.size // C`` values. ``gamma``, ``beta``, ``running_mean``, ``running_var``
have shape ``(C,)``.

Forward (training mode), per channel ``c`` over its ``n`` values ``x_i``::

    mu      = (1/n) sum_i x_i                      batch mean
    sigma2  = (1/n) sum_i (x_i - mu)^2             biased batch variance (always
                                                   biased here, in every framework)
    xhat_i  = (x_i - mu) / sqrt(sigma2 + eps)      standardized input
    y_i     = gamma * xhat_i + beta                learned affine map

The variance is computed in two passes (subtract the mean, then average squares).
The one-pass ``E[x^2] - E[x]^2`` is algebraically equal but cancels catastrophically
when ``|mu|`` is large compared with the spread: at mean 1e4 and std 0.1 in float32
both terms are ~1e8 and their difference, 0.01, is below float32's resolution
there (Flax's default ``use_fast_variance=True`` does exactly this).

Running statistics (training mode only), with ``decay`` the weight of the OLD value::

    running_mean <- decay * running_mean + (1 - decay) * mu
    running_var  <- decay * running_var  + (1 - decay) * s2
    s2 = sigma2                  if convention.running_var == "biased"
    s2 = sigma2 * n / (n - 1)    if convention.running_var == "unbiased"  (Bessel)

PyTorch's ``momentum`` is ``1 - decay`` (weight of the NEW batch, default 0.1);
Flax's and Keras's ``momentum`` is ``decay`` itself (default 0.99 / 0.99). d2l's depends on
the edition: d2l-zh v2 and d2l-en 0.17 (the seed: ``momentum * moving + (1 - momentum) * mean``,
called with 0.9) use ``momentum = decay``; d2l-en 1.x (``(1 - momentum) * moving + momentum *
mean``, called with 0.1) uses PyTorch's ``momentum = 1 - decay``. The same decay 0.9 either way.
Only torch.nn feeds the unbiased variance into the running average.

Forward (evaluation mode) uses the running statistics and changes nothing::

    y_i = gamma * (x_i - running_mean) / sqrt(running_var + eps) + beta

Backward (training mode)
------------------------
Given the upstream gradient ``dy`` (same shape as ``x``), per channel, write
``inv = 1 / sqrt(sigma2 + eps)``. The affine step gives directly::

    dbeta  = sum_i dy_i
    dgamma = sum_i dy_i * xhat_i
    dxhat_i = gamma * dy_i

``xhat_i`` depends on ``x_i`` directly and through ``mu`` and ``sigma2``, both of
which depend on every ``x_j`` of the channel. With ``d mu / d x_j = 1/n`` and
``d sigma2 / d x_j = 2 (x_j - mu) / n`` (the ``mu`` term drops out because the
deviations sum to zero)::

    d xhat_i / d x_j = inv * (delta_ij - 1/n) - (x_i - mu) * inv^3 * (x_j - mu) / n
                     = (inv / n) * (n delta_ij - 1 - xhat_i xhat_j)

Contracting with ``dxhat_i``::

    dx_j = (inv / n) * (n dxhat_j - sum_i dxhat_i - xhat_j sum_i dxhat_i xhat_i)
         = (gamma * inv / n) * (n dy_j - dbeta - xhat_j * dgamma)

The gradient is orthogonal to the constant vector and to ``xhat`` in each channel:
shifting a channel's input does not change the normalized output, and rescaling it by ``a``
does not either when ``eps = 0``; with ``eps > 0`` the output is
``(x - mu) / sqrt(sigma2 + eps / a^2)``, so the invariance is exact only at ``eps = 0`` (close
when ``sigma2`` is large next to ``eps``).
The running statistics are state, not a function of the loss: no gradient flows
through them, in any mode.

Batches with few values
-----------------------
A training batch with exactly one value per channel is an error for every convention
(no spread to normalize; the unbiased estimate would divide by zero). An empty batch
(``n = 0``, e.g. a data-parallel shard or the tail of a dataset) normalizes nothing: the
output is empty and the running statistics stay as they are (torch.nn's behaviour).

Data parallelism
----------------
A global batch split into shards (one per replica; sizes may differ, a shard may be empty) has
two meanings. Synchronized: :func:`sync_batch_norm_train` / :func:`sync_batch_norm_grad`, equal
to single-device BatchNorm over the concatenation, the per-shard statistics merged exactly with
counts (:func:`merge_stats`), the backward needing only two global per-channel sums. Local:
:func:`local_batch_norm_train`, each replica on its own shard with its own running average.
The derivation is in the comment above those functions.

Evaluation statistics
---------------------
The running averages trail weights that move; :func:`batch_average_stats` (fvcore's PreciseBN,
``torch.optim.swa_utils.update_bn``) and :func:`population_stats` (what inference sees) recompute
them with the weights fixed. Both, and how they differ, in the comment above those functions.

Validation
----------
Bad input raises :class:`ValueError` naming the problem (:class:`TypeError` for complex
input, which the spec does not define), and nothing is mutated (no function here ever
writes into its arguments). ``convention`` is a :class:`Convention` or a preset name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import numpy as np

__all__ = [
    "Convention",
    "D2L",
    "TORCH",
    "FLAX",
    "KERAS",
    "PRESETS",
    "PRECISIONS",
    "BF16_UNIT_ROUNDOFF",
    "BF16_TOLERANCE",
    "preset",
    "as_convention",
    "batch_norm_train",
    "batch_norm_eval",
    "batch_norm_grad",
    "running_update",
    "batch_stats",
    "check_training_batch",
    "shard_stats",
    "merge_stats",
    "sync_batch_norm_train",
    "sync_batch_norm_grad",
    "local_batch_norm_train",
    "batch_average_stats",
    "PRECISE_VARIANTS",
    "population_stats",
]

RunningVar = Literal["biased", "unbiased"]
_RUNNING_VAR_CHOICES = ("biased", "unbiased")


@dataclass(frozen=True)
class Convention:
    """How a BatchNorm keeps its running statistics, in one vocabulary.

    Attributes:
      decay: weight kept from the OLD running value, in [0, 1]:
        ``running = decay * running + (1 - decay) * batch``. This is the only word
        bnref uses for it; each backend translates at its edge (PyTorch
        and d2l-en 1.x ``momentum = 1 - decay``; Flax, Keras, d2l-zh v2 and d2l-en 0.17
        ``momentum = decay``). ``decay=0``
        makes the running statistics equal the last batch's.
      eps: added to the variance before the square root, >= 0.
      running_var: which batch variance enters the running average:
        ``"biased"`` (divide by n; Flax, Keras, d2l) or ``"unbiased"`` (Bessel's
        n/(n-1); torch.nn). Normalization itself always uses the biased variance.
    """

    decay: float
    eps: float = 1e-5
    running_var: RunningVar = "biased"

    def __post_init__(self):
        decay = float(self.decay)
        eps = float(self.eps)
        if not 0.0 <= decay <= 1.0:  # also rejects NaN
            raise ValueError(f"decay must be in [0, 1] (weight of the old running value), got {self.decay!r}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {self.eps!r}")
        if self.running_var not in _RUNNING_VAR_CHOICES:
            raise ValueError(f"running_var must be 'biased' or 'unbiased', got {self.running_var!r}")
        object.__setattr__(self, "decay", decay)
        object.__setattr__(self, "eps", eps)

    # --- translations at the framework boundaries -------------------------------------
    @classmethod
    def from_torch(cls, momentum: float = 0.1, eps: float = 1e-5, running_var: RunningVar = "unbiased") -> "Convention":
        """From PyTorch's ``momentum`` (weight of the NEW batch): ``decay = 1 - momentum``.

        ``momentum=None`` (PyTorch's cumulative average) is a per-step decay,
        ``1 - 1/num_batches_tracked``; the torch layer handles it, not this method.
        """
        if momentum is None:
            raise ValueError("momentum=None (cumulative average) has no fixed decay; use decay = 1 - 1/step per step")
        return cls(decay=1.0 - float(momentum), eps=eps, running_var=running_var)

    @classmethod
    def from_flax(cls, momentum: float = 0.99, eps: float = 1e-5, running_var: RunningVar = "biased") -> "Convention":
        """From Flax's / Keras's / d2l-zh v2's and d2l-en 0.17's ``momentum`` (weight of the OLD
        value): ``decay = momentum``. (d2l-en 1.x's ``momentum`` is PyTorch's: :meth:`from_torch`.)"""
        return cls(decay=float(momentum), eps=eps, running_var=running_var)

    @property
    def torch_momentum(self) -> float:
        """PyTorch's ``momentum`` for this convention: ``1 - decay``, rounded to 12 decimals so
        that decay 0.9 reads 0.1, not 0.09999999999999998 (1 - 0.9 in binary floating point)."""
        return round(1.0 - self.decay, 12)

    @property
    def flax_momentum(self) -> float:
        """Flax's / Keras's ``momentum`` for this convention: ``decay``."""
        return self.decay

    def replace(self, **changes) -> "Convention":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


#: The seed: d2l's from-scratch ``batch_norm`` (decay 0.9, biased): d2l-zh v2 / d2l-en 0.17 call it
#: with ``momentum=0.9`` on the old value, d2l-en 1.x with ``momentum=0.1`` on the new batch.
D2L = Convention(decay=0.9, eps=1e-5, running_var="biased")
#: torch.nn.BatchNorm{1,2,3}d defaults: momentum=0.1 on the new batch, unbiased running var.
TORCH = Convention(decay=0.9, eps=1e-5, running_var="unbiased")
#: flax.linen.BatchNorm defaults: momentum=0.99 on the old value, epsilon=1e-5, biased.
FLAX = Convention(decay=0.99, eps=1e-5, running_var="biased")
#: keras.layers.BatchNormalization defaults: momentum=0.99, epsilon=1e-3, biased.
KERAS = Convention(decay=0.99, eps=1e-3, running_var="biased")

PRESETS = {"d2l": D2L, "torch": TORCH, "flax": FLAX, "keras": KERAS}

#: the two ways of recomputing BN statistics with the weights fixed (:func:`population_stats`,
#: :func:`batch_average_stats`), by the names every backend and the CLI use
PRECISE_VARIANTS = ("population", "batch_average")

#: the compute dtypes a training run can use (``TrainConfig.precision``). In each, the parameters,
#: BN's batch statistics (mean and variance reduced in float32), the running averages and the
#: optimizer state are float32: only the convolutions', matmuls' and BN output's values are rounded
#: to the compute dtype (torch.autocast; Flax ``dtype=bfloat16, param_dtype=float32``).
PRECISIONS = ("float32", "bfloat16")
#: bfloat16's unit roundoff: 8 significant bits, so one rounding is off by at most 2**-8 relative
BF16_UNIT_ROUNDOFF = 2.0**-8
#: what a bfloat16 BN result must meet against this spec (run in float64 on the same bfloat16-
#: rounded inputs), elementwise ``|actual - expected| <= BF16_TOLERANCE * (1 + |expected|)``. Why
#: 5 roundings: the statistics are float32 (error ~1e-7, negligible), so what is left is the
#: rounding of the result to bfloat16 (1 u of |y|), of ``x - mean`` / ``x_hat`` and ``dy`` terms
#: where an implementation rounds intermediates (up to 3 u of the terms' scale, ~|expected| for
#: normalized values, which is why the bound has an absolute part), and 1 u of headroom for
#: backends that round gamma/beta on the way in. Two bfloat16 implementations compared with each
#: other meet twice this.
BF16_TOLERANCE = 5 * BF16_UNIT_ROUNDOFF


def preset(name: str) -> Convention:
    """The preset called ``name`` (one of ``PRESETS``), with a clear error otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown convention preset {name!r}; choose one of {sorted(PRESETS)}") from None


def as_convention(convention, default: Convention) -> Convention:
    """``convention`` as a :class:`Convention`: itself, a preset name, or ``None`` for ``default``.

    Each backend calls this at its edge with its framework's default (torch.nn's or Flax's).
    """
    if convention is None:
        return default
    if isinstance(convention, Convention):
        return convention
    if isinstance(convention, str):
        return preset(convention)
    raise ValueError(f"convention must be a bnref.spec.Convention or a preset name {sorted(PRESETS)}, got {convention!r}")


# --- validation and layout helpers -------------------------------------------------------


def _resolve(convention) -> Convention:
    """The spec's functions take a :class:`Convention` or a preset name (as the backends do)."""
    if convention is None:
        raise ValueError(f"convention is required: a Convention or a preset name {sorted(PRESETS)}")
    return as_convention(convention, TORCH)


def _channel_axis(ndim: int, axis: int) -> int:
    """Normalize ``axis`` for an array of rank ``ndim`` (rank >= 2), or raise."""
    if ndim < 2:
        raise ValueError(f"x must have rank >= 2 (batch and channel axes), got rank {ndim}")
    # One rule in the spec and both backends: a Python or NumPy integer (np.int64 from shape
    # arithmetic is an index like any other), never a bool (True is not "axis 1"), a float or
    # an array.
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise ValueError(f"axis must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for x of rank {ndim}")
    return int(axis) % ndim


def _as_channel_vector(v, name: str, channels: int) -> Optional[np.ndarray]:
    """``v`` as a float64 (C,) array (a new array if the dtype changes; never written)."""
    if v is None:
        return None
    a = _as_real_array(v, name)
    if a.shape != (channels,):
        raise ValueError(f"{name} must have shape ({channels},) to match the {channels} channels of x, got {a.shape}")
    return a


def _as_real_array(v, name: str) -> np.ndarray:
    """``v`` as float64; complex values are refused (NumPy would silently drop the imaginary part)."""
    a = np.asarray(v)
    if np.iscomplexobj(a):
        raise TypeError(f"{name} is complex ({a.dtype}); the spec is defined for real inputs")
    return a.astype(np.float64, copy=False)


def _prepare(x, axis: int, **vectors):
    """Validate and promote ``x`` and its per-channel vectors; no writes anywhere."""
    x = _as_real_array(x, "x")
    ax = _channel_axis(x.ndim, axis)
    channels = x.shape[ax]
    if channels == 0:
        raise ValueError("x has 0 channels")
    out = {k: _as_channel_vector(v, k, channels) for k, v in vectors.items()}
    reduce_axes = tuple(i for i in range(x.ndim) if i != ax)
    bshape = tuple(channels if i == ax else 1 for i in range(x.ndim))  # broadcasts (C,) against x
    return x, ax, reduce_axes, bshape, out


def _values_per_channel(x: np.ndarray, ax: int) -> int:
    return x.size // x.shape[ax]


def check_training_batch(n: int) -> None:
    """Raise ``ValueError`` when a training batch has exactly 1 value per channel.

    ``n = 0`` is an empty batch, which is allowed: it normalizes nothing (an empty output)
    and leaves the running statistics as they are.
    """
    # A channel needs two values for any spread at all; with one, the batch variance is
    # 0 (every output equals beta) and the unbiased running estimate divides by zero.
    # PyTorch raises "Expected more than 1 value per channel when training"; so do we,
    # for every convention, so that a silently degenerate batch never trains.
    if n == 1:
        raise ValueError(f"expected more than 1 value per channel when training, got {n}")
    if n < 0:
        raise ValueError(f"a batch cannot have {n} values per channel")


def batch_stats(x, axis: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Per-channel batch mean and BIASED variance of ``x``, two-pass: ``(mean, var)``, each (C,)."""
    x, ax, reduce_axes, bshape, _ = _prepare(x, axis)
    mean = x.mean(axis=reduce_axes)  # (C,)
    centered = x - mean.reshape(bshape)  # subtract first: no E[x^2]-E[x]^2 cancellation
    var = np.mean(centered * centered, axis=reduce_axes)  # (C,)
    return mean, var


def running_update(running_mean, running_var, mean, var, n: int, convention: "Convention | str"):
    """The running-statistics update for one training batch of ``n`` values per channel.

    ``var`` is the BIASED batch variance; the convention decides whether Bessel's
    correction ``n / (n - 1)`` is applied before it enters the average. Returns
    ``(new_running_mean, new_running_var)`` as new arrays; ``n`` must be at least 2.
    """
    convention = _resolve(convention)
    check_training_batch(n)
    if n < 2:
        raise ValueError("an empty batch (n = 0) has no statistics to average in")
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    s2 = var * (n / (n - 1)) if convention.running_var == "unbiased" else var  # estimator for the average
    d = convention.decay
    new_mean = d * np.asarray(running_mean, dtype=np.float64) + (1.0 - d) * mean  # old value weighted by decay
    new_var = d * np.asarray(running_var, dtype=np.float64) + (1.0 - d) * s2
    return new_mean, new_var


# --- the three public operations -----------------------------------------------------------


def batch_norm_train(x, gamma, beta, running_mean, running_var, convention: "Convention | str", axis: int = 1):
    """Training-mode BatchNorm: normalize with batch statistics and update the running ones.

    Args:
      x: array of rank >= 2, channel axis ``axis``. Promoted to float64.
      gamma, beta: (C,) scale and shift, or ``None`` for 1 and 0 (``affine=False``).
      running_mean, running_var: (C,) running statistics, or both ``None`` when the
        layer keeps none (``track_running_stats=False``); then ``None``s come back.
      convention: a :class:`Convention` (decay, eps, running-variance estimator).
      axis: the channel axis.

    Returns:
      ``(y, new_running_mean, new_running_var)``: ``y`` float64 with ``x``'s shape and
      the new running statistics as NEW (C,) float64 arrays; the inputs are untouched.
      An empty batch (``n = 0``) gives an empty ``y`` and the running statistics unchanged.

    Raises:
      ValueError: exactly 1 value per channel, shapes that do not fit, an unknown preset.
      TypeError: complex input.
    """
    convention = _resolve(convention)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    x, ax, reduce_axes, bshape, v = _prepare(
        x, axis, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var
    )
    n = _values_per_channel(x, ax)
    check_training_batch(n)
    if n == 0:  # an empty batch: nothing to normalize, no statistics to average in
        y = x.copy()
        if v["gamma"] is not None:
            y = y * v["gamma"].reshape(bshape)
        if v["beta"] is not None:
            y = y + v["beta"].reshape(bshape)
        if v["running_mean"] is None:
            return y, None, None
        return y, v["running_mean"].copy(), v["running_var"].copy()
    mean = x.mean(axis=reduce_axes)  # (C,) batch mean
    centered = x - mean.reshape(bshape)  # x - mu, same shape as x
    var = np.mean(centered * centered, axis=reduce_axes)  # (C,) biased variance, two-pass
    inv_std = 1.0 / np.sqrt(var + convention.eps)  # (C,)
    y = centered * inv_std.reshape(bshape)  # xhat: zero mean, unit variance per channel
    if v["gamma"] is not None:
        y = y * v["gamma"].reshape(bshape)  # learned scale
    if v["beta"] is not None:
        y = y + v["beta"].reshape(bshape)  # learned shift
    if v["running_mean"] is None:
        return y, None, None
    new_mean, new_var = running_update(v["running_mean"], v["running_var"], mean, var, n, convention)
    return y, new_mean, new_var


def batch_norm_eval(x, gamma, beta, running_mean, running_var, convention: "Convention | str", axis: int = 1):
    """Evaluation-mode BatchNorm: normalize with the running statistics; no state changes.

    Same arguments as :func:`batch_norm_train` (the running statistics are required
    here). Returns ``y``, float64 with ``x``'s shape.
    """
    convention = _resolve(convention)
    if running_mean is None or running_var is None:
        raise ValueError("evaluation mode needs running_mean and running_var (use batch statistics via batch_norm_train)")
    x, ax, reduce_axes, bshape, v = _prepare(
        x, axis, gamma=gamma, beta=beta, running_mean=running_mean, running_var=running_var
    )
    inv_std = 1.0 / np.sqrt(v["running_var"] + convention.eps)  # (C,)
    y = (x - v["running_mean"].reshape(bshape)) * inv_std.reshape(bshape)
    if v["gamma"] is not None:
        y = y * v["gamma"].reshape(bshape)
    if v["beta"] is not None:
        y = y + v["beta"].reshape(bshape)
    return y


def batch_norm_grad(x, gamma, dy, convention: "Convention | str", axis: int = 1):
    """Analytic backward of the training-mode forward (see the module docstring).

    Args:
      x: the forward input (rank >= 2).
      gamma: (C,) scale, or ``None`` for 1 (``affine=False``; dgamma is still returned).
      dy: upstream gradient, same shape as ``x``.
      convention: supplies ``eps`` (the running statistics play no part in gradients).
      axis: the channel axis.

    Returns:
      ``(dx, dgamma, dbeta)``: float64, shapes ``x.shape``, (C,), (C,) (for an empty batch:
      an empty ``dx`` and zero ``dgamma``, ``dbeta``).
    """
    convention = _resolve(convention)
    x, ax, reduce_axes, bshape, v = _prepare(x, axis, gamma=gamma)
    dy = _as_real_array(dy, "dy")
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x {x.shape}, got {dy.shape}")
    n = _values_per_channel(x, ax)
    check_training_batch(n)
    if n == 0:
        zeros = np.zeros(x.shape[ax])
        return dy.copy(), zeros, zeros.copy()
    mean = x.mean(axis=reduce_axes)  # recompute the forward's statistics
    centered = x - mean.reshape(bshape)
    var = np.mean(centered * centered, axis=reduce_axes)
    inv_std = 1.0 / np.sqrt(var + convention.eps)  # (C,)
    xhat = centered * inv_std.reshape(bshape)
    dbeta = dy.sum(axis=reduce_axes)  # d/dbeta of sum(dy * y)
    dgamma = (dy * xhat).sum(axis=reduce_axes)  # d/dgamma of sum(dy * y)
    g = np.ones_like(mean) if v["gamma"] is None else v["gamma"]
    scale = (g * inv_std / n).reshape(bshape)  # gamma / (n sqrt(var + eps))
    # dx = gamma*inv/n * (n dy - sum dy - xhat * sum(dy xhat)): project out the mean and xhat directions
    dx = scale * (n * dy - dbeta.reshape(bshape) - xhat * dgamma.reshape(bshape))
    return dx, dgamma, dbeta


# --- data parallelism: one global batch split into shards ---------------------------------------
#
# With R replicas each holding a shard x_r (n_r values per channel; sizes may differ, a shard may
# be empty), BatchNorm has two meanings:
#
# - synchronized: the statistics of the whole global batch, as if the shards were concatenated.
#   Each replica computes (n_r, mu_r, M2_r) with M2_r = sum over its values of (x - mu_r)^2 (two
#   passes, locally), and the triples are merged exactly (Chan, Golub & LeVeque, 1979):
#
#       n  = sum_r n_r
#       mu = sum_r n_r mu_r / n
#       M2 = sum_r M2_r + sum_r n_r (mu_r - mu)^2          sigma2 = M2 / n
#
#   No E[x^2] - E[x]^2 anywhere: every term is a sum of squares of deviations. The running
#   update uses the GLOBAL n for Bessel's correction, so every replica keeps identical running
#   statistics. The backward needs, per channel, the two global sums of the single-device
#   formula, sum dy and sum dy * xhat, each a sum over replicas of its local sum (one
#   all-reduce); then each replica's dx_j = gamma inv / n (n dy_j - sum dy - xhat_j sum dy xhat)
#   with the global n. dgamma and dbeta are those global sums.
# - local: each replica normalizes its shard by itself and keeps its own running statistics
#   (its own EMA of its own shards): the replicas' running statistics drift apart.


def shard_stats(x, axis: int = 1):
    """``(n, mean, M2)`` of one shard, per channel: the count, the mean and the sum of squared
    deviations from it (two-pass). An empty shard gives ``n = 0``, mean 0 and M2 0."""
    x, ax, reduce_axes, bshape, _ = _prepare(x, axis)
    n = _values_per_channel(x, ax)
    if n == 0:
        zeros = np.zeros(x.shape[ax])
        return 0, zeros, zeros.copy()
    mean = x.mean(axis=reduce_axes)  # (C,)
    centered = x - mean.reshape(bshape)
    return n, mean, np.sum(centered * centered, axis=reduce_axes)


def merge_stats(counts, means, m2s):
    """Merge per-shard ``(n_r, mean_r, M2_r)`` into the global ``(n, mean, biased var)``, exactly.

    ``counts``: R ints; ``means``, ``m2s``: R arrays (C,). Empty shards (``n_r = 0``) add
    nothing. The global mean of an all-empty batch is undefined: ``ValueError``.
    """
    counts = [int(c) for c in counts]
    n = sum(counts)
    if n == 0:
        raise ValueError("every shard is empty: the global batch has no statistics")
    means = [np.asarray(m, dtype=np.float64) for m in means]
    mean = sum(c * m for c, m in zip(counts, means)) / n  # (C,) count-weighted
    m2 = sum(np.asarray(q, dtype=np.float64) for q in m2s) + sum(c * (m - mean) ** 2 for c, m in zip(counts, means))
    return n, mean, m2 / n


def _check_shards(shards, axis, what: str = "shard"):
    if len(shards) < 1:
        raise ValueError(f"need at least one {what}")
    shards = [_as_real_array(s, what) for s in shards]
    ax = _channel_axis(shards[0].ndim, axis)
    for r, s in enumerate(shards):
        if s.ndim != shards[0].ndim or s.shape[ax] != shards[0].shape[ax]:
            raise ValueError(f"{what} {r} has shape {s.shape}; every {what} must have {what} 0's rank and "
                             f"{shards[0].shape[ax]} channels")  # fmt: skip
    return shards


def sync_batch_norm_train(shards, gamma, beta, running_mean, running_var, convention, axis: int = 1):
    """Synchronized (cross-replica) BatchNorm in training: each shard normalized with the
    statistics of the whole global batch.

    Equals :func:`batch_norm_train` on the shards concatenated along axis 0, split back. Returns
    ``(ys, new_running_mean, new_running_var)``: one output per shard and the running statistics
    every replica holds (identical). ``ValueError`` when the global batch has exactly one value
    per channel; an all-empty global batch leaves the running statistics unchanged.
    """
    convention = _resolve(convention)
    shards = _check_shards(shards, axis)
    stats = [shard_stats(s, axis) for s in shards]
    n = sum(c for c, _, _ in stats)
    check_training_batch(n)
    ys = []
    if n == 0:
        for s in shards:
            ys.append(batch_norm_train(s, gamma, beta, None, None, convention, axis)[0])
        if running_mean is None:
            return ys, None, None
        return ys, np.array(running_mean, dtype=np.float64), np.array(running_var, dtype=np.float64)
    _, mean, var = merge_stats(*zip(*stats))
    for s in shards:
        x, ax, _, bshape, v = _prepare(s, axis, gamma=gamma, beta=beta)
        y = (x - mean.reshape(bshape)) / np.sqrt(var + convention.eps).reshape(bshape)
        if v["gamma"] is not None:
            y = y * v["gamma"].reshape(bshape)
        if v["beta"] is not None:
            y = y + v["beta"].reshape(bshape)
        ys.append(y)
    if running_mean is None:
        return ys, None, None
    new_mean, new_var = running_update(running_mean, running_var, mean, var, n, convention)
    return ys, new_mean, new_var


def sync_batch_norm_grad(shards, gamma, dys, convention, axis: int = 1):
    """Backward of :func:`sync_batch_norm_train`: ``(dxs, dgamma, dbeta)``.

    Each replica's ``dx`` needs only its own ``dy`` and the two global per-channel sums
    ``sum dy`` and ``sum dy * xhat`` (an all-reduce of the local sums); ``dgamma`` and
    ``dbeta`` are those global sums. Equals :func:`batch_norm_grad` on the concatenation.
    """
    convention = _resolve(convention)
    shards = _check_shards(shards, axis)
    if len(dys) != len(shards):
        raise ValueError(f"{len(dys)} upstream gradients for {len(shards)} shards")
    stats = [shard_stats(s, axis) for s in shards]
    n = sum(c for c, _, _ in stats)
    check_training_batch(n)
    c = shards[0].shape[_channel_axis(shards[0].ndim, axis)]
    if n == 0:
        return [np.array(d, dtype=np.float64) for d in dys], np.zeros(c), np.zeros(c)
    _, mean, var = merge_stats(*zip(*stats))
    inv_std = 1.0 / np.sqrt(var + convention.eps)
    xhats, sum_dy, sum_dy_xhat = [], np.zeros(c), np.zeros(c)
    for s, d in zip(shards, dys):  # the local sums, then their sum over replicas (the all-reduce)
        x, ax, reduce_axes, bshape, _ = _prepare(s, axis)
        d = _as_real_array(d, "dy")
        if d.shape != x.shape:
            raise ValueError(f"dy must have its shard's shape {x.shape}, got {d.shape}")
        xhat = (x - mean.reshape(bshape)) * inv_std.reshape(bshape)
        xhats.append((xhat, d, bshape))
        sum_dy = sum_dy + d.sum(axis=reduce_axes)
        sum_dy_xhat = sum_dy_xhat + (d * xhat).sum(axis=reduce_axes)
    g = np.ones(c) if gamma is None else _as_channel_vector(gamma, "gamma", c)
    dxs = []
    for xhat, d, bshape in xhats:
        scale = (g * inv_std / n).reshape(bshape)
        dxs.append(scale * (n * d - sum_dy.reshape(bshape) - xhat * sum_dy_xhat.reshape(bshape)))
    return dxs, sum_dy_xhat, sum_dy


def local_batch_norm_train(shards, gamma, beta, running_means, running_vars, convention, axis: int = 1):
    """Unsynchronized data-parallel BatchNorm: each replica's :func:`batch_norm_train` on its own
    shard with its own running statistics. Returns ``(ys, new_running_means, new_running_vars)``,
    one entry per replica (an empty shard's running statistics are unchanged)."""
    convention = _resolve(convention)
    shards = _check_shards(shards, axis)
    if len(running_means) != len(shards) or len(running_vars) != len(shards):
        raise ValueError("one running mean and one running variance per replica")
    out = [batch_norm_train(s, gamma, beta, m, v, convention, axis) for s, m, v in zip(shards, running_means, running_vars)]
    return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]


# --- which statistics evaluation uses: precise BN --------------------------------------------------
#
# The running averages are an EMA of batch statistics taken while the weights moved: at lr 1.0
# they trail the network that is evaluated (measured on LeNet-BN: bn3's running variance up to
# 6.7x its population variance after 19 steps). "Precise BN" recomputes them with the weights
# fixed, over many batches, in one of two ways that exist in practice:
#
# (a) batch average (fvcore's PreciseBN, torch.optim.swa_utils.update_bn): every layer in
#     training mode, the average over K batches of each batch's mean and of each batch's
#     variance, each batch weighted equally, the variance with the layer's running-variance
#     estimator (torch.nn and fvcore: unbiased). One pass over the batches for all layers.
# (b) population: the exact mean and (biased) variance of the layer's input over all the values
#     of the K batches, with the layers below in EVALUATION mode using their own population
#     statistics: what inference actually feeds the layer. Layer by layer, bottom-up (a layer's
#     input depends on the statistics chosen below it): one pass per BN layer.
#
# How they differ, for one layer whose input is the same in both (the lowest BN layer): with
# equal batch sizes the law of total variance gives
#     population var = mean over batches of the biased batch variance + variance of the batch means,
# so (a)'s biased variance is smaller by the between-batch variance of the means (about var/m
# for m values per channel per batch, i.i.d.), and Bessel's correction (unbiased) adds about
# that much back. Above the lowest layer they also see different inputs: (a) normalizes the
# layers below with each batch's own statistics, (b) with fixed ones, as inference does.


def batch_average_stats(batches, convention: "Convention | str", axis: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Variant (a): ``(mean, var)`` per channel, the equally weighted average over ``batches``
    (one layer's inputs, each computed with the network in training mode) of each batch's mean
    and variance, the variance biased or unbiased as ``convention.running_var`` says (the
    estimator the layer feeds its running average; torch.nn's: unbiased). Every batch needs at
    least 2 values per channel."""
    convention = _resolve(convention)
    batches = _check_shards(batches, axis, "batch")
    means, variances = [], []
    for k, b in enumerate(batches):
        n = _values_per_channel(b, _channel_axis(b.ndim, axis))
        if n < 2:
            raise ValueError(f"batch {k} has {n} value(s) per channel; a batch variance needs at least 2")
        mean, var = batch_stats(b, axis)
        means.append(mean)
        variances.append(var * (n / (n - 1)) if convention.running_var == "unbiased" else var)
    return np.mean(means, axis=0), np.mean(variances, axis=0)


def population_stats(batches, axis: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Variant (b): ``(mean, var)`` per channel, the exact mean and biased variance of all the
    values in ``batches`` (one layer's inputs, computed with the layers below in evaluation
    mode), merged batch by batch with counts (:func:`merge_stats`): no ``E[x^2] - E[x]^2``
    cancellation, batch sizes may differ."""
    batches = _check_shards(batches, axis, "batch")
    stats = [shard_stats(b, axis) for b in batches]
    _, mean, var = merge_stats([s[0] for s in stats], [s[1] for s in stats], [s[2] for s in stats])
    return mean, var
