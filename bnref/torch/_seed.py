"""The seed's own PyTorch code, kept only as the benchmark's baseline. Do not use it.

A faithful copy of d2l.ai's chapter "Batch Normalization" (d2l-en v0.17, PyTorch tab; d2l-zh
v2 has the same code): its from-scratch ``batch_norm`` (``momentum`` weighting the OLD value,
called with 0.9: decay 0.9; d2l-en 1.x rewrote it with ``momentum`` weighting the new batch,
called with 0.1: the same decay) (mode from ``torch.is_grad_enabled()``, running statistics as
plain attributes, so missing from ``state_dict``), its ``BatchNorm`` module, the same
LeNet as an ``nn.Sequential``, and the body of ``d2l.train_ch6``'s loop over a
``torch.utils.data.DataLoader`` (``shuffle=True``, ``num_workers=get_dataloader_workers()``
= 4, per-step ``float()`` syncs in ``Accumulator.add`` / ``accuracy``). bnref's versions
fix each of those problems; ``bnref.torch.bench`` measures what they cost.

One deliberate difference, in the seed's favour: d2l's loader decodes every image from a
torchvision dataset with ``transforms.ToTensor()`` per example; here the DataLoader wraps
a ``TensorDataset`` of ready float tensors (torchvision is not a dependency), which is
cheaper per example.
"""

import torch
from torch import nn


def batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum):
    # Use `is_grad_enabled` to determine whether we are in training mode
    if not torch.is_grad_enabled():
        # In prediction mode, use mean and variance obtained by moving average
        X_hat = (X - moving_mean) / torch.sqrt(moving_var + eps)
    else:
        assert len(X.shape) in (2, 4)
        if len(X.shape) == 2:
            # When using a fully connected layer, calculate the mean and
            # variance on the feature dimension
            mean = X.mean(dim=0)
            var = ((X - mean) ** 2).mean(dim=0)
        else:
            # When using a two-dimensional convolutional layer, calculate the
            # mean and variance on the channel dimension (axis=1). Here we
            # need to maintain the shape of `X`, so that the broadcasting
            # operation can be carried out later
            mean = X.mean(dim=(0, 2, 3), keepdim=True)
            var = ((X - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        # In training mode, the current mean and variance are used for the
        # standardization
        X_hat = (X - mean) / torch.sqrt(var + eps)
        # Update the mean and variance using moving average
        moving_mean = momentum * moving_mean + (1.0 - momentum) * mean
        moving_var = momentum * moving_var + (1.0 - momentum) * var
    Y = gamma * X_hat + beta  # Scale and shift
    return Y, moving_mean.data, moving_var.data


class BatchNorm(nn.Module):
    # `num_features`: the number of outputs for a fully connected layer
    # or the number of output channels for a convolutional layer. `num_dims`:
    # 2 for a fully connected layer and 4 for a convolutional layer
    def __init__(self, num_features, num_dims):
        super().__init__()
        if num_dims == 2:
            shape = (1, num_features)
        else:
            shape = (1, num_features, 1, 1)
        # The scale parameter and the shift parameter (model parameters) are
        # initialized to 1 and 0, respectively
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        # The variables that are not model parameters are initialized to 0 and 1
        self.moving_mean = torch.zeros(shape)
        self.moving_var = torch.ones(shape)

    def forward(self, X):
        # If `X` is not on the main memory, copy `moving_mean` and
        # `moving_var` to the device where `X` is located
        if self.moving_mean.device != X.device:
            self.moving_mean = self.moving_mean.to(X.device)
            self.moving_var = self.moving_var.to(X.device)
        # Save the updated `moving_mean` and `moving_var`
        Y, self.moving_mean, self.moving_var = batch_norm(
            X, self.gamma, self.beta, self.moving_mean,
            self.moving_var, eps=1e-5, momentum=0.9)
        return Y


def lenet_bn():
    return nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=5), BatchNorm(6, num_dims=4), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5), BatchNorm(16, num_dims=4), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2), nn.Flatten(),
        nn.Linear(16 * 4 * 4, 120), BatchNorm(120, num_dims=2), nn.Sigmoid(),
        nn.Linear(120, 84), BatchNorm(84, num_dims=2), nn.Sigmoid(),
        nn.Linear(84, 10))


def get_dataloader_workers():
    """Use 4 processes to read the data."""
    return 4


def accuracy(y_hat, y):
    """Compute the number of correct predictions."""
    if len(y_hat.shape) > 1 and y_hat.shape[1] > 1:
        y_hat = y_hat.argmax(axis=1)
    cmp = y_hat.type(y.dtype) == y
    return float(cmp.type(y.dtype).sum())


class Accumulator:
    """For accumulating sums over `n` variables."""

    def __init__(self, n):
        self.data = [0.0] * n

    def add(self, *args):
        self.data = [a + float(b) for a, b in zip(self.data, args)]

    def __getitem__(self, idx):
        return self.data[idx]


def init_weights(m):  # from d2l.train_ch6
    if type(m) == nn.Linear or type(m) == nn.Conv2d:
        nn.init.xavier_uniform_(m.weight)


def make_loader(images, labels, batch_size, num_workers=None):
    """d2l's ``load_data_fashion_mnist`` loader over ready tensors: ``(N, 1, 28, 28)`` in [0, 1]."""
    X = torch.as_tensor(images).unsqueeze(1).float() / 255
    y = torch.as_tensor(labels).long()
    workers = get_dataloader_workers() if num_workers is None else num_workers
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size, shuffle=True,
                                       num_workers=workers)


def train_step(net, optimizer, loss, metric, X, y, device):
    """The body of ``d2l.train_ch6``'s inner loop (timer and animator left out)."""
    optimizer.zero_grad()
    X, y = X.to(device), y.to(device)
    y_hat = net(X)
    l = loss(y_hat, y)
    l.backward()
    optimizer.step()
    with torch.no_grad():
        metric.add(l * X.shape[0], accuracy(y_hat, y), X.shape[0])
