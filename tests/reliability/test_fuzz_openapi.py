"""Property-based fuzzing of the HTTP API against its own OpenAPI description (schemathesis), in
process against the ASGI app with a tiny real bundle: no 5xx, every status, content type and body
as documented, and the server still ready and serving afterwards.

Generated `format: byte` / `format: binary` strings are either real images (every accepted format
and mode) or random bytes, so the fuzzer reaches the success path as well as the refusals.
"""

from __future__ import annotations

import base64
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python import asgi

from cotap.server.app import create_app
from tests.reliability.corpus import good_images
from tests.server.helpers import jpeg, settings_for

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# examples per operation and generation mode: bounded so the whole file stays well under 60 s
EXAMPLES = {GenerationMode.POSITIVE: 100, GenerationMode.NEGATIVE: 30}


def _register_image_formats() -> None:
    images = good_images()
    raw = st.one_of(st.sampled_from(images), st.binary(max_size=64))
    schemathesis.openapi.format("binary", raw)
    schemathesis.openapi.format("byte", raw.map(lambda b: base64.b64encode(b).decode()))


@pytest.fixture(scope="module")
def api(tiny_bundle: Path) -> Iterator[tuple[Any, Any]]:
    """(schema, ASGI client) for an app whose lifespan schemathesis runs; ready before use."""
    _register_image_formats()
    app = create_app(settings_for(tiny_bundle, max_images_per_request=8, log_level="warning"))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the app's lifespan
    client = asgi.get_client(app)
    with client:
        end = time.monotonic() + 60
        while client.get("/health/ready").status_code != 200:
            assert time.monotonic() < end, "the app never became ready"
            time.sleep(0.05)
        yield schema, client
    asgi.shutdown_lifespans()


def _fuzz(op: Any, mode: GenerationMode, statuses: Counter[tuple[str, int]]) -> None:
    @settings(
        max_examples=EXAMPLES[mode],
        deadline=None,
        database=None,
        derandomize=True,  # the same examples every run
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],
    )
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call()
        statuses[(op.label, response.status_code)] += 1
        case.validate_response(response, checks=CHECKS)

    run()


def test_fuzz_api_against_its_openapi(api: tuple[Any, Any]) -> None:
    schema, client = api
    statuses: Counter[tuple[str, int]] = Counter()
    operations = [r.ok() for r in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/embed", "POST /v1/prototypes", "POST /v1/correspond", "GET /v1/models"} <= labels
    for op in operations:
        for mode in EXAMPLES:
            if mode == GenerationMode.NEGATIVE and op.method.upper() == "GET":
                continue  # the GET routes take no input: nothing to make invalid
            _fuzz(op, mode, statuses)
    print("\nschemathesis statuses:", dict(sorted(statuses.items())))
    assert not [k for k in statuses if k[1] >= 500], statuses
    for route in ("POST /v1/embed", "POST /v1/prototypes", "POST /v1/correspond"):
        assert statuses[(route, 200)] > 0, f"the fuzzer never reached a 200 on {route}: {statuses}"
        assert sum(n for (r, s), n in statuses.items() if r == route and 400 <= s < 500) > 0
    # still ready and serving
    assert client.get("/health/ready").status_code == 200
    r = client.post("/v1/embed", files=[("image", ("a.jpg", jpeg(), "image/jpeg"))])
    assert r.status_code == 200 and len(r.json()["cls"]) == 1


def test_openapi_documents_the_error_envelope(api: tuple[Any, Any]) -> None:
    """The description names every status each route answers, with the envelope schema."""
    _, client = api
    spec = client.get("/openapi.json").json()
    envelope = spec["components"]["schemas"]["ErrorEnvelope"]
    assert envelope["required"] == ["error"] and "HTTPValidationError" not in spec["components"]["schemas"]
    for route in ("/v1/embed", "/v1/prototypes", "/v1/correspond"):
        responses = spec["paths"][route]["post"]["responses"]
        assert set(responses) == {
            "200",
            "400",
            "401",
            "404",
            "408",
            "413",
            "415",
            "422",
            "429",
            "500",
            "503",
            "504",
        }
        assert {"application/json", "application/x-safetensors"} <= set(responses["200"]["content"])
        assert "Retry-After" in responses["429"]["headers"]
        error = responses["413"]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/ErrorEnvelope"}
    assert set(spec["paths"]["/v1/models"]["get"]["responses"]) == {"200", "401", "500", "503"}
    assert "503" in spec["paths"]["/health/ready"]["get"]["responses"]
