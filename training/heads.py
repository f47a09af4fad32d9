"""Projection heads (§2.3): the patch head and the CLS head that every CoTAP loss reads.

Each is an MLP 2D → hidden → ... → bottleneck (GELU between layers, the last Linear without bias),
an L2 normalisation, and a weight-normalised linear "prototype" layer whose gain is fixed at 1
(DINO/SwAV style): its outputs are the cosine similarities of the bottleneck vector to K learnable
prototype directions. Paper sizes: 2D → 2048 → 2048 → 256, K = 512 (patch) and 4096 (CLS).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


class NormalizedPrototypes(nn.Module):
    """Linear map onto K unit-norm directions: `weight_norm(Linear(dim, K, bias=False))` with g = 1,
    i.e. x ↦ x · (v / ‖v‖)ᵀ row-wise. The direction parameter is `weight_v` (K, dim)."""

    def __init__(self, dim: int, num_prototypes: int) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(num_prototypes, dim))
        nn.init.kaiming_uniform_(self.weight_v, a=5**0.5)  # nn.Linear's default, as the release

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight_v, dim=1))


class ProjectionHead(nn.Module):
    """(..., in_dim) features → (..., num_prototypes) cosine scores."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_prototypes: int = 512,
        num_layers: int = 3,
    ) -> None:
        super().__init__()
        if num_layers < 1 or min(in_dim, hidden_dim, bottleneck_dim, num_prototypes) < 1:
            raise ValueError("head sizes and num_layers must be positive")
        self.in_dim = in_dim
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), nn.GELU()]
        layers.append(nn.Linear(dims[-1], bottleneck_dim, bias=False))
        self.mlp = nn.Sequential(*layers)
        self.prototypes = NormalizedPrototypes(bottleneck_dim, num_prototypes)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def num_prototypes(self) -> int:
        return int(self.prototypes.weight_v.shape[0])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) features → (..., bottleneck_dim) unit-norm embeddings."""
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"head expects features of width {self.in_dim}, got {tuple(x.shape)}")
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prototypes(self.embed(x))
