"""A typical app module (scenario 35): the model class and a pool at its top level.

Process workers import this module to unpickle ``AppModel``; that constructs another
``ProcessPool`` inside the worker, which must start nothing.
"""

from __future__ import annotations

import torch

import aioforward as af

pool = af.ProcessPool(workers=1, name="aioforward-app")


class AppModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        import multiprocessing

        # inside the worker, the module-level pool above exists but never started
        inner = multiprocessing.parent_process() is not None and pool.stats().workers == 0
        return self.lin(x), inner
