"""bnref's JAX/Flax backend: ``batch_norm`` (pure function), ``BatchNorm`` (flax.linen drop-in),
``LeNetBN`` (the seed's model in NHWC), ``precise_batch_stats`` (BN statistics recomputed with
the weights fixed, for any Flax model).

Mirror of ``bnref.torch``: the functional core ``batch_norm`` returns the new running statistics
instead of mutating them; the ``flax.linen`` module keeps them in the ``batch_stats`` collection.
Training lives in ``bnref.jax.train``, the benchmark in ``bnref.jax.bench`` (imported on demand).

This subpackage is called ``jax``; its modules import the real library with absolute imports
(``import jax``), which Python 3 always resolves from ``sys.path``, never from this package.
"""

from bnref.jax.functional import batch_norm
from bnref.jax.layers import BatchNorm
from bnref.jax.models import LeNetBN
from bnref.jax.precise import precise_batch_stats

__all__ = ["batch_norm", "BatchNorm", "LeNetBN", "precise_batch_stats"]
