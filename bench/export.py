"""Export accuracy and CPU throughput: fp32/fp16/int8 ONNX against torch eager fp32, one run.

    python bench/export.py --arch cotap_vits16 --size 224 [--batch 8] [--iters 5] [--json out.json]
    python bench/export.py --bundle server/default_model [--batch 8]

With --arch, a randomly initialised model (torch seed 0) is written to a temporary bundle; with
--bundle, the bundle is copied to a temporary directory first (it is never modified). Each
precision is exported with `export_onnx` (so every figure is the accuracy gate's own report), then
torch eager fp32 and onnxruntime (CPU, 2 intra-op threads) each run the same batch of fixture
images; throughput is the median over --iters timed runs after a warm-up of at least 3 s. Prints a Markdown table
(for docs/benchmarks.md) and optionally writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _time(fn: Any, iters: int, warmup_s: float = 3.0) -> float:
    """Median seconds per call after warming up for at least 3 calls and `warmup_s` seconds (oneDNN
    builds its convolution primitives over the first calls, which are up to 20x slower)."""
    start, calls = time.perf_counter(), 0
    while calls < 3 or time.perf_counter() - start < warmup_s:
        fn()
        calls += 1
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--arch", help="registry name: a random-init model of this architecture")
    src.add_argument("--bundle", help="an existing bundle (copied, never modified)")
    ap.add_argument("--size", type=int, default=224, help="input side with --arch")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precisions", default="fp32,fp16,int8")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()

    import numpy as np
    import onnxruntime as ort
    import torch

    from cotap.core.bundle import read_bundle
    from cotap.core.preprocess import PreprocessConfig
    from cotap.export.fixtures import preprocess_batch, synthetic_images
    from cotap.export.gate import ort_session
    from cotap.export.onnx import export_onnx
    from cotap.training.bundles import write_model_bundle
    from cotap.training.checkpoints import load_model
    from cotap.training.models import build_model

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="cotap-bench-export-"))
    try:
        if args.arch:
            torch.manual_seed(0)
            model = build_model(args.arch).eval()
            pre = PreprocessConfig(size=(args.size, args.size), patch_size=model.patch_size)
            bundle = write_model_bundle(model, args.arch, work / "b", name=args.arch, preprocess=pre)
            label = f"{args.arch} (random init, torch seed 0)"
        else:
            shutil.copytree(args.bundle, work / "b")
            bundle = read_bundle(work / "b")
            label = f"{bundle.config.arch} bundle {args.bundle} (manifest sha256 {bundle.sha256[:12]})"
        cfg = bundle.config
        size = cfg.input_sizes[0]
        x = preprocess_batch(synthetic_images(args.batch, seed=500), cfg.preprocess, size)  # (B, 3, H, W)
        model = load_model(bundle.path).model.eval()
        xt = torch.from_numpy(x)

        def run_torch() -> None:
            with torch.inference_mode():
                model.forward_features(xt)

        torch_s = _time(run_torch, args.iters)
        rows: list[dict[str, Any]] = []
        for precision in args.precisions.split(","):
            t0 = time.perf_counter()
            record = export_onnx(bundle.path, precision, max_batch=args.batch)
            export_s = time.perf_counter() - t0
            sess = ort_session(bundle.path / record.file, threads=args.threads)
            ort_s = _time(lambda s=sess: s.run(None, {"images": x}), args.iters)
            fig = next(iter(record.gate["sizes"].values()))
            rows.append(
                {
                    "precision": precision,
                    "file_mb": record.extra["bytes"] / 2**20,
                    "export_s": export_s,
                    "patch_cos_mean": fig["patch_cos_mean"],
                    "patch_cos_min": fig["patch_cos_min"],
                    "cls_cos_mean": fig["cls_cos_mean"],
                    "argmax_agreement": fig["argmax_agreement"],
                    "argmax_excluded": fig["argmax_excluded_fraction"],
                    "gate_passed": record.gate["passed"],
                    "ort_img_s": args.batch / ort_s,
                    "speedup_vs_torch": torch_s / ort_s,
                }
            )
        result = {
            "model": label,
            "size": list(size),
            "batch": args.batch,
            "threads": args.threads,
            "iters": args.iters,
            "torch_eager_fp32_img_s": args.batch / torch_s,
            "rows": rows,
            "versions": {
                "torch": torch.__version__,
                "onnxruntime": ort.__version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "command": " ".join(["python", *sys.argv]),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"### {result['model']}, {size[0]}x{size[1]}, batch {args.batch}, {args.threads} threads\n")
    print(f"torch eager fp32: {result['torch_eager_fp32_img_s']:.1f} img/s\n")
    print(
        "| precision | patch cos mean | patch cos min | cls cos mean | argmax agree (excluded) | gate | ORT img/s | ORT / torch | file MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        agree = "n/a" if r["argmax_agreement"] is None else f"{100 * r['argmax_agreement']:.2f}%"
        print(
            f"| {r['precision']} | {r['patch_cos_mean']:.6f} | {r['patch_cos_min']:.6f} | {r['cls_cos_mean']:.6f} "
            f"| {agree} ({100 * r['argmax_excluded']:.0f}%) | {'pass' if r['gate_passed'] else 'FAIL'} "
            f"| {r['ort_img_s']:.1f} | {r['speedup_vs_torch']:.2f}x | {r['file_mb']:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
