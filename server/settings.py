"""Server settings: one typed object, read from `COTAP_*` environment variables and mirrored by the
`cotap serve` flags (a test holds the two together). Every limit has a safe default and is reported
by `GET /v1/models`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cotap.core.images import MAX_DECODABLE_PIXELS

MiB = 1024 * 1024
KiB = 1024
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"

BackendName = Literal["auto", "torch", "onnxruntime", "tensorrt"]
Precision = Literal["auto", "fp32", "fp16", "bf16", "int8"]


# A served model's name travels in the `model` option and the `X-Model` header: HTTP header values
# are Latin-1 at best, and a name that needs URL escaping is a trap; the same characters as model
# names elsewhere (Triton, Hugging Face repos).
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# RFC 6750 bearer token characters: what an `Authorization: Bearer` header can carry unchanged.
BEARER_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")


def model_name_error(name: str) -> str | None:
    """Why `name` cannot name a served model (None when it can)."""
    if MODEL_NAME.fullmatch(name):
        return None
    return (
        f"model name {name!r} is not usable: use 1-128 ASCII letters, digits, '.', '_' or '-', "
        "starting with a letter or digit (give one with NAME=PATH)"
    )


def _split_commas(value: Any) -> Any:
    """'a,b' or ['a,b', 'c'] -> ['a', 'b', 'c'] (environment variables and repeated flags alike)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple):
        out: list[str] = []
        for v in value:
            out += [p.strip() for p in str(v).split(",") if p.strip()]
        return out
    return value


class Settings(BaseSettings):
    """Everything `cotap serve` can be told; environment variable `COTAP_<NAME>`, flag `--<name>`."""

    model_config = SettingsConfigDict(
        env_prefix="COTAP_", extra="forbid", validate_default=True, env_ignore_empty=True
    )

    # -- what to serve --------------------------------------------------------------------------
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="bundles to serve, 'NAME=PATH' or 'PATH' (name from the bundle); the first is the "
        "default; empty = the embedded default model",
    )
    backend: BackendName = Field("auto", description="auto | torch | onnxruntime | tensorrt")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    precision: Precision = Field(
        "auto", description="auto | fp32 | fp16 | bf16 | int8 (auto: fp16 on CUDA, fp32 on CPU)"
    )
    warmup: bool = Field(True, description="run every input size at batch 1 and max batch before ready")

    # -- network --------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in containers)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    api_key: SecretStr | None = Field(
        None, description="require 'Authorization: Bearer KEY' (not on /health)"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed by CORS, comma-separated; '*' for any"
    )

    # -- limits ---------------------------------------------------------------------------------
    max_body_bytes: int = Field(32 * MiB, ge=1024, description="largest request body (413 beyond)")
    max_header_bytes: int = Field(
        64 * KiB, ge=KiB, description="request line + headers (431 beyond; cotap serve)"
    )
    max_field_bytes: int = Field(
        64 * KiB, ge=KiB, description="a text (option) part of a multipart body (413 beyond)"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="time for a request line and headers to arrive (408 beyond; cotap serve)"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, description="time to receive a whole request body (408 beyond): slow uploads end"
    )
    max_uploads: int = Field(
        32,
        ge=1,
        description="request bodies received at once (429 beyond); memory held <= this x max_body_bytes",
    )
    max_images_per_request: int = Field(
        64, ge=1, description="images per request (a correspondence pair counts two)"
    )
    max_pixels: int = Field(
        40_000_000, ge=1, le=MAX_DECODABLE_PIXELS, description="largest declared image size, in pixels"
    )
    min_side: int = Field(16, ge=1, description="smallest accepted shorter image side, in pixels")
    max_parts: int = Field(130, ge=1, description="multipart parts per request")
    max_json_depth: int = Field(
        8, ge=4, description="nesting depth of a JSON request body (a pairs body is 4 deep)"
    )
    max_json_bytes: int = Field(
        16 * MiB, ge=1024, description="largest JSON response (413 beyond: ask for safetensors)"
    )
    max_dense_elements: int = Field(
        4 * MiB, ge=1, description="largest dense similarity (pairs x source patches x target patches)"
    )

    # -- scheduling -----------------------------------------------------------------------------
    max_batch: int = Field(32, ge=1, description="largest inference batch, in images")
    max_queue: int = Field(256, ge=1, description="images waiting at most; more answer 429 at once")
    max_queue_delay_ms: float = Field(
        3.0, ge=0, le=10_000, description="how long the first image of a batch waits for company"
    )
    deadline_ms: int = Field(30_000, ge=1, description="per-request deadline (504 beyond)")
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with 429 and 503")
    worker_threads: int = Field(1, ge=1, le=64, description="inference worker threads")
    decode_threads: int = Field(2, ge=1, le=256, description="image decoding threads")
    intra_op_threads: int = Field(
        0, ge=0, description="threads inside one forward (torch/ONNX Runtime); 0 = library default"
    )

    # -- operations -----------------------------------------------------------------------------
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="on SIGTERM, the whole stop (in-flight and queued work) takes at most this long (+ ~1 s)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")

    @field_validator("models", "cors_origins", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return _split_commas(v)

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, v: Any) -> Any:
        return None if v in ("", None) else v

    @field_validator("api_key")
    @classmethod
    def _bearer_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and not BEARER_TOKEN.fullmatch(v.get_secret_value()):
            raise ValueError(
                "the API key must be a bearer token: ASCII letters, digits and -._~+/ (then '=' "
                "padding), so that clients can send it in an Authorization header unchanged"
            )
        return v

    @model_validator(mode="after")
    def _check(self) -> Settings:
        for spec in self.models:
            name, _ = parse_model_spec(spec)
            if name is not None and not name:
                raise ValueError(f"model spec {spec!r} has an empty name")
            if name:
                error = model_name_error(name)
                if error is not None:
                    raise ValueError(error)
        names = [n for n, _ in (parse_model_spec(s) for s in self.models) if n]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"model names must be unique; repeated: {sorted(dup)}")
        return self

    def model_specs(self) -> list[tuple[str | None, Path]]:
        """(name or None, bundle path) for each served model; the embedded default when none."""
        if not self.models:
            return [(None, DEFAULT_MODEL_DIR)]
        return [parse_model_spec(s) for s in self.models]

    def limits(self) -> dict[str, Any]:
        """The limits clients should know about (reported by /v1/models)."""
        keys = (
            "max_body_bytes",
            "max_header_bytes",
            "max_field_bytes",
            "header_timeout_s",
            "body_timeout_s",
            "max_uploads",
            "max_images_per_request",
            "max_pixels",
            "min_side",
            "max_parts",
            "max_json_depth",
            "max_json_bytes",
            "max_dense_elements",
            "max_batch",
            "max_queue",
            "max_queue_delay_ms",
            "deadline_ms",
        )
        return {k: getattr(self, k) for k in keys}

    def public_dict(self) -> dict[str, Any]:
        """All settings with the API key hidden (for logs)."""
        d = self.model_dump()
        d["api_key"] = "***" if self.api_key else None
        return d


def parse_model_spec(spec: str) -> tuple[str | None, Path]:
    """'name=path' -> ('name', path); 'path' -> (None, path). A '=' inside a path needs 'name=' first."""
    if "=" in spec and not spec.startswith(("/", ".", "~")):
        name, path = spec.split("=", 1)
        return name.strip(), Path(path).expanduser()
    return None, Path(spec).expanduser()
