"""Batch extraction: every image under a folder to features on disk, many requests in flight, with a
progress bar, resumable, and with every failure listed (see `store` for the two layouts).

- Resumable: images whose features are already on disk are skipped; each output is written
  atomically, so after a crash, SIGKILL or Ctrl-C a rerun does only what is missing. An output
  takes its image's modification time as read (as `cp -p` does), and, like `make`, an image newer
  than its output is embedded again (its old features are dropped first): features never silently
  describe an older version of the file, even one changed while its request was in flight, and an
  image dated in the future does not make every run redo it.
- Nothing lost: every image ends either written or listed in `DST/failures.json` (and in the
  report) with the server's error code, message and request id. A rerun retries the failures.
- One bad image does not sink its request's neighbours: when the server names it, the rest are
  sent again without it.
- `DST/embed.json` records the source folder, the resolved options, the model and its bundle hash;
  a rerun from another source folder, against a different model (other bundle hash) or with other
  options is refused unless `overwrite=True`, so one folder never mixes two sets of features.
- A server that goes away mid-run stops the run (`Unreachable`, like the other fatal errors): what
  was written is kept, and the same command run again resumes.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cotap.client import protocol
from cotap.client.base import DType, Outputs, dtype_name, output_names
from cotap.client.chunking import max_part_bytes, plan_chunks
from cotap.client.errors import (
    PER_IMAGE_ERRORS,
    BadImage,
    CotapError,
    ImageTooLarge,
    InvalidParameters,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    Unreachable,
)
from cotap.client.inputs import EncodedImage, encode_bytes
from cotap.client.results import Embedding
from cotap.client.store import (
    FAILURES,
    INDEX,
    RUN,
    SUFFIX,
    ShardWriter,
    feature_path,
    remove_stale_tmp,
    write_features,
    write_json,
)
from cotap.core.version import __version__

if TYPE_CHECKING:
    from cotap.client.client import Client

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Errors that no other request would escape: stop the whole run. (A server gone away, too: every
# remaining image would fail the same way, after its own retries.)
FATAL_ERRORS: tuple[type[CotapError], ...] = (Unauthorized, ModelNotFound, NotFound, Unreachable)


@dataclass(frozen=True)
class Failure:
    """An image that got no features, and why."""

    path: str
    code: str
    message: str
    status: int | None = None
    request_id: str | None = None


@dataclass
class FolderReport:
    """What one `embed_folder` run did. `ok` when every image under `src` has features."""

    src: Path
    dst: Path
    total: int  # images found under src
    skipped: int  # already done before this run
    written: int  # done by this run
    failures: list[Failure] = field(default_factory=list)
    stale: int = 0  # had features older than the image: dropped and embedded again (written or failed)
    interrupted: bool = False
    seconds: float = 0.0
    requests: int = 0
    retries: int = 0

    @property
    def remaining(self) -> int:
        """Images with no features yet: the failures, and those not reached before an interruption."""
        return self.total - self.skipped - self.written

    @property
    def ok(self) -> bool:
        return self.remaining == 0 and not self.failures

    def summary(self) -> str:
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        failed = len(self.failures)
        not_reached = self.remaining - failed
        text = (
            f"{self.written} written, {self.skipped} already done, {failed} failed"
            + (f", {not_reached} not reached" if not_reached else "")
            + f" of {self.total} images in {self.seconds:.1f} s "
            f"({rate:.1f} images/s, {self.requests} requests, {self.retries} retries)"
        )
        if self.stale:
            text += f"; {self.stale} had changed since their features were written and were redone"
        if self.interrupted:
            text += "; interrupted: run the same command again to finish"
        return text


class FolderInterrupted(KeyboardInterrupt):
    """Ctrl-C (or a KeyboardInterrupt from `on_written`) stopped `embed_folder`. What finished is
    kept, and `report` says what was done; being a KeyboardInterrupt, it stops a script that does
    not catch it, as Ctrl-C should. Run the same call again to finish."""

    def __init__(self, report: FolderReport) -> None:
        super().__init__(report.summary())
        self.report = report


def _up_to_date(output: Path, source: Path, mtimes: dict[Path, int]) -> bool:
    """Whether `output` is not older than `source` (`make`'s rule: an output carries its image's
    time as read, or, written by earlier versions, its own write time); `mtimes` caches the
    outputs' times (a shard holds many images)."""
    try:
        if output not in mtimes:
            mtimes[output] = output.stat().st_mtime_ns
        return mtimes[output] >= source.stat().st_mtime_ns
    except OSError:  # no output (a shard deleted), or the image gone
        return False


def scan(src: Path, suffixes: frozenset[str] = IMAGE_SUFFIXES) -> list[str]:
    """POSIX paths of the images under `src` (relative to it, sorted); a file gives its own name."""
    if src.is_file():
        return [src.name]
    if not src.is_dir():
        raise FileNotFoundError(f"no such folder or file: {src}")
    found = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in suffixes:
                found.append(Path(root, name).relative_to(src).as_posix())
    return sorted(found)


_PLACE = re.compile(r"^(image|pair) \d+( source| target)?: ")


def _failure(rel: str, e: BaseException) -> Failure:
    if isinstance(e, CotapError):  # "image 3: ..." names the place in a request; the path says more
        return Failure(rel, e.code, _PLACE.sub("", e.message), e.status, e.request_id)
    return Failure(rel, type(e).__name__, str(e))


Outcome = tuple[str, Embedding | Failure]


class _Worker:
    """Turns a group of image paths into outcomes (features or failures); runs in pool threads."""

    def __init__(self, client: Client, src: Path, params: dict[str, str], per_request: int) -> None:
        self.client = client
        self.src = src
        self.params = params
        self.per_request = per_request
        self.limits = client.models().limits
        self.read_mtimes: dict[str, int] = {}  # each image's modification time when it was read

    def __call__(self, group: Sequence[str]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        ready: list[tuple[str, EncodedImage]] = []
        biggest = max_part_bytes(self.limits)
        root = self.src if self.src.is_dir() else self.src.parent
        for rel in group:
            try:
                path = root / rel
                self.read_mtimes[rel] = path.stat().st_mtime_ns
                encoded = encode_bytes(path.read_bytes(), Path(rel).name, self.client.image_format)
            except (OSError, BadImage) as e:
                outcomes.append((rel, _failure(rel, e)))
                continue
            if len(encoded) > biggest:
                too_big = PayloadTooLarge(
                    f"{len(encoded)} bytes; the server takes at most {biggest} per image"
                )
                outcomes.append((rel, _failure(rel, too_big)))
                continue
            ready.append((rel, encoded))
        for chunk in plan_chunks([len(x) for _, x in ready], self.limits, max_items=self.per_request):
            outcomes += self._send(ready[chunk.start : chunk.stop])
        return outcomes

    def _send(self, items: list[tuple[str, EncodedImage]]) -> list[Outcome]:
        if not items:
            return []
        try:
            response = self.client._send(
                "POST",
                protocol.EMBED,
                params=self.params,
                files=protocol.image_files([x for _, x in items]),
            )
            dec = protocol.decode(response.content, response.headers)
            return list(zip([rel for rel, _ in items], protocol.embeddings(dec, len(items)), strict=True))
        except FATAL_ERRORS:
            raise
        except PayloadTooLarge as e:
            if len(items) > 1 and not isinstance(e, ImageTooLarge):
                mid = len(items) // 2
                return self._send(items[:mid]) + self._send(items[mid:])
            if len(items) > 1 and e.item is not None and 0 <= e.item < len(items):
                return self._without(items, e.item, e)
            return self._each_or_fail(items, e)
        except CotapError as e:
            if e.item is not None and 0 <= e.item < len(items):
                return self._without(items, e.item, e)
            if isinstance(e, PER_IMAGE_ERRORS):
                return self._each_or_fail(items, e)
            if isinstance(e, InvalidParameters):
                raise  # an option the server refuses: every request would fail the same way
            return [(rel, _failure(rel, e)) for rel, _ in items]  # transient: listed, rerun retries

    def _without(self, items: list[tuple[str, EncodedImage]], bad: int, e: CotapError) -> list[Outcome]:
        rel = items[bad][0]
        rest = items[:bad] + items[bad + 1 :]
        return [(rel, _failure(rel, e)), *self._send(rest)]

    def _each_or_fail(self, items: list[tuple[str, EncodedImage]], e: CotapError) -> list[Outcome]:
        if len(items) == 1:
            return [(items[0][0], _failure(items[0][0], e))]
        out: list[Outcome] = []
        for item in items:
            out += self._send([item])
        return out


def _check_run(dst: Path, record: dict[str, Any], overwrite: bool) -> None:
    """Refuse to resume into a folder made with another model or other options."""
    path = dst / RUN
    if overwrite or not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return
    if "src" in old and old["src"] != record["src"]:
        raise ValueError(
            f"{dst} holds the features of another source folder ({old['src']}, not {record['src']}): "
            "use another --out folder for these images, or --overwrite to replace those features"
        )
    keys = ("bundle_sha256", "outputs", "normalize", "dtype", "layout")
    diff = [k for k in keys if old.get(k) != record.get(k)]
    if diff:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {record.get(k)!r}" for k in diff)
        raise ValueError(
            f"{dst} holds features made differently ({details}); use another --out folder, or "
            "--overwrite to redo everything"
        )


def embed_folder(
    client: Client,
    src: str | Path,
    dst: str | Path,
    *,
    shard_size: int | None = None,
    concurrency: int = 8,
    images_per_request: int = 8,
    outputs: Outputs = ("patch", "cls"),
    normalize: bool = False,
    dtype: DType = None,
    model: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    suffixes: frozenset[str] = IMAGE_SUFFIXES,
    on_written: Callable[[str], None] | None = None,
) -> FolderReport:
    """Embed every image under `src` (JPEG, PNG, WebP; BMP, GIF and TIFF are converted) into `dst`.

    - `shard_size`: None writes one file per image (mirroring the source tree); N writes shards
      of N images and `index.json`.
    - `concurrency`: requests in flight; `images_per_request`: images per request (both capped by
      the server's limits: never more images in flight than its queue holds).
    - `outputs`, `normalize`, `dtype`, `model`: as `Client.embed`.
    - `overwrite`: redo everything instead of resuming.
    - `progress`: a tqdm bar on stderr.

    Returns a `FolderReport`. Ctrl-C stops cleanly: what finished is kept, and `FolderInterrupted`
    (a KeyboardInterrupt) is raised with the report in `.report`. Raises for problems no image would
    escape (wrong key, unknown model, an option the server refuses, another source folder already
    in `dst`, the server gone away: what was written is kept, and a rerun resumes). Images changed
    since their features were written are embedded again (`report.stale`).
    """
    from tqdm.auto import tqdm  # a widget in notebooks, text in terminals

    t0 = time.monotonic()
    src, dst = Path(src), Path(dst)
    if concurrency < 1 or images_per_request < 1:
        raise ValueError("concurrency and images_per_request must be at least 1")
    files = scan(src, suffixes)
    info = client.models()
    served = info.model(model or client.model)
    if served is None:
        name = model or client.model or info.default
        names = ", ".join(m.name for m in info.models)
        raise ModelNotFound(
            f"no model named {name!r}; served: {names}"
            if names
            else f"{client.url} serves no models (its /v1/models lists none)"
        )
    wanted, dtype_str = output_names(outputs), dtype_name(dtype)
    dst.mkdir(parents=True, exist_ok=True)
    per_request = max(1, min(images_per_request, info.limits.images_per_request))
    concurrency = info.limits.requests_in_flight(concurrency, per_request)
    record = {
        "version": __version__,
        "src": str(src.resolve()),
        "url": client.url,
        "model": served.name,
        "bundle_sha256": served.bundle_sha256,
        "outputs": wanted,
        "normalize": normalize,
        "dtype": dtype_str or "float16",
        "layout": "shards" if shard_size else "files",
        "shard_size": shard_size,
        "images_per_request": per_request,
        "concurrency": concurrency,
    }
    _check_run(dst, record, overwrite)
    write_json(dst / RUN, record)
    remove_stale_tmp(dst)

    writer: ShardWriter | None = None
    root = src if src.is_dir() else src.parent
    if shard_size:
        if overwrite:
            for old in dst.glob(f"shard-*{SUFFIX}"):
                old.unlink()
        header = {k: record[k] for k in ("model", "bundle_sha256", "outputs", "normalize", "dtype")}
        writer = ShardWriter(dst, shard_size, header, fresh=overwrite or not (dst / INDEX).exists())
        outputs_of = {rel: dst / shard for rel, shard in writer.shard_of.items()}
    elif overwrite:  # nothing of the earlier run stays: one folder never mixes two sets of features
        for old in dst.rglob(f"*{SUFFIX}"):
            old.unlink()
        outputs_of = {}
    else:
        outputs_of = {rel: path for rel in files if (path := feature_path(dst, rel)).exists()}
    mtimes: dict[Path, int] = {}
    had = [rel for rel in files if rel in outputs_of]
    done = {rel for rel in had if _up_to_date(outputs_of[rel], root / rel, mtimes)}
    stale = [rel for rel in had if rel not in done]
    if writer is not None:  # features of an older version of an image are dropped, not kept until redone
        writer.forget(stale)
    else:
        for rel in stale:
            outputs_of[rel].unlink(missing_ok=True)
    todo = [rel for rel in files if rel not in done]

    params = protocol.query(outputs=wanted, normalize=normalize, dtype=dtype_str, model=model or client.model)
    worker = _Worker(client, src, params, per_request)
    groups = [todo[i : i + per_request] for i in range(0, len(todo), per_request)]
    report = FolderReport(src=src, dst=dst, total=len(files), skipped=len(done), written=0, stale=len(stale))
    stats0 = client.stats
    bar = tqdm(
        total=len(files),
        initial=len(done),
        unit="img",
        desc="embed",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="cotap-embed")
    pending: set[Future[list[Outcome]]] = set()
    next_group = 0
    gone: Unreachable | None = None
    try:
        while next_group < len(groups) or pending:
            while next_group < len(groups) and len(pending) < 2 * concurrency:
                pending.add(pool.submit(worker, groups[next_group]))
                next_group += 1
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                for rel, outcome in future.result():
                    if isinstance(outcome, Failure):
                        report.failures.append(outcome)
                    else:
                        read_at = worker.read_mtimes.pop(rel)
                        if writer is not None:
                            writer.add(rel, outcome, read_at)
                        else:
                            out = write_features(dst, rel, outcome)
                            os.utime(out, ns=(read_at, read_at))
                        report.written += 1
                        if on_written is not None:
                            on_written(rel)
                    bar.update(1)
                bar.set_postfix(failed=len(report.failures), refresh=False)
    except KeyboardInterrupt:
        report.interrupted = True
    except Unreachable as e:
        gone = e
        report.interrupted = True
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
        if writer is not None:
            writer.flush()  # buffered features are complete: keep them
        bar.close()
        stats = client.stats
        report.requests = stats.requests - stats0.requests
        report.retries = stats.retries - stats0.retries
        report.seconds = time.monotonic() - t0
        write_json(
            dst / FAILURES,
            {
                "count": len(report.failures),
                "interrupted": report.interrupted,
                "failures": [asdict(f) for f in report.failures],
            },
        )
    if report.interrupted and gone is None:  # Ctrl-C
        raise FolderInterrupted(report) from None
    if gone is not None:
        raise Unreachable(
            f"{gone.message}; stopped after {report.skipped + report.written} of {report.total} images "
            f"({report.written} written by this run, all kept): run the same command again to resume "
            "once the server is back",
            request_id=gone.request_id,
        ) from gone
    return report
