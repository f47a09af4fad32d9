"""The training loop: AdamW with the release's parameter groups and cosine schedules, AMP, gradient
clipping, DDP under torchrun, checkpoints with exact resume, progress, metrics CSV and plot, and a
bundle at the end.

    from cotap.training.config import load_config
    from cotap.training.trainer import train
    result = train(load_config("configs/synthetic-tiny.yaml"), "runs/tiny")

Run directory: `config.yaml` (resolved), `checkpoints/step_NNNNNNN.pt` + `checkpoints/last.pt`
(the `cotap-train-v1` format `load_model` reads, plus everything resume needs), `metrics.csv`,
`curves.png`, `bundle/`, and `invocations.jsonl` (command line, host, device and versions of every
start and resume; checkpoints and the bundle's manifest record the versions too).

Exact resume: the data order is a pure function of (seed, epoch, position), every random draw of a
step comes from generators seeded by (seed, rank, step), and schedules are functions of the step;
checkpoints hold the optimiser, scaler, memory bank, queues and data position (and, for the record,
the RNG states of torch, NumPy and Python).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from cotap.core.bundle import Bundle, sha256_file
from cotap.core.fsio import atomic_path
from cotap.core.preprocess import PreprocessConfig
from cotap.core.version import environment
from cotap.training.bundles import write_model_bundle
from cotap.training.checkpoints import TRAIN_FORMAT, load_model, torch_load_safely
from cotap.training.config import (
    RESUMABLE_KEYS,
    ConfigError,
    TrainConfig,
    config_to_dict,
    dump_config,
    resume_changes,
)
from cotap.training.data.folders import open_dataset
from cotap.training.data.neighbours import dataset_fingerprint, load_knn_file
from cotap.training.data.pairs import PairBatch, PairedViews, collate_pairs
from cotap.training.data.views import ViewConfig
from cotap.training.distributed import (
    DistEnv,
    ShardedOrder,
    barrier,
    gather_to_main,
    init_distributed,
    mean_over_ranks,
    shutdown_distributed,
)
from cotap.training.interrupts import StepBoundaryInterrupt
from cotap.training.method import LOSS_NAMES, CoTAPMethod, CoTAPNetwork, build_network
from cotap.training.models import CoTAPViT, ViTConfig, build_model
from cotap.training.run_log import MetricsLog, plot_metrics
from cotap.training.schedules import LrSchedule, cosine, param_groups
from cotap.training.teacher import ema_update, make_teacher, momentum_at

CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
INVOCATIONS = "invocations.jsonl"  # argv, host, versions and device of every start and resume


class TrainError(RuntimeError):
    """A run that cannot start or continue (bad run directory, missing checkpoint, ...)."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    bundle: Path | None
    plot: Path | None
    last_metrics: dict[str, float]
    steps_per_s: float
    is_main: bool = True  # rank 0 (or a single process): the one that reports


def step_seed(seed: int, rank: int, step: int) -> int:
    """A well-mixed 63-bit seed for one step of one rank."""
    state = np.random.SeedSequence([seed, rank, step, 0xC07A9]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: None (fp32) on CPU unless asked (bf16 works there too), bf16 by default
    on CUDA; fp16 (with a GradScaler) only on CUDA."""
    if amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "fp16" and device.type != "cuda":
        raise TrainError(f"amp=fp16 needs a CUDA device (device is {device}); use amp=bf16 or off on CPU")
    return torch.bfloat16 if amp == "bf16" else torch.float16


# -- RNG state (recorded; resume reseeds per step anyway) ------------------------------------------------
def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- checkpoints ---------------------------------------------------------------------------------------
def _atomic_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A `cotap-train-v1` checkpoint as a dict (weights_only load: no arbitrary unpickling)."""
    p = Path(path)
    if not p.is_file():
        raise TrainError(f"checkpoint not found: {p}")
    ckpt = torch_load_safely(p)
    if not isinstance(ckpt, dict) or ckpt.get("format") != TRAIN_FORMAT:
        raise TrainError(f"{p} is not a {TRAIN_FORMAT} training checkpoint")
    return ckpt


class Trainer:
    """One run: build everything from a `TrainConfig`, then `fit()`."""

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | os.PathLike[str],
        resume: bool = False,
        env: DistEnv | None = None,
    ) -> None:
        self.config = config.validate()
        self.env = env or DistEnv()
        self.run_dir = Path(out_dir)
        self.ckpt_dir = self.run_dir / CHECKPOINT_DIR
        last = self.ckpt_dir / LAST
        if resume and not last.is_file():
            raise TrainError(f"--resume: no checkpoint at {last}")
        if not resume and last.exists():
            raise TrainError(
                f"{self.run_dir} already holds a run; pass --resume to continue it or use a new --out"
            )
        device = self.env.device
        self.device = device
        self.amp_dtype = resolve_amp(config.amp, device)
        if config.num_threads > 0:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(config.seed)
        self.environment = environment("torch", "numpy", "pillow")  # recorded by logs, checkpoints, bundle

        resume_ckpt = read_checkpoint(last) if resume else None
        if resume_ckpt is not None and isinstance(resume_ckpt.get("config"), dict):
            changed = resume_changes(resume_ckpt["config"], config)
            if changed:
                raise TrainError(
                    f"--resume continues the run in {self.run_dir} as it was configured; these settings "
                    f"differ from it: {'; '.join(changed)}. Drop those overrides, or start a new run "
                    f"(another --out). Settings a resume may change: {', '.join(RESUMABLE_KEYS)}"
                )
        # Model (from scratch, any checkpoint, or the run's own on resume) and data.
        backbone = self._build_backbone(resume_ckpt)
        self._build_data(backbone.config.patch_size, resume_ckpt)

        # Networks, method, optimiser.
        student = build_network(backbone, config).to(device)
        teacher = make_teacher(student)
        self.student: CoTAPNetwork = student
        self.teacher: CoTAPNetwork = teacher
        self.method = CoTAPMethod(config, student, teacher, self.env, self.prototypes_from_init)
        if self.env.distributed:
            self.method.student = DistributedDataParallel(
                student,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=self._find_unused(),
            )
        self.groups = param_groups(
            student.backbone, student.heads(), config.optim.lr, config.optim.head_lr_mult
        )
        self.optimizer = torch.optim.AdamW(
            self.groups, lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps, weight_decay=0.0
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.lr_schedule = LrSchedule(
            config.max_steps, config.optim.min_lr, config.optim.warmup_steps, config.optim.warmup_start_lr
        )
        self.step = 0
        self.epoch = 0
        self.position = 0
        self.train_time_s = 0.0  # wall clock spent in steps, summed over every start and resume
        if resume_ckpt is not None:
            self._load(resume_ckpt, last)
        if self.env.is_main:
            self._record_start(resumed=resume)
        self.log = (
            MetricsLog(self.run_dir / "metrics.csv", LOSS_NAMES, resume_step=self.step if resume else None)
            if self.env.is_main
            else None
        )

    def _build_backbone(self, resume_ckpt: dict[str, Any] | None) -> CoTAPViT:
        """The backbone to train: the run's own on resume, else from scratch or from any checkpoint
        `load_model` accepts; sets `arch`, `init_note` and `prototypes_from_init`."""
        config = self.config
        self.prototypes_from_init = False
        if resume_ckpt is not None:
            backbone: CoTAPViT = CoTAPViT(ViTConfig.from_dict(resume_ckpt["model_config"]))
            self.arch = str(resume_ckpt["arch"])
            self.init_note = str(resume_ckpt.get("init", "resumed"))
        elif config.model.init == "scratch":
            try:
                backbone = build_model(config.model.arch, **config.model.overrides)
            except (KeyError, TypeError, ValueError) as e:
                why = e.args[0] if isinstance(e, KeyError) and e.args else e  # a KeyError's str() is quoted
                raise ConfigError(f"config key model.arch/model.overrides: {why}") from e
            self.arch = config.model.arch
            self.init_note = "scratch"
        else:
            if config.model.overrides:
                raise TrainError("model.overrides apply only to init: scratch")
            loaded = load_model(config.model.init, arch=config.model.arch, which=config.model.init_which)
            backbone = loaded.model
            self.arch = loaded.arch
            self.prototypes_from_init = loaded.prototypes_initialized
            self.init_note = f"{config.model.init} ({loaded.layout}, sha256 {loaded.source_sha256[:12]})"
        return backbone.train()

    def _build_data(self, patch_size: int, resume_ckpt: dict[str, Any] | None) -> None:
        """The paired views and this rank's data order, checked now (crop sizes, an unreadable
        folder, a neighbour file for other images or another run) rather than steps later; sets
        `views`, `knn_sha256`, `data` and `order`."""
        config = self.config
        try:
            self.views = ViewConfig(**config.data.views)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config key data.views: {e}") from e
        if self.views.global_size % patch_size or self.views.local_size % patch_size:
            raise TrainError(
                f"crop sizes {self.views.global_size}/{self.views.local_size} must be multiples of the "
                f"patch size {patch_size}"
            )
        try:
            dataset = open_dataset(config.data.train)
            dataset[0]  # fails now, not steps later, when no image of a folder can be read
            nns = None
            self.knn_sha256: str | None = None
            if config.data.knn:
                nns = load_knn_file(
                    config.data.knn,
                    expected_len=len(dataset),
                    expected_fingerprint=dataset_fingerprint(dataset),
                )
                self.knn_sha256 = sha256_file(config.data.knn)
        except (FileNotFoundError, ValueError, IndexError) as e:
            raise TrainError(f"data: {e}") from e
        if resume_ckpt is not None and resume_ckpt.get("knn_sha256", self.knn_sha256) != self.knn_sha256:
            raise TrainError(
                f"data.knn {config.data.knn} is not the neighbour file this run started with (its sha256 "
                "changed): the resumed run would pair images differently. Restore the file, or start a "
                "new run"
            )
        if nns is not None and config.data.k > nns.shape[1]:
            raise TrainError(
                f"data.k={config.data.k} but {config.data.knn} holds {nns.shape[1]} neighbours per image; "
                f"set data.k={nns.shape[1]} or less, or rebuild it with `cotap train knn --k {config.data.k}`"
            )
        self.data = PairedViews(dataset, self.views, nns, k=config.data.k, seed=config.seed)
        try:
            self.order = ShardedOrder(
                len(self.data), config.data.batch_size, self.env.rank, self.env.world_size, config.seed
            )
        except ValueError as e:
            raise TrainError(f"data: {e}; lower data.batch_size or use more images") from e

    def _record_start(self, resumed: bool) -> None:
        """The run directory, its resolved `config.yaml`, and one line in `invocations.jsonl` per
        start or resume (command line, host, device, versions)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_config(self.config))
        invocation = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": sys.argv,
            "resumed_at_step": self.step if resumed else None,
            "world_size": self.env.world_size,
            "device": str(self.device),
            "cuda": torch.version.cuda,
            **self.environment,
        }
        with (self.run_dir / INVOCATIONS).open("a") as f:
            f.write(json.dumps(invocation) + "\n")

    def _find_unused(self) -> bool:
        choice = self.config.find_unused_parameters
        if choice != "auto":
            return choice == "true"
        weights = dataclasses.asdict(self.config.loss.weights).values()
        return (
            any(w == 0 for w in weights)
            or not self.config.bank.enabled
            or self.views.num_local == 0
            or not self.student.backbone.config.use_filter  # the ablation leaves the filter norms unused
        )

    def _autocast(self) -> Callable[[], contextlib.AbstractContextManager[Any]]:
        dtype, device_type = self.amp_dtype, self.device.type
        if dtype is None:
            return contextlib.nullcontext
        return lambda: torch.autocast(device_type, dtype=dtype)

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self, methods: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything an exact resume needs; `methods` holds every rank's method state (the memory
        bank and the queues are per rank), this rank's alone by default."""
        cfg = self.config
        return {
            "format": TRAIN_FORMAT,
            "arch": self.arch,
            "model_config": self.student.backbone.config.to_dict(),
            "student": self.student.backbone.state_dict(),
            "teacher": self.teacher.backbone.state_dict(),
            "heads": {
                "student": self.student.heads().state_dict(),
                "teacher": self.teacher.heads().state_dict(),
            },
            "step": self.step,
            "train_time_s": self.train_time_s,
            "prototypes_initialized": self.method.prototypes_initialized,
            "config": config_to_dict(cfg),
            "knn_sha256": self.knn_sha256,
            "environment": self.environment,
            "init": self.init_note,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "schedules": {
                "lr": self.lr_schedule.at(cfg.optim.lr, self.step),
                "weight_decay": cosine(
                    cfg.optim.weight_decay, cfg.optim.weight_decay_end, self.step, cfg.max_steps
                ),
                "momentum": momentum_at(self.step, cfg.max_steps, cfg.optim.ema_start, cfg.optim.ema_end),
            },
            "method": methods or [self.method.state_dict()],
            "data": {"epoch": self.epoch, "position": self.position, "dataset_len": len(self.data)},
            "world_size": self.env.world_size,
            "rng": rng_state(),
        }

    def _load(self, ckpt: dict[str, Any], path: Path) -> None:
        if ckpt.get("world_size", 1) != self.env.world_size:
            raise TrainError(
                f"{path} was written by {ckpt.get('world_size')} ranks; resume with the same world size "
                f"({self.env.world_size} now) for an exact continuation"
            )
        if ckpt["data"]["dataset_len"] != len(self.data):
            raise TrainError(
                f"{path} ran on {ckpt['data']['dataset_len']} images, the dataset now has {len(self.data)}"
            )
        self.student.backbone.load_state_dict(ckpt["student"])
        self.teacher.backbone.load_state_dict(ckpt["teacher"])
        self.student.heads().load_state_dict(ckpt["heads"]["student"])
        self.teacher.heads().load_state_dict(ckpt["heads"]["teacher"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        method = ckpt["method"]  # one state per rank; older checkpoints hold rank 0's alone
        self.method.load_state_dict(method[self.env.rank] if isinstance(method, list) else method)
        self.step = int(ckpt["step"])
        self.train_time_s = float(ckpt.get("train_time_s", 0.0))  # 0 for older checkpoints
        self.epoch = int(ckpt["data"]["epoch"])
        self.position = int(ckpt["data"]["position"])
        set_rng_state(ckpt["rng"])

    def save_checkpoint(self) -> Path:
        """Write `step_NNNNNNN.pt` and `last.pt` (main rank), prune old step files; all ranks wait."""
        path = self.ckpt_dir / f"step_{self.step:07d}.pt"
        methods = gather_to_main(self.method.state_dict())  # the ranks' banks and queues differ
        if self.env.is_main:
            _atomic_save(self.state_dict(methods), path)
            with atomic_path(self.ckpt_dir / LAST) as tmp:
                shutil.copyfile(path, tmp)
            keep = self.config.keep_checkpoints
            if keep > 0:
                for old in sorted(self.ckpt_dir.glob("step_*.pt"))[:-keep]:
                    old.unlink()
        barrier()
        return path

    # -- data ----------------------------------------------------------------------------------------
    def _batches(self) -> Generator[PairBatch, None, None]:
        """This rank's batches from (epoch, position) on, forever; updates the position as it goes."""
        while True:
            if self.position >= self.order.steps_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            self.data.set_epoch(self.epoch)
            sampler = [
                self.order.batch(self.epoch, j) for j in range(self.position, self.order.steps_per_epoch)
            ]
            loader = DataLoader(
                self.data,
                batch_sampler=sampler,
                collate_fn=collate_pairs,
                num_workers=self.config.data.num_workers,
                pin_memory=self.device.type == "cuda",
            )
            for batch in loader:
                self.position += 1
                yield batch

    # -- loop ----------------------------------------------------------------------------------------
    def _set_schedules(self, step: int) -> tuple[float, float, float]:
        o = self.config.optim
        wd = cosine(o.weight_decay, o.weight_decay_end, step, self.config.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_schedule.at(group["base_lr"], step)
            group["weight_decay"] = wd if group["decay"] else 0.0
        m = momentum_at(step, self.config.max_steps, o.ema_start, o.ema_end)
        return self.lr_schedule.at(o.lr, step), wd, m

    def train_step(self, batch: PairBatch) -> dict[str, float]:
        cfg = self.config
        step = self.step
        lr, wd, momentum = self._set_schedules(step)
        seed = step_seed(cfg.seed, self.env.rank, step)
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        self.student.train()
        total, terms = self.method.step_losses(
            batch.to(self.device, non_blocking=True), generator, self._autocast()
        )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.method.prototypes_just_initialized:
            # Adam moments of the random prototypes mean nothing for the k-means ones.
            self.optimizer.state.pop(self.student.backbone.kernel, None)
        grad_norm = float("nan")
        if cfg.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(nn.utils.clip_grad_norm_(self.student.parameters(), cfg.optim.clip_grad))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        ema_update(self.teacher, self.student, momentum)
        self.step += 1
        values = {f"loss_{k}": float(v.detach()) for k, v in terms.items()}
        values["loss"] = float(total.detach())
        values = mean_over_ranks(values, self.device)
        heads_lr = self.lr_schedule.at(cfg.optim.lr * cfg.optim.head_lr_mult, step)
        return {
            **values,
            "lr": lr,
            "lr_heads": heads_lr,
            "weight_decay": wd,
            "momentum": momentum,
            "grad_norm": grad_norm,
        }

    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train until `max_steps` (or stop early after step `stop_at`, checkpointing there, without a
        bundle). Returns where everything was written."""
        cfg = self.config
        end = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
        images_per_step = 2 * cfg.data.batch_size * self.env.world_size  # anchors + partners
        if cfg.data.knn is None and self.env.is_main and self.step < end:
            print(
                f"{cfg.name}: data.knn is not set, so each image's partner is a second crop set of itself "
                "(the nearest-neighbour pairs of the method are off); build a neighbour file with "
                "`cotap train knn` and set data.knn=FILE",
                file=sys.stderr,
            )
        if self.step >= end and self.env.is_main:
            print(
                f"{cfg.name}: the run is already at step {self.step} (max_steps={cfg.max_steps}); nothing to "
                f"train. To train longer: cotap train --out {self.run_dir} --resume max_steps=N",
                file=sys.stderr,
            )
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc=cfg.name,
            disable=not (cfg.progress and self.env.is_main),
            dynamic_ncols=True,
            unit="step",
        )
        batches = self._batches()
        start_step, started = self.step, time.perf_counter()
        interrupt = StepBoundaryInterrupt(self.device)
        with interrupt:
            checkpoint, last_row = self._loop(end, batches, bar, images_per_step, interrupt)
        bar.close()
        batches.close()
        if interrupt.stopped and self.step < end:  # Ctrl+C: the step in progress finished and was saved
            if self.env.is_main:
                print(
                    f"\n{cfg.name}: interrupted after step {self.step}; saved {checkpoint}. Continue with: "
                    f"cotap train --out {self.run_dir} --resume",
                    file=sys.stderr,
                )
            raise KeyboardInterrupt
        if checkpoint is None and (self.ckpt_dir / LAST).is_file():
            checkpoint = self.ckpt_dir / LAST  # nothing ran: the run's latest checkpoint
        elapsed = time.perf_counter() - started
        steps_per_s = (self.step - start_step) / elapsed if elapsed > 0 else 0.0
        plot = bundle = None
        if self.env.is_main and cfg.plot and self.log is not None:
            plot = plot_metrics(self.log.path, self.run_dir / "curves.png", title=cfg.name)
        existing = self.run_dir / "bundle"
        if self.step >= cfg.max_steps and cfg.bundle.enabled:
            if self.step == start_step and existing.is_dir():  # nothing ran: keep it (and its exports)
                bundle = existing
            else:
                if self.env.is_main:
                    bundle = self.write_bundle(checkpoint or self.ckpt_dir / LAST).path
                barrier()
        return TrainResult(
            self.run_dir, self.step, checkpoint, bundle, plot, last_row, steps_per_s, self.env.is_main
        )

    def _loop(
        self,
        end: int,
        batches: Iterator[PairBatch],
        bar: Any,
        images_per_step: int,
        interrupt: StepBoundaryInterrupt,
    ) -> tuple[Path | None, dict[str, float]]:
        """Steps until `end`, or until an interrupt (checkpointed at the step boundary); returns the
        last checkpoint written and the last step's metrics row."""
        cfg = self.config
        last_row: dict[str, float] = {}
        checkpoint: Path | None = None
        started = tick = time.perf_counter()
        before = self.train_time_s  # time_s continues across resumes
        while self.step < end:
            batch = next(batches)
            row = self.train_step(batch)
            now = time.perf_counter()
            ips = images_per_step / max(now - tick, 1e-9)
            tick = now
            self.train_time_s = before + (now - started)
            row |= {"step": self.step, "epoch": self.epoch, "time_s": self.train_time_s, "images_per_s": ips}
            last_row = row
            bar.set_postfix(  # before update, which redraws: the bar shows this step's loss, not the last
                {"loss": f"{row['loss']:.3f}"}
                | {k[5:]: f"{row[k]:.3f}" for k in row if k.startswith("loss_")}
                | {"img/s": f"{ips:.1f}"},
                refresh=False,
            )
            bar.update(1)
            stop = interrupt.agreed()  # every rank stops after the same step
            if self.log is not None and (self.step % cfg.log_every == 0 or self.step == end or stop):
                self.log.append(row)
            if self.step % cfg.checkpoint_every == 0 or self.step == end or stop:
                checkpoint = self.save_checkpoint()
            if stop:
                break
        return checkpoint, last_row

    def write_bundle(self, checkpoint: Path) -> Bundle:
        """The run's backbone (teacher by default) as a bundle in `run_dir/bundle`."""
        cfg = self.config
        net = self.teacher if cfg.bundle.which == "teacher" else self.student
        model = CoTAPViT(self.student.backbone.config)
        model.load_state_dict({k: v.detach().cpu() for k, v in net.backbone.state_dict().items()})
        size = cfg.bundle.size or self.views.global_size
        source = {
            "checkpoint": str(checkpoint),
            "layout": "cotap",
            "which": cfg.bundle.which,
            "init": self.init_note,
        }
        if checkpoint.is_file():
            source["sha256"] = sha256_file(checkpoint)
        return write_model_bundle(
            model.eval(),
            self.arch,
            self.run_dir / "bundle",
            name=cfg.bundle.name or cfg.name,
            preprocess=PreprocessConfig(
                resize="fixed", size=(size, size), patch_size=model.config.patch_size
            ),
            prototypes_initialized=self.method.prototypes_initialized,
            source=source,
            build={
                "trainer": "cotap.training.trainer",
                "step": self.step,
                "config": config_to_dict(cfg),
                "environment": self.environment,
            },
            overwrite=True,
        )


def train(
    config: TrainConfig, out_dir: str | os.PathLike[str], resume: bool = False, stop_at: int | None = None
) -> TrainResult:
    """Join the process group torchrun describes (if any), run, and leave it."""
    try:
        env = init_distributed(config.device)
    except ValueError as e:  # a device this machine lacks, a bad torchrun environment
        raise TrainError(f"config key device: {e}") from e
    try:
        return Trainer(config, out_dir, resume=resume, env=env).fit(stop_at=stop_at)
    finally:
        shutdown_distributed()
