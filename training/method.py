"""CoTAP's student/teacher wiring and total loss, kept out of the model (like dinov2's
ssl_meta_arch): one `CoTAPMethod.step_losses` call per training step.

Per step, for B anchors and their B partners (2B images, each with G = 2 global and L local crops):

- teacher (EMA, no grad, un-jittered globals): patch- and CLS-head scores, CLS→patch attention →
  foreground masks;
- student (one forward, so DDP sees one graph): patch- and CLS-head scores of all crops, the last
  block's input tokens → memory bank (→ one-time k-means of the prototypes) → entropy loss;
- losses: `patch_intra` (CoTAP, §3.2), `patch_inner` (Leopart ROI Sinkhorn, §3.3), `cls_inner` and
  `cls_intra` (§3.4), `entropy` (§3.5), summed with their weights; `cls_nce` (not CoTAP, weight 0
  by default) is an image-level InfoNCE for training initialisations from scratch.

Single-dataset deviation: the release feeds COCO to the dense losses and ImageNet to the CLS losses
and the bank; here one dataset feeds all of them, so one student forward serves both heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from cotap.training.config import ConfigError, TrainConfig
from cotap.training.data.pairs import PairBatch
from cotap.training.distributed import DistEnv, broadcast, world_size
from cotap.training.foreground import foreground_masks
from cotap.training.heads import ProjectionHead
from cotap.training.losses.cls import cls_contrastive_loss, multicrop_cls_loss, pair_cls_loss
from cotap.training.losses.entropy import prototype_entropy_loss
from cotap.training.losses.patch_inner import roi_bins_for_grid, roi_patch_loss
from cotap.training.losses.patch_intra import patch_intra_loss, pool_sizes_for_grid
from cotap.training.losses.sinkhorn import sinkhorn_knopp
from cotap.training.models import CoTAPViT
from cotap.training.prototype_bank import PrototypeBank, spherical_kmeans
from cotap.training.queues import FeatureQueue

LOSS_NAMES = ("patch_intra", "patch_inner", "cls_inner", "cls_intra", "entropy", "cls_nce")
BankHook = Callable[[torch.Tensor, tuple[int, int]], "torch.Tensor | None"]


class CoTAPNetwork(nn.Module):
    """Backbone + patch head + CLS head. The student and the teacher are two of these."""

    def __init__(self, backbone: CoTAPViT, patch_head: ProjectionHead, cls_head: ProjectionHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.patch_head = patch_head
        self.cls_head = cls_head

    def heads(self) -> nn.ModuleDict:
        return nn.ModuleDict({"patch_head": self.patch_head, "cls_head": self.cls_head})

    def forward(
        self,
        global_images: torch.Tensor,
        local_images: torch.Tensor | None = None,
        *,
        return_attention: bool = False,
        bank_hook: BankHook | None = None,
        entropy_temperature: float = 0.1,
    ) -> dict[str, torch.Tensor]:
        """global_images (Ng, 3, H, W), local_images (Nl, 3, h, w) ->
        global_patch (Ng, N, Kp), global_cls (Ng, Kc), global_cls_embed (Ng, E),
        [local_patch (Nl, n, Kp), local_cls (Nl, Kc), local_cls_embed (Nl, E)],
        [cls_attention (Ng, heads, N)], [entropy ()] when `bank_hook` returns bank samples."""
        out = self.backbone.forward_train(global_images, return_attention=return_attention)
        z = self.cls_head.embed(out["cls"])
        result = {
            "global_patch": self.patch_head(out["patch"]),
            "global_cls": self.cls_head.prototypes(z),
            "global_cls_embed": z,
        }
        if return_attention:
            result["cls_attention"] = out["cls_attention"]
        if local_images is not None and local_images.shape[0] > 0:
            loc = self.backbone.forward_train(local_images)
            z = self.cls_head.embed(loc["cls"])
            result["local_patch"] = self.patch_head(loc["patch"])
            result["local_cls"] = self.cls_head.prototypes(z)
            result["local_cls_embed"] = z
        if bank_hook is not None:
            # The bank, k-means and the entropy loss run in fp32 whatever the autocast around them.
            with torch.autocast(global_images.device.type, enabled=False):
                samples = bank_hook(out["last_input"].float(), self.backbone.grid_of(global_images))
                if samples is not None and samples.shape[0] > 0:
                    result["entropy"] = prototype_entropy_loss(
                        self.backbone.kernel, samples, entropy_temperature
                    )
        return result


def build_network(backbone: CoTAPViT, config: TrainConfig) -> CoTAPNetwork:
    h = config.heads
    dim = backbone.config.output_dim

    def head(k: int) -> ProjectionHead:
        return ProjectionHead(dim, h.hidden_dim, h.bottleneck_dim, k, h.num_layers)

    return CoTAPNetwork(backbone, head(h.patch_prototypes), head(h.cls_prototypes))


def _maps(scores: torch.Tensor, images: int, crops: int, grid: tuple[int, int]) -> torch.Tensor:
    # (images·crops, h·w, K) token scores -> (images, crops, K, h, w) maps
    k = scores.shape[-1]
    return scores.reshape(images, crops, grid[0], grid[1], k).permute(0, 1, 4, 2, 3)


class CoTAPMethod:
    """Holds the student, the teacher, the memory bank and the Sinkhorn queues of a run.

    `student` may be wrapped (DDP) for the forward; `student_net` is always the bare network whose
    parameters the optimiser and the EMA see.
    """

    def __init__(
        self,
        config: TrainConfig,
        student: CoTAPNetwork,
        teacher: CoTAPNetwork,
        env: DistEnv | None = None,
        prototypes_initialized: bool = False,
    ) -> None:
        self.config = config
        self.student_net = student
        self.student: nn.Module = student
        self.teacher = teacher
        self.env = env or DistEnv()
        loss = config.loss
        d = student.backbone.config.embed_dim
        k = student.backbone.config.kernel_size
        self.bank = PrototypeBank(config.bank.size, d, k, config.bank.add_per_step)
        self.bank.initialized = prototypes_initialized
        ws = world_size()
        self.patch_queue = FeatureQueue(
            loss.patch_queue // ws, config.heads.patch_prototypes, loss.patch_queue_add
        )
        self.cls_queue = FeatureQueue(loss.cls_queue // ws, config.heads.cls_prototypes, loss.cls_queue_add)
        self.prototypes_just_initialized = False
        self._generator: torch.Generator | None = None
        if config.bank.enabled and not prototypes_initialized:
            m = student.backbone.config.num_prototypes
            if config.bank.size < m:
                raise ConfigError(
                    f"config key bank.size: {config.bank.size} is smaller than the {m} prototypes k-means needs"
                )

    @property
    def prototypes_initialized(self) -> bool:
        return self.bank.initialized

    # -- memory bank ---------------------------------------------------------------------------------
    def _bank_hook(self, last_input: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor | None:
        if not self.config.bank.enabled:
            return None
        self.bank.update(last_input, grid, self._generator)
        if self.bank.full and not self.bank.initialized:
            self._init_prototypes()
        return self.bank.samples

    @torch.no_grad()
    def _init_prototypes(self) -> None:
        kernel = self.student_net.backbone.kernel
        m, d, k, _ = kernel.shape
        centres = torch.empty_like(kernel.data)
        if self.env.is_main:
            flat = self.bank.samples.reshape(len(self.bank), -1)
            centres = spherical_kmeans(flat, m, self.config.bank.kmeans_iterations, self._generator)
            centres = centres.reshape(m, d, k, k).to(kernel.dtype)
        broadcast(centres, src=0)
        # Rebind rather than copy: this step's forward saved the old prototypes for backward.
        kernel.data = centres.clone()
        self.teacher.backbone.kernel.data.copy_(centres)
        self.bank.initialized = True
        self.prototypes_just_initialized = True

    # -- one step -------------------------------------------------------------------------------------
    def step_losses(
        self, batch: PairBatch, generator: torch.Generator, autocast: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted total loss and each term (detached copies are the caller's to log).

        `autocast` is a context-manager factory (e.g. `lambda: torch.autocast("cuda", torch.bfloat16)`).
        """
        loss_cfg, w = self.config.loss, self.config.loss.weights
        self._generator = generator
        self.prototypes_just_initialized = False
        a, p = batch.anchor, batch.partner
        b = a.student_global.shape[0]
        images = 2 * b
        sg = torch.cat([a.student_global, p.student_global])  # (2B, G, 3, H, W)
        tg = torch.cat([a.teacher_global, p.teacher_global])
        sl = torch.cat([a.student_local, p.student_local])  # (2B, L, 3, h, w)
        boxes = torch.cat([a.boxes, p.boxes])  # (2B, G+L, 4)
        g, nl = sg.shape[1], sl.shape[1]
        backbone = self.student_net.backbone
        grid = backbone.grid_of(sg[:, 0])

        with torch.no_grad(), autocast():
            t_out = self.teacher(tg.flatten(0, 1), return_attention=True)
        t_patch = t_out["global_patch"].float()  # (2B·G, N, Kp)
        t_cls = t_out["global_cls"].float()  # (2B·G, Kc)
        masks = foreground_masks(
            t_out["cls_attention"],
            grid,
            loss_cfg.foreground_mass,
            loss_cfg.foreground_blur_size,
            loss_cfg.foreground_blur_sigma,
        ).reshape(images, g, *grid)  # (2B, G, h, w)

        with autocast():
            s_out = self.student(
                sg.flatten(0, 1),
                sl.flatten(0, 1) if nl else None,
                bank_hook=self._bank_hook,
                entropy_temperature=loss_cfg.entropy_temperature,
            )
        s_maps = _maps(s_out["global_patch"].float(), images, g, grid)  # (2B, G, Kp, h, w)
        t_maps = _maps(t_patch, images, g, grid)

        terms: dict[str, torch.Tensor] = {}
        if w.patch_intra > 0:
            terms["patch_intra"] = patch_intra_loss(
                s_maps,
                t_maps,
                masks,
                pool_sizes=pool_sizes_for_grid(grid, loss_cfg.pool_sizes),
                topk=loss_cfg.topk,
                num_negatives=loss_cfg.num_negatives,
                mode=loss_cfg.patch_intra_mode,
                tau=loss_cfg.tau,
                theta=loss_cfg.theta,
                alpha=loss_cfg.alpha,
                generator=generator,
            )
        if w.patch_inner > 0:
            kp = t_patch.shape[-1]
            queue = self.patch_queue.contents(t_patch.device)
            codes = sinkhorn_knopp(
                torch.cat([queue, t_patch.reshape(-1, kp)]),
                loss_cfg.sinkhorn_temperature_patch,
                loss_cfg.sinkhorn_iterations,
            )[queue.shape[0] :]
            local_maps = None
            if nl:
                lgrid = backbone.grid_of(sl[:, 0])
                local_maps = _maps(s_out["local_patch"].float(), images, nl, lgrid)
            terms["patch_inner"] = roi_patch_loss(
                _maps(codes.reshape(images * g, -1, kp), images, g, grid),
                masks,
                s_maps,
                local_maps,
                boxes,
                bins=roi_bins_for_grid(min(grid), loss_cfg.roi_bins),
                temperature=loss_cfg.patch_temperature,
                sampling_ratio=loss_cfg.roi_sampling_ratio,
            )
        if w.cls_inner > 0 or w.cls_intra > 0:
            kc = t_cls.shape[-1]
            queue = self.cls_queue.contents(t_cls.device)
            cls_codes = sinkhorn_knopp(
                torch.cat([queue, t_cls]), loss_cfg.sinkhorn_temperature_cls, loss_cfg.sinkhorn_iterations
            )[queue.shape[0] :].reshape(images, g, kc)
            s_cls = s_out["global_cls"].float().reshape(images, g, kc)
            if w.cls_inner > 0:
                all_cls = s_cls
                if nl:
                    all_cls = torch.cat([s_cls, s_out["local_cls"].float().reshape(images, nl, kc)], dim=1)
                terms["cls_inner"] = multicrop_cls_loss(cls_codes, all_cls, loss_cfg.cls_temperature_inner)
            if w.cls_intra > 0:
                terms["cls_intra"] = pair_cls_loss(cls_codes, s_cls, loss_cfg.cls_temperature_intra)
        if w.entropy > 0 and "entropy" in s_out:
            terms["entropy"] = s_out["entropy"]
        if w.cls_nce > 0:
            queries = s_out["global_cls_embed"].float().reshape(images, g, -1)
            if nl:
                local_q = s_out["local_cls_embed"].float().reshape(images, nl, -1)
                queries = torch.cat([queries, local_q], dim=1)
            partner = torch.arange(images, device=queries.device).roll(b)  # row b ↔ row B + b
            terms["cls_nce"] = cls_contrastive_loss(
                queries,
                t_out["global_cls_embed"].float().reshape(images, g, -1),
                loss_cfg.cls_nce_temperature,
                exclude=partner,
            )

        weights = asdict(w)
        total = sum((weights[name] * value for name, value in terms.items()), start=t_patch.new_zeros(()))
        if not torch.isfinite(total):
            raise FloatingPointError(
                "non-finite loss: " + ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
            )

        # Queues take this step's teacher scores after use (the release's post-processing).
        if self.patch_queue.enabled:
            fg = masks.reshape(-1) > 0
            self.patch_queue.push(t_patch.reshape(-1, t_patch.shape[-1])[fg], generator)
        if self.cls_queue.enabled:
            self.cls_queue.push(t_cls, generator)
        return total, terms

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "bank": self.bank.state_dict(),
            "patch_queue": self.patch_queue.state_dict(),
            "cls_queue": self.cls_queue.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bank.load_state_dict(state["bank"])
        self.patch_queue.load_state_dict(state["patch_queue"])
        self.cls_queue.load_state_dict(state["cls_queue"])
