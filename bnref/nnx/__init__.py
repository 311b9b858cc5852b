"""bnref's Flax NNX backend: ``BatchNorm`` (a ``flax.nnx.BatchNorm`` drop-in), ``LeNetBN`` (the
seed's model, the same network and initial weights as ``bnref.jax.LeNetBN``), and the linen <->
NNX conversion of their variables. The third face of the one functional core:
``bnref.jax._core.normalize`` computes what all of bnref's JAX layers compute.

Training lives in ``bnref.nnx.train`` (``python -m bnref.train --backend nnx``).
"""

from bnref.nnx.layers import BatchNorm

__all__ = ["BatchNorm"]
