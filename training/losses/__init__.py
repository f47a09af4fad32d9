"""The CoTAP losses (reference/cotap-method.md §3), one module each:

- `continuous_ap`: `continuous_ap_loss(t, s, y, tau, theta, alpha)`, the Continuous-Target AP loss;
- `patch_intra`: its cross-image pair construction (`patch_intra_loss`, modes cotap | l1);
- `patch_inner`: the Leopart-style ROI-aligned within-image Sinkhorn loss (`roi_patch_loss`);
- `cls`: the multi-crop and NN-pair CLS Sinkhorn losses (`multicrop_cls_loss`, `pair_cls_loss`), and
  a CLS InfoNCE for from-scratch initialisations (`cls_contrastive_loss`);
- `entropy`: the prototype entropy loss (`prototype_entropy_loss`);
- `sinkhorn`: `sinkhorn_knopp`.
"""

from cotap.training.losses.cls import cls_contrastive_loss, multicrop_cls_loss, pair_cls_loss
from cotap.training.losses.continuous_ap import continuous_ap_loss, huber_step
from cotap.training.losses.entropy import prototype_entropy_loss
from cotap.training.losses.patch_inner import roi_bins_for_grid, roi_patch_loss
from cotap.training.losses.patch_intra import derangement, patch_intra_loss, pool_sizes_for_grid
from cotap.training.losses.sinkhorn import sinkhorn_knopp

__all__ = [
    "cls_contrastive_loss",
    "continuous_ap_loss",
    "derangement",
    "huber_step",
    "multicrop_cls_loss",
    "pair_cls_loss",
    "patch_intra_loss",
    "pool_sizes_for_grid",
    "prototype_entropy_loss",
    "roi_bins_for_grid",
    "roi_patch_loss",
    "sinkhorn_knopp",
]
