"""LeNet-BN, the seed's network (d2l, "Batch Normalization"), with a selectable BatchNorm
(and a selectable activation, sigmoid by default as in d2l).

    Conv(1->6, 5x5) BN sigmoid AvgPool(2)  Conv(6->16, 5x5) BN sigmoid AvgPool(2)  Flatten
    Linear(256->120) BN sigmoid  Linear(120->84) BN sigmoid  Linear(84->10)

Submodules are named ``conv1, bn1, conv2, bn2, fc1, bn3, fc2, bn4, fc3`` whatever the BN,
so ``state_dict`` keys are identical for ``bn="bnref"`` and ``bn="builtin"`` (the
cross-framework converter relies on these names).
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from bnref import spec
from bnref.config import BN_CHOICES  # the one list of choices (re-exported here)
from bnref.torch.functional import resolve_convention
from bnref.torch.layers import BatchNorm1d, BatchNorm2d

__all__ = ["LeNetBN", "BN_CHOICES", "ACTIVATIONS"]

#: the hidden layers' activation (``LeNetBN(activation=...)``): d2l's LeNet uses the sigmoid
ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu}


def _make_bn(kind: str, dims: int, channels: int, convention: spec.Convention) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "bnref":
        cls = BatchNorm2d if dims == 2 else BatchNorm1d
        return cls(channels, convention=convention)
    # torch.nn's own layer with the convention's decay and eps. It cannot express a biased
    # running variance (it always averages the unbiased n/(n-1) estimate), so with the
    # default d2l convention its running_var, and so its eval-mode outputs, differ
    # slightly from the seed's; training-mode outputs and gradients are the same.
    cls = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    return cls(channels, eps=convention.eps, momentum=convention.torch_momentum)


class LeNetBN(nn.Module):
    """LeNet with BatchNorm after every conv/linear layer but the last; input ``(N, 1, 28, 28)``.

    Args:
      bn: ``"bnref"`` (bnref's from-scratch layers, default), ``"builtin"``
        (``torch.nn.BatchNorm1d/2d``) or ``"none"`` (``nn.Identity``: plain LeNet with sigmoids).
      convention: the BN running-statistics convention (preset name or
        :class:`bnref.spec.Convention`); default the seed's, ``spec.D2L``.
      activation: the four hidden layers' activation, ``"sigmoid"`` (d2l's, default) or
        ``"relu"`` (:data:`ACTIVATIONS`); a function, not a submodule: the same ``state_dict``.

    Conv and linear weights are Xavier-uniform initialized as d2l's ``train_ch6`` does (its
    ``init_weights``); biases keep PyTorch's default initialization, as there.
    """

    def __init__(self, bn: str = "bnref", convention: Union[spec.Convention, str] = spec.D2L,
                 activation: str = "sigmoid"):  # fmt: skip
        super().__init__()
        if bn not in BN_CHOICES:
            raise ValueError(f"bn must be one of {BN_CHOICES}, got {bn!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        conv = resolve_convention(convention)
        self.bn_kind, self.activation = bn, activation
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5)
        self.bn1 = _make_bn(bn, 2, 6, conv)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.bn2 = _make_bn(bn, 2, 16, conv)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.bn3 = _make_bn(bn, 1, 120, conv)
        self.fc2 = nn.Linear(120, 84)
        self.bn4 = _make_bn(bn, 1, 84, conv)
        self.fc3 = nn.Linear(84, 10)
        for m in (self.conv1, self.conv2, self.fc1, self.fc2, self.fc3):
            nn.init.xavier_uniform_(m.weight)  # d2l's init_weights; biases keep torch's default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.activation]
        x = act(self.bn1(self.conv1(x)))  # (N, 6, 24, 24)
        x = nn.functional.avg_pool2d(x, 2)  # (N, 6, 12, 12)
        x = act(self.bn2(self.conv2(x)))  # (N, 16, 8, 8)
        x = nn.functional.avg_pool2d(x, 2)  # (N, 16, 4, 4)
        x = torch.flatten(x, 1)  # (N, 256)
        x = act(self.bn3(self.fc1(x)))  # (N, 120)
        x = act(self.bn4(self.fc2(x)))  # (N, 84)
        return self.fc3(x)  # (N, 10) logits
