"""LeNet-BN in Flax: the same network as ``bnref.torch.LeNetBN``, in NHWC.

d2l's LeNet with BatchNorm after every convolution and hidden dense layer (the activation
selectable, ``activation``: sigmoid by default, as in d2l)::

    (N, 28, 28, 1) -conv1 5x5 VALID-> (N, 24, 24, 6) -bn1-sigmoid-avgpool2-> (N, 12, 12, 6)
                   -conv2 5x5 VALID-> (N, 8, 8, 16)  -bn2-sigmoid-avgpool2-> (N, 4, 4, 16)
                   -flatten-> (N, 256) -fc1-> 120 -bn3-sigmoid -fc2-> 84 -bn4-sigmoid -fc3-> 10

'VALID' padding, so the flattened size is 256 as in torch (d2l's JAX version used 'SAME'
and so trained a different network). The flatten is NHWC order (h, w, c); the cross-backend
converter permutes ``fc1``'s rows when it moves weights to/from torch's NCHW order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import jax.numpy as jnp
import flax.linen as nn

from bnref import spec
from bnref.config import BN_CHOICES  # the one list of choices (re-exported here)
from bnref.jax import conv as _conv
from bnref.jax.functional import resolve_convention
from bnref.jax.layers import BatchNorm

__all__ = ["LeNetBN", "BN_CHOICES", "ACTIVATIONS"]

#: the hidden layers' activation (``LeNetBN(activation=...)``; bnref.nnx's model uses this table
#: too): d2l's LeNet uses the sigmoid
ACTIVATIONS = {"sigmoid": nn.sigmoid, "relu": nn.relu}

#: whether this Flax's Conv takes its convolution as a field (Flax >= 0.7); an older one runs lax's
#: own, and K steps per call are then not bit-identical to one on a CPU (``bnref.jax.conv``)
CONV_TAKES_A_FUNCTION = "conv_general_dilated" in {f.name for f in dataclasses.fields(nn.Conv)}


class LeNetBN(nn.Module):
    """LeNet with BatchNorm; ``__call__(x, train)`` maps (N, 28, 28, 1) images to (N, 10) logits.

    Attributes:
      bn: ``"bnref"`` (bnref.jax.BatchNorm, two-pass variance, any convention), ``"builtin"``
        (flax.linen.BatchNorm with ``momentum=decay, epsilon=eps`` and Flax's own default
        ``use_fast_variance=True``: the layer as Flax users get it; it cannot keep an
        unbiased running variance, so ``convention.running_var == "unbiased"`` is an error),
        or ``"none"`` (plain LeNet, no bn* submodules).
      convention: a ``bnref.spec.Convention`` or preset name for the BN layers (default d2l:
        decay 0.9, biased running variance).
      dtype, param_dtype: computation and parameter dtypes of every layer.
      canonical_conv_grads: the convolutions' gradients as canonical-layout convolutions
        (``bnref.jax.conv``: the same numbers as lax's at the top level of a computation, and
        inside a ``lax.scan`` too, where lax's would round differently and run 4-10x slower on a
        CPU); False: lax's own (needed for forward-mode differentiation through the model).
      activation: the four hidden layers' activation, ``"sigmoid"`` (d2l's, default) or
        ``"relu"`` (:data:`ACTIVATIONS`); the variables are the same either way.
    """

    bn: str = "bnref"
    convention: Union[spec.Convention, str] = spec.D2L
    dtype: Any = None
    param_dtype: Any = jnp.float32
    axis_name: Optional[str] = None  # BN statistics synchronized over this device axis (data parallel)
    canonical_conv_grads: bool = True
    activation: str = "sigmoid"

    @nn.nowrap  # a helper that builds a submodule: not a module method for Flax to intercept
    def _norm(self, name):
        conv = resolve_convention(self.convention)
        if self.bn == "bnref":
            return BatchNorm(convention=conv, dtype=self.dtype, param_dtype=self.param_dtype, axis_name=self.axis_name,
                             name=name)  # fmt: skip
        if conv.running_var == "unbiased":
            raise ValueError(
                "flax.linen.BatchNorm always uses the biased variance in its running average; "
                f"bn='builtin' cannot express convention {conv}"
            )
        return nn.BatchNorm(
            momentum=conv.decay, epsilon=conv.eps, dtype=self.dtype, param_dtype=self.param_dtype,
            axis_name=self.axis_name, name=name,
        )

    @nn.compact
    def __call__(self, x, train: bool):
        if self.bn not in BN_CHOICES:
            raise ValueError(f"bn must be one of {BN_CHOICES}, got {self.bn!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {self.activation!r}")
        act = ACTIVATIONS[self.activation]
        kw = dict(
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.zeros,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        canonical = self.canonical_conv_grads and CONV_TAKES_A_FUNCTION
        conv = dict(kw, conv_general_dilated=_conv.conv_general_dilated) if canonical else kw

        def norm(h, name):
            if self.bn == "none":
                return h
            return self._norm(name)(h, use_running_average=not train)

        x = nn.Conv(6, (5, 5), padding="VALID", name="conv1", **conv)(x)  # (N, 24, 24, 6)
        x = act(norm(x, "bn1"))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))  # (N, 12, 12, 6)
        x = nn.Conv(16, (5, 5), padding="VALID", name="conv2", **conv)(x)  # (N, 8, 8, 16)
        x = act(norm(x, "bn2"))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))  # (N, 4, 4, 16)
        x = x.reshape((x.shape[0], -1))  # (N, 256), NHWC order
        x = nn.Dense(120, name="fc1", **kw)(x)
        x = act(norm(x, "bn3"))
        x = nn.Dense(84, name="fc2", **kw)(x)
        x = act(norm(x, "bn4"))
        return nn.Dense(10, name="fc3", **kw)(x)  # (N, 10) logits
