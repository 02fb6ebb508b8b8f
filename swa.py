"""Stochastic weight averaging (Izmailov et al. 2018) as CASS uses it over Adam
(Sec. 3.1, App. C.5.3), built on torch.optim.swa_utils.

The published notebook wraps Adam in SWA but never averages; here the weights
at the end of every epoch from `start_epoch` on join an equal-weight average,
and BatchNorm statistics are recomputed for the averaged weights at the end.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn


def default_start(epochs: int) -> int:
    """Averaging covers the last quarter of training (0-based start epoch)."""
    return epochs - max(1, epochs // 4)


class SWA:
    def __init__(self, model: nn.Module, start_epoch: int):
        self.start_epoch = start_epoch
        self.average = AveragedModel(model)

    @property
    def count(self) -> int:
        return int(self.average.n_averaged)

    def update(self, model: nn.Module, epoch: int) -> None:
        """Call once at the end of each 0-based `epoch`."""
        if epoch >= self.start_epoch:
            self.average.update_parameters(model)

    def finalize(self, model: nn.Module, batches: Iterable[torch.Tensor]) -> nn.Module:
        """The averaged network, its BatchNorm running statistics recomputed over
        `batches` (model-ready inputs); `model` itself if nothing was averaged.
        A model without BatchNorm (a ViT) never reads `batches`."""
        if self.count == 0:
            return model
        with torch.no_grad():  # update_bn itself would build autograd graphs
            update_bn(batches, self.average)
        return self.average.module

    def state_dict(self) -> dict:
        return self.average.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state)
