"""Supervised backbones for the synthetic-scenes v1 experiment (docs/results.md), trained from
scratch on the v1 train split with labels, for `--steps` AdamW steps (random horizontal flips):

- `--target dense`: `cotap_micro8` (no filter) with a linear 1×1 patch classifier (logits bilinearly
  upsampled to the mask, cross-entropy, ignore 255: the linear probe's own loss). An upper
  reference: how far the frozen protocols can go with this backbone, image size and compute.
- `--target image`: the same backbone with a linear classifier on the CLS token, trained on the
  image label (the largest visible thing, 8 classes): image-level supervision only, no dense
  signal. The experiment's semantic initialisation, standing in for what a DINO checkpoint gives
  (a CLS token that knows the object, patch features never trained for dense tasks), where
  self-supervised image-level pre-training from scratch learned nothing at this budget.

The backbone alone is saved as a `cotap-train-v1` file, so `cotap eval` scores its FROZEN features
with the same protocols and seeds as every other row (the heads trained here are dropped).

    python bench/supervised_reference.py --target dense --out runs/exp/init/supervised.pt
    python bench/supervised_reference.py --target image --out runs/exp/init/image-supervised.pt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cotap.core.preprocess import IMAGENET_MEAN, IMAGENET_STD
from cotap.training.checkpoints import TRAIN_FORMAT
from cotap.training.eval.datasets import open_eval_data
from cotap.training.eval.metrics import IGNORE_INDEX
from cotap.training.models import build_model


def load_split(spec: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """images float32 (N, 3, H, W) normalised, masks int64 (N, H, W), image labels int64 (N,)."""
    data = open_eval_data(spec)
    items = [data[i] for i in range(len(data))]
    images = torch.from_numpy(np.stack([it.image for it in items])).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    masks = torch.from_numpy(np.stack([it.mask for it in items]).astype(np.int64))
    labels = torch.tensor([int(it.label if it.label is not None else -1) for it in items])
    return (images - mean) / std, masks, labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=("dense", "image"), default="dense")
    p.add_argument("--data", default="synthetic:2048:0:96", help="train split (synthetic scenes v1)")
    p.add_argument("--arch", default="cotap_micro8")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, masks, labels = load_split(args.data)
    dense = args.target == "dense"
    num_classes = int(masks[masks != IGNORE_INDEX].max()) + 1 if dense else int(labels.max()) + 1
    model = build_model(args.arch, use_filter=False)
    head = nn.Linear(model.config.output_dim, num_classes)
    params = [*model.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(args.seed)
    t0, log = time.monotonic(), []
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(images), (args.batch_size,), generator=gen)
        x, y = images[idx], masks[idx]
        flip = torch.rand(args.batch_size, generator=gen) < 0.5  # horizontal flips, masks with them
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = torch.where(flip[:, None, None], y.flip(-1), y)
        out = model.forward_features(x)
        if dense:
            logits = F.interpolate(head(out["patch"]).permute(0, 3, 1, 2), size=y.shape[-2:], mode="bilinear")
            loss = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
        else:
            loss = F.cross_entropy(head(out["cls"]), labels[idx], ignore_index=-1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        sched.step()
        log.append(loss.item())
        if step % 50 == 0 or step == args.steps:
            recent = sum(log[-50:]) / len(log[-50:])
            print(f"step {step}/{args.steps} loss {recent:.3f} {time.monotonic() - t0:.0f} s", flush=True)

    sd = model.state_dict()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": TRAIN_FORMAT,
            "arch": args.arch,
            "model_config": model.config.to_dict(),
            "student": sd,
            "teacher": sd,
            "step": args.steps,
            "prototypes_initialized": False,
            "init": f"supervised, target {args.target} (bench/supervised_reference.py): "
            + json.dumps({k: str(v) for k, v in vars(args).items()}),
        },
        args.out,
    )
    print(f"wrote {args.out}: {args.steps} steps in {time.monotonic() - t0:.0f} s, loss {log[-1]:.3f}")


if __name__ == "__main__":
    main()
