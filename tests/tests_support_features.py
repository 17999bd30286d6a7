"""Stand-in feature extractors for FID tests (injected where Inception goes)."""

import torch
from torch import nn


class MeanColourFeatures(nn.Module):
    """A cheap, deterministic stand-in: per-channel means and standard deviations over quadrants (24-d)."""

    cache_id = "meancolour"
    num_features = 24

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        quads = [q for half in x.chunk(2, dim=2) for q in half.chunk(2, dim=3)]
        return torch.cat([torch.cat([q.mean((2, 3)), q.std((2, 3))], 1) for q in quads], 1)
