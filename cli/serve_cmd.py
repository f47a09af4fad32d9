"""`cotap serve`: run the inference server. Every flag mirrors a server setting (environment
variable `COTAP_<NAME>`); flags win over the environment. With no `--model` it serves the embedded
default (`server/default_model/`, see its MODEL_CARD.md)."""

from __future__ import annotations

import argparse
import difflib
import os
import socket
import sys
from collections.abc import Mapping
from typing import Any

from cotap.cli.common import CLIError, require

# (setting, flag type, help). A test checks this table against cotap.server.settings.Settings.
FLAGS: list[tuple[str, Any, str]] = [
    ("host", str, "address to listen on (default 127.0.0.1; 0.0.0.0 in containers)"),
    ("port", int, "TCP port (default 8000)"),
    ("backend", str, "auto | torch | onnxruntime | tensorrt (default auto)"),
    ("device", str, "auto | cpu | cuda | cuda:N (default auto)"),
    ("precision", str, "auto | fp32 | fp16 | bf16 | int8 (default auto: fp16 on CUDA, fp32 on CPU)"),
    ("warmup", bool, "warm every input size before reporting ready (default on)"),
    ("api_key", str, "require 'Authorization: Bearer KEY' on every route but /health"),
    ("cors_origins", str, "comma-separated origins allowed by CORS ('*' for any)"),
    ("max_body_bytes", int, "largest request body (default 32 MiB)"),
    ("max_header_bytes", int, "request line + headers before 431 (default 64 KiB)"),
    ("max_field_bytes", int, "a text (option) part of a multipart body before 413 (default 64 KiB)"),
    ("header_timeout_s", float, "seconds for a request line and headers to arrive before 408 (default 10)"),
    ("body_timeout_s", float, "seconds to receive a whole request body before 408 (default 30)"),
    ("max_uploads", int, "request bodies received at once before 429 (default 32)"),
    ("max_images_per_request", int, "images per request; a pair counts two (default 64)"),
    ("max_pixels", int, "largest declared image size in pixels (default 40,000,000)"),
    ("min_side", int, "smallest accepted shorter image side (default 16)"),
    ("max_parts", int, "multipart parts per request (default 130)"),
    ("max_json_depth", int, "nesting depth of JSON bodies, at least 4 (default 8)"),
    ("max_json_bytes", int, "largest JSON answer; beyond, ask for safetensors (default 16 MiB)"),
    ("max_dense_elements", int, "largest dense similarity answer, in values (default 4 Mi)"),
    ("max_batch", int, "largest inference batch in images (default 32)"),
    ("max_queue", int, "images waiting at most before 429 (default 256)"),
    ("max_queue_delay_ms", float, "how long a batch waits to fill (default 3)"),
    ("deadline_ms", int, "per-request deadline before 504 (default 30000)"),
    ("retry_after_s", int, "Retry-After seconds sent with 429/503 (default 1)"),
    ("worker_threads", int, "inference worker threads (default 1)"),
    ("decode_threads", int, "image decoding threads (default 2)"),
    ("intra_op_threads", int, "threads inside one forward; 0 = library default"),
    ("drain_timeout_s", float, "on SIGTERM, the whole stop takes at most this long, + ~1 s (default 30)"),
    ("log_level", str, "debug | info | warning | error (default info)"),
]


def flag_name(setting: str) -> str:
    return "--" + setting.replace("_", "-")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve bundles over HTTP (patch embeddings, prototypes, correspondences)",
        description="Run the batching HTTP server. Each flag also reads from COTAP_<NAME> "
        "(e.g. COTAP_MAX_BATCH); flags win. With no --model, the embedded default model is served.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="NAME=PATH",
        help="bundle to serve (repeatable; NAME= optional, the first is the default)",
    )
    for setting, kind, text in FLAGS:
        if kind is bool:
            p.add_argument(flag_name(setting), dest=setting, action=argparse.BooleanOptionalAction, help=text)
        else:
            p.add_argument(flag_name(setting), dest=setting, type=kind, help=text)
    p.set_defaults(func=_serve)


CLIENT_ENV = {"COTAP_URL"}  # read by the SDK and the client commands, not by the server


def warn_unknown_env(prefix: str, fields: set[str], environ: Mapping[str, str] = os.environ) -> list[str]:
    """Say on stderr which `prefix`-ed environment variables the server does not know (a typo in
    one would otherwise be ignored in silence), with the nearest setting; returns the warnings."""
    known = {f"{prefix}{f.upper()}" for f in fields}
    out = []
    for var in sorted(environ):
        if var.startswith(prefix) and var not in known and var not in CLIENT_ENV:
            near = difflib.get_close_matches(var, sorted(known), n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            out.append(f"warning: ignoring {var}: not a server setting{hint}")
    for line in out:
        print(line, file=sys.stderr)
    return out


def settings_from_args(args: argparse.Namespace) -> Any:
    """The server Settings: environment first, then the flags given on the command line."""
    require("fastapi", "serve")
    require("uvicorn", "serve")
    from pydantic import ValidationError

    from cotap.server.settings import Settings

    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    prefix = str(Settings.model_config.get("env_prefix", ""))
    warn_unknown_env(prefix, set(Settings.model_fields))

    def where(err: Any) -> str:  # the flag when one was given, else the environment variable
        if not err["loc"]:
            return "settings"
        name = str(err["loc"][0])
        return flag_name(name) if name in given else f"{prefix}{name.upper()}"

    try:
        return Settings(**given)
    except ValidationError as e:
        problems = "; ".join(f"{where(err)}: {err['msg']}" for err in e.errors())
        raise CLIError(f"bad server settings: {problems}") from e


def listen_error(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on (None when it can), found before any model is loaded
    so that a port already in use fails in a moment, not after minutes of loading."""
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as e:
        return f"cannot resolve host {host!r}: {e}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as e:
            return f"cannot listen on {host}:{port}: {e.strerror or e}"
    return None


def _serve(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    error = listen_error(settings.host, settings.port)
    if error is not None:  # here, not in the server: the server imports no socket library (SSRF)
        raise CLIError(error)
    from cotap.server.runner import serve

    return serve(settings)
