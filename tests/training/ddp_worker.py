"""Launched by test_trainer_ddp.py under torchrun: train, then save this rank's weights and batches."""

from __future__ import annotations

import sys

import torch

from cotap.training.config import load_config
from cotap.training.distributed import init_distributed, shutdown_distributed
from cotap.training.trainer import Trainer


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    try:
        trainer = Trainer(load_config(None, overrides), out, env=env)
        spe = trainer.order.steps_per_epoch
        seen = [trainer.order.batch(s // spe, s % spe) for s in range(trainer.config.max_steps)]
        result = trainer.fit()
        state = {f"student.{k}": v for k, v in trainer.student.state_dict().items()}
        state |= {f"teacher.{k}": v for k, v in trainer.teacher.state_dict().items()}
        torch.save(
            {
                "weights": state,
                "batches": seen,
                "backend": env.backend,
                "world_size": env.world_size,
                "prototypes_initialized": trainer.method.prototypes_initialized,
                "reports": result.is_main,  # only rank 0 prints the CLI's summary
            },
            f"{out}/rank{env.rank}.pt",
        )
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
