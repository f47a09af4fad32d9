"""The trainer on CPU: a tiny model learns on synthetic scenes, resumes exactly, and ends in a
bundle that `load_model` and `read_bundle` accept."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from cotap.cli.main import main as cli_main
from cotap.core.bundle import read_bundle
from cotap.training.checkpoints import load_model
from cotap.training.config import ConfigError, TrainConfig, load_config
from cotap.training.trainer import Trainer, TrainError, read_checkpoint

TINY = [
    "name=tiny-test",
    "max_steps=20",
    "progress=false",
    "log_every=1",
    "checkpoint_every=10",
    "model.arch=cotap_test",
    "model.init=scratch",
    "data.train=synthetic:32:0:48",
    "data.batch_size=4",
    "data.views.global_size=32",
    "data.views.local_size=16",
    "data.views.num_local=2",
    "heads.hidden_dim=32",
    "heads.bottleneck_dim=16",
    "heads.patch_prototypes=16",
    "heads.cls_prototypes=32",
    "bank.size=64",
    "bank.add_per_step=8",
    "bank.kmeans_iterations=30",
    "loss.patch_queue=256",
    "loss.patch_queue_add=32",
    "loss.cls_queue=64",
    "loss.cls_queue_add=8",
    "optim.lr=2e-3",
    "optim.head_lr_mult=5",
    "optim.min_lr=1e-4",
    "optim.clip_grad=5.0",
    "optim.ema_start=0.9",
    "optim.ema_end=0.99",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, spinning OMP threads cost 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(*extra: str) -> TrainConfig:
    return load_config(None, [*TINY, *extra])


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"student.{k}": v for k, v in trainer.student.state_dict().items()}
    out |= {f"teacher.{k}": v for k, v in trainer.teacher.state_dict().items()}
    return out


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, Path]:
    out = tmp_path_factory.mktemp("runs") / "full"
    trainer = Trainer(tiny_config(), out)
    trainer.result = trainer.fit()  # type: ignore[attr-defined]
    return trainer, out


def test_tiny_model_trains_and_loss_falls(unbroken: tuple[Trainer, Path]) -> None:
    trainer, out = unbroken
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    losses = [float(r["loss"]) for r in rows]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    for name in ("patch_intra", "patch_inner", "cls_inner", "cls_intra", "entropy"):
        assert all(r[f"loss_{name}"] != "" for r in rows), name
    assert trainer.method.prototypes_initialized  # the bank filled (16 crops per step) and k-means ran
    assert len(trainer.method.patch_queue) > 0 and len(trainer.method.cls_queue) > 0
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "config.yaml").is_file()


def test_resume_from_step_10_matches_unbroken_run(unbroken: tuple[Trainer, Path], tmp_path: Path) -> None:
    full, _ = unbroken
    first = Trainer(tiny_config(), tmp_path / "split")
    result = first.fit(stop_at=10)
    assert result.step == 10 and result.bundle is None
    stopped = read_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert stopped["step"] == 10
    second = Trainer(tiny_config(), tmp_path / "split", resume=True)
    assert second.step == 10
    second.fit()
    a, b = weights(full), weights(second)
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 1e-6, worst
    for group_a, group_b in zip(full.optimizer.param_groups, second.optimizer.param_groups, strict=True):
        assert group_a["lr"] == group_b["lr"] and group_a["weight_decay"] == group_b["weight_decay"]
    assert torch.equal(full.method.bank.samples, second.method.bank.samples)
    assert torch.equal(full.method.patch_queue.rows, second.method.patch_queue.rows)
    with (tmp_path / "split" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    times = [float(r["time_s"]) for r in rows]  # training time goes on across the resume, not from 0
    assert times == sorted(set(times)), times
    assert stopped["train_time_s"] == times[9] > 0


def test_ctrl_c_checkpoints_the_step_and_the_resume_is_exact(
    unbroken: tuple[Trainer, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGINT in the middle of step 3 (checkpoints every 10): the step finishes, is saved, and the
    run stops with a resume hint; resuming then gives the unbroken run's weights."""
    import os
    import signal

    full, _ = unbroken
    first = Trainer(tiny_config(), tmp_path / "int")
    step = first.train_step

    def step_with_ctrl_c(batch: Any) -> Any:
        if first.step == 2:  # during the third step
            os.kill(os.getpid(), signal.SIGINT)
        return step(batch)

    first.train_step = step_with_ctrl_c  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert read_checkpoint(tmp_path / "int" / "checkpoints" / "last.pt")["step"] == 3
    err = capsys.readouterr().err
    assert "interrupted after step 3" in err and f"cotap train --out {tmp_path / 'int'} --resume" in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    second = Trainer(tiny_config(), tmp_path / "int", resume=True)
    assert second.step == 3
    second.fit()
    a, b = weights(full), weights(second)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= 1e-6, worst


def test_checkpoint_and_bundle_load(unbroken: tuple[Trainer, Path]) -> None:
    trainer, out = unbroken
    ckpt = out / "checkpoints" / "last.pt"
    raw = read_checkpoint(ckpt)
    assert raw["step"] == 20 and raw["prototypes_initialized"] is True
    assert raw["config"]["model"]["arch"] == "cotap_test"
    for key in ("optimizer", "scaler", "method", "rng", "data", "heads"):
        assert key in raw
    teacher = load_model(ckpt)
    student = load_model(ckpt, which="student")
    for k, v in trainer.teacher.backbone.state_dict().items():
        assert torch.equal(teacher.model.state_dict()[k], v)
    for k, v in trainer.student.backbone.state_dict().items():
        assert torch.equal(student.model.state_dict()[k], v)
    bundle = read_bundle(out / "bundle")
    assert bundle.config.prototypes_initialized and bundle.config.arch == "cotap_test"
    assert bundle.manifest["build"]["step"] == 20 and bundle.manifest["source"]["which"] == "teacher"
    env = bundle.manifest["build"]["environment"]
    assert env["torch"] == torch.__version__.split("+")[0] or env["torch"] == torch.__version__
    assert raw["environment"]["python"] and raw["environment"]["host"]
    runs = [json.loads(line) for line in (out / "invocations.jsonl").read_text().splitlines()]
    assert len(runs) == 1 and runs[0]["resumed_at_step"] is None and runs[0]["argv"]
    loaded = load_model(out / "bundle")
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        assert torch.allclose(loaded.model(x)["patch"], teacher.model(x)["patch"], atol=1e-6)
    assert cli_main(["verify", str(out / "bundle")]) == 0


def test_refuses_existing_run_and_missing_resume(unbroken: tuple[Trainer, Path], tmp_path: Path) -> None:
    _, out = unbroken
    with pytest.raises(TrainError, match="--resume"):
        Trainer(tiny_config(), out)
    with pytest.raises(TrainError, match="no checkpoint"):
        Trainer(tiny_config(), tmp_path / "nothing", resume=True)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["device=tpu"], "config key device: unknown device 'tpu'"),
        (["device=cuda"], "config key device: .*no CUDA device here"),
        (["data.train=synthetic:3:0:48"], "smaller than one global batch.*lower data.batch_size"),
    ],
)
def test_setups_that_cannot_run_are_train_errors(tmp_path: Path, overrides: list[str], match: str) -> None:
    """What `cotap train` turns into one line (exit 2), not a traceback."""
    from cotap.training.trainer import train

    if "device=cuda" in overrides and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(TrainError, match=match):
        train(tiny_config(*overrides), tmp_path / "run")


def test_neighbour_files_must_fit_the_dataset_and_the_run(
    unbroken: tuple[Trainer, Path], tmp_path: Path
) -> None:
    from cotap.training.data.neighbours import build_knn_file

    bundle_dir = unbroken[1] / "bundle"
    nns = build_knn_file("synthetic:32:0:48", bundle_dir, k=3, out=tmp_path / "nns.npz", progress=False)
    base = ["max_steps=2", f"data.knn={nns}", "bundle.enabled=false", "plot=false"]
    with pytest.raises(TrainError, match="another dataset"):  # built for other images
        Trainer(tiny_config(*base, "data.k=3", "data.train=synthetic:32:1:48"), tmp_path / "a")
    with pytest.raises(TrainError, match=r"data.k=7 but .* holds 3 neighbours"):
        Trainer(tiny_config(*base, "data.k=7"), tmp_path / "b")
    run = Trainer(tiny_config(*base, "data.k=3"), tmp_path / "c")
    run.fit(stop_at=1)
    build_knn_file("synthetic:32:0:48", bundle_dir, k=2, out=nns, progress=False)  # replaced under the run
    with pytest.raises(TrainError, match="not the neighbour file this run started with"):
        Trainer(tiny_config(*base, "data.k=3"), tmp_path / "c", resume=True)


def test_resume_refuses_settings_that_would_make_another_run(
    unbroken: tuple[Trainer, Path], tmp_path: Path
) -> None:
    """A resume continues the recorded run: a changed seed, learning rate or model is named and
    refused (the record would claim it for the whole run); running longer is fine."""
    out = tmp_path / "run"
    shutil.copytree(unbroken[1], out)
    with pytest.raises(TrainError) as e:
        Trainer(tiny_config("seed=3", "optim.lr=1.0", "heads.hidden_dim=48"), out, resume=True)
    message = str(e.value)
    assert "seed: 0 -> 3" in message and "optim.lr:" in message and "heads.hidden_dim:" in message
    assert "max_steps" in message  # the list of what may change
    longer = Trainer(tiny_config("max_steps=25", "log_every=5", "plot=false"), out, resume=True)
    assert longer.step == 20 and longer.config.max_steps == 25


def test_resuming_a_finished_run_says_so(
    unbroken: tuple[Trainer, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    shutil.copytree(unbroken[1], out)
    capsys.readouterr()
    (out / "bundle" / "onnx").mkdir()  # stands for exports added to the run's bundle since
    before = (out / "bundle" / "manifest.json").read_bytes()
    result = Trainer(tiny_config("plot=false"), out, resume=True).fit()
    assert result.step == 20 and result.checkpoint == out / "checkpoints" / "last.pt"
    assert "already at step 20 (max_steps=20); nothing to train" in capsys.readouterr().err
    assert result.bundle == out / "bundle" and (out / "bundle" / "onnx").is_dir()  # not rewritten
    assert (out / "bundle" / "manifest.json").read_bytes() == before


def test_ablation_switches_and_init_from_bundle(unbroken: tuple[Trainer, Path], tmp_path: Path) -> None:
    _, out = unbroken
    cfg = tiny_config(
        "max_steps=3",
        "loss.patch_intra_mode=l1",
        "loss.weights.cls_intra=0",
        "loss.weights.patch_inner=0",
        f"model.init={out / 'bundle'}",
        "bundle.enabled=false",
        "plot=false",
    )
    trainer = Trainer(cfg, tmp_path / "ablate")
    assert trainer.method.prototypes_initialized  # inherited from the bundle: no k-means again
    kernel = trainer.student.backbone.kernel.detach().clone()
    result = trainer.fit()
    assert result.step == 3 and result.bundle is None
    assert set(result.last_metrics) >= {"loss_patch_intra", "loss_cls_inner", "loss_entropy"}
    assert "loss_cls_intra" not in result.last_metrics and "loss_patch_inner" not in result.last_metrics
    assert not torch.equal(kernel, trainer.student.backbone.kernel)  # the entropy loss moved them


def test_contrastive_only_pretraining_moves_the_backbone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The from-scratch initialisation recipe of docs/results.md: the CLS InfoNCE alone."""
    cfg = tiny_config(
        "max_steps=3",
        "data.knn=null",
        "loss.weights={patch_intra: 0, patch_inner: 0, cls_inner: 0, cls_intra: 0, entropy: 0, cls_nce: 1}",
        "bank.enabled=false",
        "bundle.enabled=false",
        "plot=false",
    )
    trainer = Trainer(cfg, tmp_path / "nce")
    before = trainer.student.backbone.patch_embed.proj.weight.detach().clone()
    result = trainer.fit()
    assert "data.knn is not set" in capsys.readouterr().err  # the pairing is off: said once, at the start
    loss = result.last_metrics["loss_cls_nce"]
    assert 0 < loss < 2 * 12, loss  # InfoNCE over 2·4 images × 2 globals: about ln 16 at the start
    assert set(result.last_metrics) & {"loss_cls_inner", "loss_patch_intra", "loss_entropy"} == set()
    assert not torch.equal(before, trainer.student.backbone.patch_embed.proj.weight)


def test_cli_train_runs_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "\n".join(line.replace("=", ": ", 1) for line in TINY if "." not in line.split("=")[0]) + "\n"
    )
    nested = [o for o in TINY if "." in o.split("=")[0]]
    code = cli_main(
        [
            "train",
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "run"),
            *nested,
            "max_steps=2",
            "bank.enabled=false",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 2 and Path(summary["bundle"]).is_dir()
    assert cli_main(["train", "--config", str(cfg), "--out", str(tmp_path / "x"), "optim.lr=fast"]) == 2
    assert "optim.lr" in capsys.readouterr().err


def test_cli_knn_then_train_with_neighbour_pairs(
    unbroken: tuple[Trainer, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cotap.training.data.neighbours import load_knn_file

    _, out = unbroken
    nns = tmp_path / "nns.npz"
    args = [
        "train",
        "knn",
        "--data",
        "synthetic:32:0:48",
        "--checkpoint",
        str(out / "bundle"),
        "--k",
        "3",
        "--out",
        str(nns),
    ]
    assert cli_main(args) == 0
    report = json.loads(capsys.readouterr().out)
    table = load_knn_file(report["knn"], expected_len=32)
    assert table.shape == (32, 3) and (table[:, 0] == range(32)).all()
    assert "CLS output" in report["embedding"] and report["crop"] == "center square"  # trained prototypes
    trainer = Trainer(
        tiny_config("max_steps=2", f"data.knn={nns}", "data.k=3", "bundle.enabled=false", "plot=false"),
        tmp_path / "run",
    )
    trainer.fit()
    assert trainer.data.nns is not None and trainer.step == 2
    assert "data.knn is not set" not in capsys.readouterr().err
    assert cli_main(["train", "knn", "--data", "synthetic:4"]) == 2  # missing --checkpoint/--out
    capsys.readouterr()
    # options of the other command are refused, not ignored
    assert cli_main(["train", "--out", str(tmp_path / "x"), "--batch-size", "2", "--k", "3"]) == 2
    assert "--k, --batch-size belong to `cotap train knn`" in capsys.readouterr().err
    assert cli_main([*args[:-2], "--out", str(tmp_path / "n2.npz"), "--resume"]) == 2
    assert "--resume belong to `cotap train`" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a stop before the first step would checkpoint nothing
        cli_main(["train", "--out", str(tmp_path / "y"), "--stop-at", "0"])
    assert e.value.code == 2 and "--stop-at: must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (["data.views.global_sise=32"], ConfigError, "data.views"),
        (
            ["model.arch=cotap_nope"],
            ConfigError,
            r"model.arch/model.overrides: unknown model .cotap_nope.; known",
        ),
        (["bank.size=32"], ConfigError, "bank.size"),
        (["data.train=/nonexistent/folder"], TrainError, "dataset not found"),
        (["data.views.global_size=36"], TrainError, "multiples of the patch size"),
        (["amp=fp16", "device=cpu"], TrainError, "needs a CUDA device"),
    ],
)
def test_bad_runs_fail_clearly(
    tmp_path: Path, overrides: list[str], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Trainer(tiny_config(*overrides), tmp_path / "bad")


def test_bf16_autocast_runs_on_cpu(tmp_path: Path) -> None:
    trainer = Trainer(
        tiny_config("max_steps=2", "amp=bf16", "bundle.enabled=false", "plot=false"), tmp_path / "bf16"
    )
    assert trainer.amp_dtype == torch.bfloat16
    result = trainer.fit()
    assert result.step == 2 and all(v == v for k, v in result.last_metrics.items() if k.startswith("loss"))
    assert trainer.student.backbone.kernel.dtype == torch.float32  # autocast, not a cast of the weights


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_trains_on_cuda_with_mixed_precision(tmp_path: Path, amp: str) -> None:
    """The CUDA path: autocast (and the grad scaler for fp16) with finite losses, then a bundle whose
    float32 weights serve on the CPU."""
    trainer = Trainer(tiny_config("device=cuda", f"amp={amp}", "max_steps=4", "plot=false"), tmp_path / "gpu")
    assert trainer.device.type == "cuda"
    result = trainer.fit()
    assert result.step == 4 and result.bundle is not None
    assert all(
        torch.isfinite(torch.tensor(v)) for k, v in result.last_metrics.items() if k.startswith("loss")
    )
    loaded = load_model(result.bundle)
    assert next(loaded.model.parameters()).dtype == torch.float32
