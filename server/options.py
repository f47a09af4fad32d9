"""Per-request options of the inference routes: query parameters (documented in OpenAPI), which a
JSON body (or multipart text fields) may carry instead. One pydantic model per route validates both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any, Literal, TypeVar, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cotap.core.wire import CLS, PATCH, ErrorCode
from cotap.server.errors import ServerError, validation_message

Dtype = Literal["float16", "float32"]


class CommonOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="served model name (default: the first one)")
    dtype: Dtype | None = Field(
        None,
        description="float output dtype: float16 (the default for safetensors) or float32 (JSON default)",
    )

    @field_validator("model")
    @classmethod
    def _named(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("model is empty: name a served model, or leave the option out for the default")
        return v


def _patch_and_cls() -> list[Literal["patch", "cls"]]:
    return [PATCH, CLS]


class EmbedOptions(CommonOptions):
    outputs: list[Literal["patch", "cls"]] = Field(
        default_factory=_patch_and_cls,
        description="which outputs: patch, cls (repeat or comma-separate)",
    )
    normalize: bool = Field(False, description="L2-normalise patch and cls embeddings")

    @field_validator("outputs", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            v = [p.strip() for x in v for p in str(x).split(",") if p.strip()]
            if not v:
                raise ValueError("ask for at least one of patch, cls")
            return list(dict.fromkeys(v))
        return v


class PrototypeOptions(CommonOptions):
    top_k: int | None = Field(
        None, ge=1, description="return the k most probable prototypes per patch (default: all M)"
    )


class CorrespondOptions(CommonOptions):
    top_k: int = Field(1, ge=1, le=64, description="also return the k best matches per patch (k > 1)")
    mutual_only: bool = Field(False, description="set match = -1 and score = 0 where the match is not mutual")
    dense: bool = Field(
        False, description="also return the full cosine similarity (N, h*w, h'*w') (under max_dense_elements)"
    )


OptionsT = TypeVar("OptionsT", bound=CommonOptions)


def check_repeats(cls: type[CommonOptions], items: Iterable[tuple[str, str]]) -> None:
    """422 for a single-valued option given more than once in the query (`?top_k=1&top_k=2`):
    taking one of them silently would answer a question the client did not ask. List options
    (`outputs`) may repeat."""
    counts = Counter(k for k, _ in items)
    repeated = sorted(
        k
        for k, n in counts.items()
        if n > 1 and k in cls.model_fields and get_origin(cls.model_fields[k].annotation) is not list
    )
    if repeated:
        raise ServerError(
            ErrorCode.INVALID_PARAMETERS,
            f"{', '.join(repeated)} given more than once in the query; give it once",
        )


def merge_options(cls: type[OptionsT], query: OptionsT, body: dict[str, Any]) -> OptionsT:
    """The query's options plus the body's; a name given in both is refused (422)."""
    given = query.model_dump(exclude_unset=True)
    both = sorted(set(given) & set(body))
    if both:
        raise ServerError(
            ErrorCode.INVALID_PARAMETERS,
            f"{', '.join(both)} given in both the query and the body; give it once",
        )
    if not body:
        return query
    try:
        return cls.model_validate({**body, **given})
    except ValidationError as e:
        raise ServerError(ErrorCode.INVALID_PARAMETERS, validation_message(list(e.errors()))) from e
