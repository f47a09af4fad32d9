"""Launched by test_trainer_ddp.py under torchrun: train, then save this rank's weights, batches
and method state (memory bank, queues) as `<out>/<tag>rank<r>.pt`.

Usage: ddp_worker.py OUT [--tag T] [--stop-at N] [--resume] OVERRIDE..."""

from __future__ import annotations

import argparse

import torch

from cotap.training.config import load_config
from cotap.training.distributed import init_distributed, shutdown_distributed
from cotap.training.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--tag", default="")
    p.add_argument("--stop-at", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    args, overrides = p.parse_known_args()
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    try:
        trainer = Trainer(load_config(None, overrides), args.out, env=env, resume=args.resume)
        spe = trainer.order.steps_per_epoch
        seen = [trainer.order.batch(s // spe, s % spe) for s in range(trainer.config.max_steps)]
        result = trainer.fit(stop_at=args.stop_at)
        state = {f"student.{k}": v for k, v in trainer.student.state_dict().items()}
        state |= {f"teacher.{k}": v for k, v in trainer.teacher.state_dict().items()}
        torch.save(
            {
                "weights": state,
                "method": trainer.method.state_dict(),
                "step": trainer.step,
                "batches": seen,
                "backend": env.backend,
                "world_size": env.world_size,
                "prototypes_initialized": trainer.method.prototypes_initialized,
                "reports": result.is_main,  # only rank 0 prints the CLI's summary
            },
            f"{args.out}/{args.tag}rank{env.rank}.pt",
        )
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
