"""The hostile-input corpus (tests/reliability/corpus.py) against one app with a tiny real bundle:
every input gets its documented status and error code in the envelope, never a 5xx, and the
server is still ready and serving correct answers afterwards."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cotap.core.wire import REQUEST_ID_HEADER
from tests.reliability.corpus import CASES, table
from tests.server.helpers import jpeg, metric, run, running, settings_for


def test_every_hostile_input_gets_its_documented_status(tiny_bundle: Path) -> None:
    async def body() -> None:
        async with running(settings_for(tiny_bundle, log_level="warning")) as (_, c):
            ref = await c.post("/v1/embed?outputs=cls", files=[("image", ("a.jpg", jpeg(), "image/jpeg"))])
            assert ref.status_code == 200
            rows, wrong = [], []
            for case in CASES:
                r = await c.request(**case.request())
                code, message = None, ""
                if r.status_code >= 400:
                    err = r.json()["error"]
                    assert set(err) == {"code", "message", "request_id"}, (case.name, err)
                    assert err["request_id"] == r.headers[REQUEST_ID_HEADER]
                    assert "object at 0x" not in err["message"], (case.name, err["message"])
                    code, message = err["code"], err["message"]
                elif case.check is not None:
                    case.check(r.json())
                rows.append((case, r.status_code, code, message))
                if (r.status_code, code) != (case.status, case.code):
                    wrong.append((case.name, case.status, case.code, r.status_code, code, message))
            print("\n" + table(rows))
            assert not wrong, wrong
            assert all(status < 500 for _, status, _, _ in rows)
            # still ready, and a normal request gets the same answer as before the storm
            assert (await c.get("/health/ready")).status_code == 200
            again = await c.post("/v1/embed?outputs=cls", files=[("image", ("a.jpg", jpeg(), "image/jpeg"))])
            assert again.status_code == 200
            assert np.allclose(again.json()["cls"], ref.json()["cls"], atol=1e-6)
            text = (await c.get("/metrics")).text
            assert metric(text, "cotap_errors_total", code="internal") == 0

    run(body())


def test_corpus_covers_the_issue_list() -> None:
    """The inputs issue 8 names are all in the corpus (a guard against it shrinking)."""
    names = {c.name for c in CASES}
    wanted = {
        "truncated", "png_20000", "zero_bytes", "one_pixel", "cmyk", "png16", "palette", "gif_anim",
        "webp_anim", "exif_rotated", "huge_exif", "big_text_chunk", "wrong_part_type", "not_image",
        "bad_base64", "many_parts", "deep_json", "oversized_body", "oversized_chunked",
    }  # fmt: skip
    assert wanted <= names, wanted - names
    assert {c.status for c in CASES} == {200, 400, 413, 415, 422}
