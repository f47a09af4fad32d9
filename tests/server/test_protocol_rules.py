"""Small rules at the edges, tested directly: Accept negotiation (q-values, ties, specificity),
Starlette's HTTP errors in the envelope, top-k ties, and the resize policy's floor."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request

from cotap.core.preprocess import PreprocessConfig
from cotap.core.wire import SAFETENSORS_MEDIA_TYPE as ST
from cotap.server.backends.base import NumpyOps, _topk_indices
from cotap.server.backends.torch_ops import TorchOps
from cotap.server.codecs import _accept_quality, wants_binary
from cotap.server.errors import install_error_handlers
from tests.server.helpers import run


def request(accept: str) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/", "headers": [(b"accept", accept.encode())]})


@pytest.mark.parametrize(
    ("accept", "binary"),
    [
        (ST, True),
        (f"{ST}, application/json", True),  # equal q: binary wins the tie
        (f"application/json, {ST}", True),
        (f"{ST};q=0.5, application/json", False),
        (f"{ST};q=0, */*", False),
        (f"{ST};q=0.9, application/*;q=0.5", True),
        ("application/json", False),
        ("*/*", False),  # binary only when asked for by name
        (f"{ST};q=bogus, application/json", False),
    ],
)
def test_accept_negotiation(accept: str, binary: bool) -> None:
    assert wants_binary(request(accept)) is binary


def test_the_most_specific_range_decides_and_the_first_of_equals_counts() -> None:
    assert _accept_quality("application/*;q=0.2, application/json;q=0.7", "application/json") == 0.7
    assert _accept_quality("application/json;q=0.7, application/*;q=0.2", "application/json") == 0.7
    assert _accept_quality("*/*;q=0.3, application/*;q=0.6", "application/json") == 0.6
    assert _accept_quality("application/json;q=0.4, application/json;q=0.9", "application/json") == 0.4
    assert _accept_quality("text/html", "application/json") == 0.0


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "bad_image"),
        (418, "invalid_parameters"),
        (500, "internal"),
        (502, "internal"),
        (503, "not_ready"),
        (504, "deadline_exceeded"),
    ],
)
def test_starlette_http_errors_answer_in_the_envelope(status: int, code: str) -> None:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise HTTPException(status, "detail here")

    async def get() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get("/boom")

    r = run(get())
    assert r.status_code == status and r.json()["error"]["code"] == code


@pytest.mark.parametrize("ops", [NumpyOps(), TorchOps(torch.device("cpu"))], ids=["numpy", "torch"])
def test_top_k_ties_go_to_the_lowest_index(ops: NumpyOps | TorchOps) -> None:
    """A flat image gives identical patches: every similarity ties, and every backend must answer
    the same (lowest index first, as argmax), not whatever order a partition or topk leaves."""
    conv = (lambda x: torch.from_numpy(x)) if isinstance(ops, TorchOps) else (lambda x: x)
    src = np.ones((1, 2, 2, 4), np.float32)
    tgt = np.ones((1, 3, 3, 4), np.float32)
    tgt[0, 2, 2] = [1, 0, 0, 0]  # one target patch less similar than the tied others
    out = {
        k: ops.to_numpy(v, "float32")
        for k, v in ops.correspond(conv(src), conv(tgt), 4, False, False).items()
    }
    assert (out["match"] == 0).all()
    assert (out["match_topk"] == [0, 1, 2, 3]).all()
    assign = np.full((1, 1, 2, 6), 0.1, np.float32)
    assign[0, 0, 1, 4] = 0.5
    pr = {k: ops.to_numpy(v, "float32") for k, v in ops.prototypes(conv(assign), 3).items()}
    np.testing.assert_array_equal(pr["prototype_topk_id"][0, 0], [[0, 1, 2], [4, 0, 1]])


def test_top_k_against_a_full_stable_sort() -> None:
    """Both partial top-k implementations (NumPy's, torch's) against the plain full stable sort."""
    from cotap.server.backends.torch_ops import _topk

    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(3, 50, 17)).astype(np.float32)  # many ties
    for k in (1, 3, 17, 30):
        want = np.argsort(-x, axis=-1, kind="stable")[..., : min(k, 17)]
        np.testing.assert_array_equal(_topk_indices(x, k), want)
        values, idx = _topk(torch.from_numpy(x), k)
        np.testing.assert_array_equal(idx.numpy(), want)
        np.testing.assert_array_equal(values.numpy(), np.take_along_axis(x, want, -1))
    x[0, 0, 3] = np.nan  # no order: still k indices, no crash
    assert _topk_indices(x, 3).shape == (3, 50, 3) and _topk(torch.from_numpy(x), 3)[1].shape == (3, 50, 3)


def test_shorter_side_never_rounds_a_side_to_zero() -> None:
    cfg = PreprocessConfig(resize="shorter_side", size=224, patch_size=16, max_side=1024)
    assert cfg.output_size(10, 10000) == (16, 1024)  # a sliver keeps one patch row
    assert cfg.output_size(480, 640) == (224, 304)
