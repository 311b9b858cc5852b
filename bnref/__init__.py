"""bnref: a multi-framework reference implementation of Batch Normalization.

``bnref.spec`` is the NumPy (float64) specification: what BatchNorm computes.
``bnref.torch`` and ``bnref.jax`` implement that specification natively; they are
imported lazily, so ``import bnref`` (and ``import bnref.spec``) loads neither
PyTorch nor JAX.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
