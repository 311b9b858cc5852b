"""bnref's Flax NNX backend: ``BatchNorm`` (a ``flax.nnx.BatchNorm`` drop-in), ``LeNetBN`` (the
seed's model, the same network and initial weights as ``bnref.jax.LeNetBN``), the linen <->
NNX conversion of their variables, and ``precise_batch_stats`` (BN statistics recomputed with
the weights fixed, for any NNX model). The third face of the one functional core:
``bnref.jax._core.normalize`` computes what all of bnref's JAX layers compute.

Training lives in ``bnref.nnx.train`` (``python -m bnref.train --backend nnx``).
"""

from bnref.nnx.layers import BatchNorm
from bnref.nnx.precise import precise_batch_stats

__all__ = ["BatchNorm", "precise_batch_stats"]
