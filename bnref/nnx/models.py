"""LeNet-BN in Flax NNX: the network of ``bnref.jax.LeNetBN`` (linen) and ``bnref.torch.LeNetBN``,
in NHWC, with the same layer names (``conv1``, ``bn1``, ..., ``fc3``) and so the same variable tree:
``nnx.state(model, nnx.Param)`` is linen's ``params`` and ``nnx.state(model, nnx.BatchStat)`` its
``batch_stats``, key for key and shape for shape (:mod:`bnref.nnx.variables` converts).

::

    (N, 28, 28, 1) -conv1 5x5 VALID-> (N, 24, 24, 6) -bn1-sigmoid-avgpool2-> (N, 12, 12, 6)
                   -conv2 5x5 VALID-> (N, 8, 8, 16)  -bn2-sigmoid-avgpool2-> (N, 4, 4, 16)
                   -flatten-> (N, 256) -fc1-> 120 -bn3-sigmoid -fc2-> 84 -bn4-sigmoid -fc3-> 10
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Union

import jax.numpy as jnp
from flax import nnx

from bnref import spec
from bnref.config import BN_CHOICES
from bnref.jax import conv as _conv
from bnref.jax.functional import resolve_convention
from bnref.jax.models import ACTIVATIONS  # the linen model's table: one list of choices
from bnref.nnx.layers import BatchNorm

__all__ = ["LeNetBN", "CONV_TAKES_A_FUNCTION"]

#: whether this Flax's nnx.Conv takes its convolution as an argument (as linen's does; see
#: ``bnref.jax.models.CONV_TAKES_A_FUNCTION`` and ``bnref.jax.conv``)
CONV_TAKES_A_FUNCTION = "conv_general_dilated" in inspect.signature(nnx.Conv.__init__).parameters


class LeNetBN(nnx.Module):
    """LeNet with BatchNorm; ``model(x)`` maps (N, 28, 28, 1) images to (N, 10) logits in the mode
    ``model.train()`` / ``model.eval()`` set (NNX's way), or ``model(x, train=...)`` for one call.

    Args:
      rngs: an ``nnx.Rngs`` for the initial weights (Xavier-uniform kernels, zero biases, as the
        linen model; NNX draws its keys differently from linen, so for linen's exact initial
        weights load them: ``bnref.nnx.variables.load_linen(model, variables)``).
      bn: ``"bnref"`` (bnref.nnx.BatchNorm, two-pass variance, any convention), ``"builtin"``
        (flax.nnx.BatchNorm with ``momentum=decay, epsilon=eps`` and Flax's default
        ``use_fast_variance=True``; it keeps no unbiased running variance, so a convention with
        one is a ``ValueError``), or ``"none"`` (no bn* layers).
      convention: the BN layers' ``bnref.spec.Convention`` or preset name (default d2l).
      dtype, param_dtype: computation and parameter dtypes of every layer.
      axis_name: the BN statistics synchronized over this device axis (data parallel).
      canonical_conv_grads: the convolutions' gradients from ``bnref.jax.conv`` (as linen's
        LeNetBN: the same numbers at the top level, and inside a ``lax.scan``).
      activation: the four hidden layers' activation, ``"sigmoid"`` (d2l's, default) or
        ``"relu"`` (``bnref.jax.models.ACTIVATIONS``, as linen's LeNetBN).
    """

    def __init__(self, *, rngs: nnx.Rngs, bn: str = "bnref", convention: Union[spec.Convention, str] = spec.D2L,
                 dtype: Any = None, param_dtype: Any = jnp.float32, axis_name: Optional[str] = None,
                 canonical_conv_grads: bool = True, activation: str = "sigmoid"):  # fmt: skip
        if bn not in BN_CHOICES:
            raise ValueError(f"bn must be one of {BN_CHOICES}, got {bn!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        conv = resolve_convention(convention)
        if bn == "builtin" and conv.running_var == "unbiased":
            raise ValueError("flax.nnx.BatchNorm always uses the biased variance in its running average; "
                             f"bn='builtin' cannot express convention {conv}")  # fmt: skip
        self.bn, self.convention, self.activation = bn, conv, activation
        kw = dict(kernel_init=nnx.initializers.xavier_uniform(), bias_init=nnx.initializers.zeros,
                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)  # fmt: skip
        conv_kw = dict(kw, padding="VALID")
        if canonical_conv_grads and CONV_TAKES_A_FUNCTION:
            conv_kw["conv_general_dilated"] = _conv.conv_general_dilated

        def norm(features):
            if bn == "none":
                return None
            if bn == "bnref":
                return BatchNorm(features, convention=conv, dtype=dtype, param_dtype=param_dtype, axis_name=axis_name,
                                 rngs=rngs)  # fmt: skip
            return nnx.BatchNorm(features, momentum=conv.decay, epsilon=conv.eps, dtype=dtype, param_dtype=param_dtype,
                                 axis_name=axis_name, rngs=rngs)  # fmt: skip

        self.conv1 = nnx.Conv(1, 6, (5, 5), **conv_kw)
        self.bn1 = norm(6)
        self.conv2 = nnx.Conv(6, 16, (5, 5), **conv_kw)
        self.bn2 = norm(16)
        self.fc1 = nnx.Linear(256, 120, **kw)
        self.bn3 = norm(120)
        self.fc2 = nnx.Linear(120, 84, **kw)
        self.bn4 = norm(84)
        self.fc3 = nnx.Linear(84, 10, **kw)

    def _norm(self, layer, h, train: Optional[bool]):
        if layer is None:
            return h
        return layer(h) if train is None else layer(h, use_running_average=not train)

    def __call__(self, x, train: Optional[bool] = None):
        """Logits (N, 10) of images (N, 28, 28, 1); ``train`` (optional) overrides the mode the
        model is in for this call."""
        act = ACTIVATIONS[self.activation]
        x = act(self._norm(self.bn1, self.conv1(x), train))  # (N, 24, 24, 6)
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))  # (N, 12, 12, 6)
        x = act(self._norm(self.bn2, self.conv2(x), train))  # (N, 8, 8, 16)
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2))  # (N, 4, 4, 16)
        x = x.reshape((x.shape[0], -1))  # (N, 256), NHWC order
        x = act(self._norm(self.bn3, self.fc1(x), train))
        x = act(self._norm(self.bn4, self.fc2(x), train))
        return self.fc3(x)  # (N, 10) logits


