"""The demo's and the benchmark suite's modules (random weights, nothing downloaded).

They live in the package so that process workers can import them by name.
"""

from __future__ import annotations

import torch
from torch import nn


def tiny() -> nn.Module:
    """Linear(10,20)-ReLU-Linear(20,5): a forward pass of ~10 us, all overhead."""
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))


def mlp(width: int = 1024, depth: int = 4) -> nn.Module:
    """depth x (Linear(width, width) + ReLU): compute-bound matrix work."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


class SmallGrid(nn.Module):
    """A small-kernel module for a GPU: one kernel that keeps a single block of threads busy
    for ``cycles`` GPU clock cycles (``torch.cuda._sleep``, which PyTorch's own tests of
    stream concurrency use), then a ``width`` x ``width`` Linear. It leaves the GPU's other
    units idle, so two such modules on separate streams can run at once."""

    def __init__(self, cycles: int = 1_000_000, width: int = 256) -> None:
        super().__init__()
        self.cycles = cycles
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.cuda._sleep(self.cycles)  # type: ignore[no-untyped-call]
        return self.lin(x)  # type: ignore[no-any-return]


def conv() -> nn.Module:
    """A small conv stack for 8x3x128x128 images: memory-bound, allocation-heavy."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def transformer(d_model: int = 256, layers: int = 4) -> nn.Module:
    """A torch-native TransformerEncoder (4 layers, d_model 256, 4 heads)."""
    layer = nn.TransformerEncoderLayer(d_model, 4, 4 * d_model, batch_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()


def wide(mb: int = 200) -> nn.Module:
    """One square Linear layer holding about ``mb`` megabytes of weights."""
    n = int((mb * 2**20 / 4) ** 0.5)
    return nn.Sequential(nn.Linear(n, n, bias=False))


INPUTS = {
    "tiny": lambda: torch.randn(1, 10),
    "mlp": lambda: torch.randn(256, 1024),
    "conv": lambda: torch.randn(8, 3, 128, 128),
    "transformer": lambda: torch.randn(8, 128, 256),
}
