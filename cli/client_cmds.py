"""The commands that talk to a running server: `cotap embed`, `prototypes`, `correspond`, `models`
and `health`. They import only `cotap.client` (lazily, inside each command), so they start fast
and work on the plain install (`pip install -e .`, no extras) without torch.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import textwrap
from pathlib import Path
from typing import Any

from cotap.cli.common import CLIError, int_at_least, number_in

CONNECTION_EPILOG = """
The server comes from --url or COTAP_URL (default http://127.0.0.1:8000), the key from --api-key or
COTAP_API_KEY. Requests are retried with backoff on 429/503, honouring Retry-After."""


def _wrap(text: str) -> str:
    """A description paragraph wrapped for the terminal (the epilogs keep their own lines)."""
    return textwrap.fill(text, width=min(100, shutil.get_terminal_size((100, 24)).columns - 2))


REQUEST_TIMEOUT_S = 120.0  # a large folder request on a busy CPU server can take a while
PROBE_TIMEOUT_S = 5.0  # `cotap health` is a probe: a server that does not answer is not ready


def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("server")
    g.add_argument(
        "--url",
        default=None,
        help="server URL (default: $COTAP_URL, else http://127.0.0.1:8000)",
    )
    g.add_argument("--api-key", default=None, help="API key (default: $COTAP_API_KEY)")
    g.add_argument("--model", default=None, help="served model name (default: the server's default)")
    g.add_argument(
        "--timeout",
        type=number_in(0, math.inf, open_ends=True),
        default=None,
        help=f"seconds per request (default {REQUEST_TIMEOUT_S:.0f}; health: {PROBE_TIMEOUT_S:.0f})",
    )
    return common


_fraction = number_in(0, 1, open_ends=False)
_positive = int_at_least(1)


def register(sub: argparse._SubParsersAction) -> None:
    common = _connection_options()
    formatter = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "embed",
        parents=[common],
        formatter_class=formatter,
        help="patch embeddings of a folder of images, to safetensors files (resumable)",
        description=_wrap(
            "Send every image under SRC (JPEG, PNG, WebP; BMP, GIF, TIFF converted) to the "
            "server and write its features under --out: one .safetensors file per image, mirroring "
            "SRC (photos/cat.jpg -> OUT/photos/cat.jpg.safetensors), or shards of N images with an "
            "index.json (--shard-size N). Finished images are skipped when run again, so an "
            "interrupted run (Ctrl-C, crash) resumes where it stopped; failures are listed at the end "
            "and in OUT/failures.json, and the exit status is 1 if any image failed."
        ),
        epilog="examples:\n"
        "  cotap embed photos/ --out features/\n"
        "  cotap embed photos/ --out shards/ --shard-size 1000 --normalize --outputs patch\n"
        "  COTAP_URL=http://gpu-box:8000 cotap embed photos/ --out features/ --concurrency 16\n"
        "  python -c \"from cotap.client import read_features; print(next(read_features('features/')))\"\n"
        + CONNECTION_EPILOG,
    )
    p.add_argument("src", type=Path, metavar="SRC", help="folder of images (or one image)")
    p.add_argument("--out", "-o", type=Path, required=True, metavar="DIR", help="where features go")
    p.add_argument(
        "--shard-size",
        type=_positive,
        default=None,
        metavar="N",
        help="write shards of N images plus index.json instead of one file per image",
    )
    p.add_argument("--concurrency", type=_positive, default=8, help="requests in flight (default 8)")
    p.add_argument(
        "--images-per-request",
        type=_positive,
        default=8,
        metavar="N",
        help="images per request, capped by the server's limits (default 8)",
    )
    p.add_argument("--outputs", default="patch,cls", help="patch, cls or patch,cls (default patch,cls)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    p.add_argument(
        "--dtype", choices=["float16", "float32"], default=None, help="stored dtype (default float16)"
    )
    p.add_argument("--overwrite", action="store_true", help="redo every image instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_embed)

    p = sub.add_parser(
        "prototypes",
        parents=[common],
        formatter_class=formatter,
        help="prototype map of an image, printed and optionally plotted",
        description=_wrap(
            "Ask the server which of the model's prototypes each patch of IMG belongs to. "
            "Prints the grid and the prototypes that cover the most patches; --plot draws the map over "
            "the image with a legend; --save keeps the raw arrays."
        ),
        epilog="examples:\n"
        "  cotap prototypes photo.jpg --plot prototypes.png\n"
        "  cotap prototypes photo.jpg --top-k 3 --save prototypes.safetensors\n" + CONNECTION_EPILOG,
    )
    p.add_argument("image", type=Path, metavar="IMG", help="the image")
    p.add_argument("--top-k", type=_positive, default=None, help="keep the k most probable per patch")
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="IMAGE",
        help="draw the map to this image file (.png, .jpg, .webp: the format its extension names)",
    )
    p.add_argument("--save", type=Path, default=None, metavar="FILE", help="write the arrays (safetensors)")
    p.add_argument(
        "--alpha", type=_fraction, default=0.55, help="opacity of the map in the plot (0..1, default 0.55)"
    )
    p.set_defaults(func=_prototypes)

    p = sub.add_parser(
        "correspond",
        parents=[common],
        formatter_class=formatter,
        help="patch correspondences between two images, printed and optionally plotted",
        description=_wrap(
            "For every patch of A, its most similar patch of B (cosine of the patch "
            "embeddings), and whether the match is mutual. Prints how many mutual matches there are "
            "and their scores; --plot draws A and B side by side with lines between matched patches."
        ),
        epilog="examples:\n"
        "  cotap correspond a.jpg b.jpg --plot matches.png\n"
        "  cotap correspond a.jpg b.jpg --plot all.png --all --max-lines 100 --min-score 0.5\n"
        + CONNECTION_EPILOG,
    )
    p.add_argument("source", type=Path, metavar="A", help="source image")
    p.add_argument("target", type=Path, metavar="B", help="target image")
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="IMAGE",
        help="draw the matches to this image file (.png, .jpg, .webp: the format its extension names)",
    )
    p.add_argument("--all", action="store_true", help="draw every best match, not only mutual ones")
    p.add_argument("--min-score", type=float, default=None, help="draw only matches scoring at least this")
    p.add_argument("--max-lines", type=_positive, default=300, help="most lines drawn (default 300)")
    p.add_argument("--top-k", type=_positive, default=1, help="also fetch the k best matches per patch")
    p.add_argument("--save", type=Path, default=None, metavar="FILE", help="write the arrays (safetensors)")
    p.set_defaults(func=_correspond)

    p = sub.add_parser(
        "models",
        parents=[common],
        formatter_class=formatter,
        help="the models a server serves, and its limits",
        description=_wrap(
            "List the served models (name, architecture, patch size, dims, input sizes, "
            "backend, device, bundle hash) and the server's request limits."
        ),
        epilog="examples:\n  cotap models\n  cotap models --json | jq .limits\n" + CONNECTION_EPILOG,
    )
    p.add_argument("--json", action="store_true", help="print the raw JSON answer")
    p.set_defaults(func=_models)

    p = sub.add_parser(
        "health",
        parents=[common],
        formatter_class=formatter,
        help="is the server live and ready? (exit 0 when ready)",
        description=_wrap(
            "Ask /health/live and /health/ready once (or, with --wait, until ready). Exit status 0 "
            "when ready, 1 otherwise (starting, draining, failed or unreachable): usable in scripts "
            "and probes."
        ),
        epilog="examples:\n  cotap health && cotap embed photos/ --out features/\n"
        "  cotap serve & cotap health --wait 120 && cotap embed photos/ --out features/\n"
        + CONNECTION_EPILOG,
    )
    p.add_argument(
        "--wait",
        type=number_in(0, 3600, open_ends=False),
        default=0.0,
        metavar="SECONDS",
        help="ask again every 0.5 s until ready, for at most SECONDS (default 0: ask once)",
    )
    p.set_defaults(func=_health)


def _client(args: argparse.Namespace, default_timeout: float = REQUEST_TIMEOUT_S, **kw: Any) -> Any:
    from cotap.client import Client

    timeout = default_timeout if args.timeout is None else args.timeout
    return Client(args.url, api_key=args.api_key, model=args.model, timeout=timeout, **kw)


def _fail(e: Exception) -> CLIError:
    return CLIError(str(e))


def _embed(args: argparse.Namespace) -> int:
    from cotap.client import CotapError, FolderInterrupted

    outputs = [o.strip() for o in args.outputs.split(",") if o.strip()]
    if not outputs or set(outputs) - {"patch", "cls"}:
        raise CLIError(f"--outputs must be patch, cls or patch,cls; got {args.outputs!r}")
    if not args.src.exists():
        raise CLIError(f"no such folder or file: {args.src}")
    with _client(args, max_in_flight=args.concurrency) as client:
        try:
            report = client.embed_folder(
                args.src,
                args.out,
                shard_size=args.shard_size,
                concurrency=args.concurrency,
                images_per_request=args.images_per_request,
                outputs=outputs,
                normalize=args.normalize,
                dtype=args.dtype,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
        except FolderInterrupted as e:  # Ctrl-C: what finished is kept; say what was done
            report = e.report
        except (CotapError, ValueError, OSError) as e:
            raise _fail(e) from e
    print(report.summary(), file=sys.stderr)
    if report.failures:
        print(f"{len(report.failures)} failed (also in {args.out / 'failures.json'}):", file=sys.stderr)
        for f in report.failures[:50]:
            print(f"  {f.path}: {f.code}: {f.message}", file=sys.stderr)
        if len(report.failures) > 50:
            print(f"  ... and {len(report.failures) - 50} more", file=sys.stderr)
    if report.interrupted:
        return 130
    return 0 if report.ok else 1


def _check_plot_path(path: Path | None) -> None:
    """Refuse a --plot path whose extension names no image format, before asking the server."""
    if path is not None:
        from cotap.client.plots import image_format

        try:
            image_format(path)
        except ValueError as e:
            raise CLIError(f"--plot: {e}") from e


def _write_failed(what: str, path: Path, e: OSError) -> CLIError:
    return CLIError(f"cannot write the {what} to {path}: {e.strerror or e}")


def _plot(image: Any, path: Path) -> None:
    from cotap.client.plots import save

    try:
        print(f"plot written to {save(image, path)}")
    except OSError as e:
        raise _write_failed("plot", path, e) from e


def _save_arrays(path: Path, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
    """The arrays as a safetensors file, its metadata written as the server and the feature store
    write theirs (strings as they are, other values JSON)."""
    import numpy as np
    from safetensors.numpy import save

    from cotap.core.wire import metadata_strings

    tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items() if v is not None}
    body = save(tensors, metadata=metadata_strings(meta))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    except OSError as e:
        raise _write_failed("arrays", path, e) from e
    print(f"arrays written to {path}")


def _prototypes(args: argparse.Namespace) -> int:
    import numpy as np

    from cotap.client import CotapError

    if not args.image.is_file():
        raise CLIError(f"no such image: {args.image}")
    _check_plot_path(args.plot)
    with _client(args) as client:
        try:
            p = client.prototypes(args.image, top_k=args.top_k)
        except CotapError as e:
            raise _fail(e) from e
    counts = p.counts()
    used = int((counts > 0).sum())
    total = int(counts.sum())
    print(f"{args.image}: grid {p.grid[0]}x{p.grid[1]}, {used} of {p.num_prototypes} prototypes used")
    print(f"model {p.model} (bundle {p.bundle_sha256[:12]})")
    for pid in np.argsort(-counts, kind="stable")[:8]:
        if counts[pid]:
            print(
                f"  prototype {int(pid):3d}: {int(counts[pid]):5d} patches ({100 * counts[pid] / total:.1f}%)"
            )
    if args.plot is not None:
        from cotap.client.plots import prototype_overlay

        _plot(prototype_overlay(args.image, p, alpha=args.alpha), args.plot)
    if args.save is not None:
        _save_arrays(
            args.save,
            {"prototype_id": p.ids, "prototype_prob": p.probs, "prototype_topk_id": p.topk_ids},
            {"model": p.model, "bundle_sha256": p.bundle_sha256, "grid": list(p.grid)},
        )
    return 0


def _correspond(args: argparse.Namespace) -> int:
    from cotap.client import CotapError

    for path in (args.source, args.target):
        if not path.is_file():
            raise CLIError(f"no such image: {path}")
    _check_plot_path(args.plot)
    with _client(args) as client:
        try:
            c = client.correspond(args.source, args.target, top_k=args.top_k)
        except CotapError as e:
            raise _fail(e) from e
    mutual = c.matches(mutual_only=True)
    print(
        f"{args.source} ({c.source_grid[0]}x{c.source_grid[1]} patches) -> "
        f"{args.target} ({c.target_grid[0]}x{c.target_grid[1]} patches)"
    )
    print(f"model {c.model} (bundle {c.bundle_sha256[:12]})")
    if len(mutual):
        print(
            f"{len(mutual)} mutual matches of {c.match.size} patches; score mean "
            f"{float(mutual.score.mean()):.3f}, best {float(mutual.score[0]):.3f}"
        )
    else:
        print(f"no mutual matches among {c.match.size} patches")
    if args.plot is not None:
        from cotap.client.plots import correspondence_lines

        image = correspondence_lines(
            args.source,
            args.target,
            c,
            mutual_only=not args.all,
            min_score=args.min_score,
            max_lines=args.max_lines,
        )
        _plot(image, args.plot)
    if args.save is not None:
        _save_arrays(
            args.save,
            {
                "match": c.match,
                "score": c.score,
                "mutual": c.mutual,
                "match_topk": c.match_topk,
                "score_topk": c.score_topk,
            },
            {
                "model": c.model,
                "bundle_sha256": c.bundle_sha256,
                "source_grid": list(c.source_grid),
                "target_grid": list(c.target_grid),
            },
        )
    return 0


def _models(args: argparse.Namespace) -> int:
    from cotap.client import CotapError

    with _client(args) as client:
        try:
            info = client.models()
        except CotapError as e:
            raise _fail(e) from e
    if args.json:
        print(json.dumps(info.raw, indent=2))
        return 0
    print(f"{client.url}  (cotap {info.version or '?'})")
    header = ("", "name", "arch", "patch", "dim", "protos", "input sizes", "backend", "device", "bundle")
    rows = [header]
    for m in info.models:
        sizes = ",".join(f"{h}x{w}" for h, w in m.input_sizes) or "any"
        rows.append(
            (
                "*" if m.name == info.default else "",
                m.name,
                m.arch,
                str(m.patch_size),
                str(m.embed_dim),
                str(m.num_prototypes),
                sizes,
                m.backend,
                f"{m.device}/{m.precision}",
                m.bundle_sha256[:12],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    limits = info.limits
    print(
        f"limits: {limits.max_images_per_request} images/request, "
        f"{limits.max_body_bytes / 2**20:.0f} MiB/request, {limits.max_pixels / 1e6:.0f} Mpixel/image, "
        f"queue {limits.max_queue}, deadline {limits.deadline_ms / 1000:.0f} s"
    )
    return 0


def _health(args: argparse.Namespace) -> int:
    from cotap.client import CotapError

    with _client(args, default_timeout=PROBE_TIMEOUT_S) as client:
        try:
            h = client.wait_until_ready(args.wait) if args.wait > 0 else client.health()
        except CotapError as e:  # not ready in time: the last state it saw
            print(e.message)
            return 1
    detail = f" ({h.error})" if h.error else ""
    models = f" models: {', '.join(h.models)}" if h.models else ""
    print(f"{client.url}: {'live' if h.live else 'not live'}, {h.status}{detail}{models}")
    return 0 if h.ready else 1
