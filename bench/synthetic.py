"""Speed of the synthetic scene generator (and optionally of the multi-crop views), one process,
one thread: the per-core rate that DataLoader workers multiply.

    python bench/synthetic.py --n 2000 --size 128 [--repeat 3] [--views 200]

Prints one JSON line: images/s (wall clock) per repeat and the median, the median per CPU-second
of this process (robust when other processes compete for the cores), and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core: BLAS must not fan out (numpy is imported later)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="scenes per repeat")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--views", type=int, default=0, help="also time make_views on this many images")
    args = ap.parse_args()

    from cotap.training.data.synthetic import SYNTHETIC_VERSION, SceneConfig, SyntheticScenes

    scenes = SyntheticScenes(args.n, args.seed, SceneConfig(size=args.size))
    scenes[0]  # warm caches
    rates, cpu_rates = [], []
    for _ in range(args.repeat):
        start, cpu_start = time.perf_counter(), time.process_time()
        for i in range(args.n):
            scenes[i]
        rates.append(args.n / (time.perf_counter() - start))
        cpu_rates.append(args.n / (time.process_time() - cpu_start))
    result: dict[str, object] = {
        "bench": "synthetic",
        "version": SYNTHETIC_VERSION,
        "size": args.size,
        "n": args.n,
        "images_per_s": [round(r, 1) for r in rates],
        "median_images_per_s": round(statistics.median(rates), 1),
        # per CPU second of this process: what one uncontended core gives when others compete
        "median_images_per_cpu_s": round(statistics.median(cpu_rates), 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cpu": platform.processor() or platform.machine(),
        "cpus_visible": os.cpu_count(),
    }
    if args.views:
        import torch

        from cotap.training.data.views import ViewConfig, make_views

        torch.set_num_threads(1)
        images = [scenes[i].image for i in range(min(args.views, args.n))]
        cfg = ViewConfig()
        g = torch.Generator().manual_seed(0)
        make_views(images[0], cfg, g)
        start, cpu_start = time.perf_counter(), time.process_time()
        for image in images:
            make_views(image, cfg, g)
        result["views_per_s"] = round(len(images) / (time.perf_counter() - start), 1)
        result["views_per_cpu_s"] = round(len(images) / (time.process_time() - cpu_start), 1)
        result["views_config"] = f"2x{cfg.global_size} + {cfg.num_local}x{cfg.local_size}, full jitter"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
