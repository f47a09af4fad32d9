"""The outer layer of every request: request id, API key, in-flight count, `x-request-id` and
total-time headers, a 500 envelope for anything unexpected, metrics and one JSON log line.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Sequence

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cotap.core.wire import REQUEST_ID_HEADER, TIMING_HEADERS, ErrorCode
from cotap.server.errors import error_response
from cotap.server.state import ServerState

log = logging.getLogger("cotap.server.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_OPEN_PREFIXES = ("/health/",)  # no API key: probes
_PUBLIC_PAGE = ("/", "/static/")  # no API key: the web page's own files (it sends the key itself)
# no API key: the API's description, so that /docs loads in a browser (its Authorize button then
# sends the key on every call it makes)
_PUBLIC_DOCS = ("/openapi.json", "/docs")


class RequestContextMiddleware:
    def __init__(
        self, app: ASGIApp, state: ServerState, routes: Sequence[tuple[re.Pattern[str], str]] = ()
    ) -> None:
        """`routes`: (path regex, template) of the app's routes, to label the metrics of requests
        refused before routing (by the API key check) with the route they were for."""
        self.app = app
        self.state = state
        self._routes = list(routes)
        key = state.settings.api_key
        self._key = key.get_secret_value().encode() if key is not None else None

    def _authorized(self, headers: Headers) -> tuple[bool, str]:
        if self._key is None:
            return True, ""
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False, "missing API key: send 'Authorization: Bearer <key>'"
        if not hmac.compare_digest(token.strip().encode(), self._key):
            return False, "invalid API key"
        return True, ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.monotonic()
        headers = Headers(scope=scope)
        given = headers.get(REQUEST_ID_HEADER, "")
        rid = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        ctx = scope.setdefault("state", {})
        ctx["request_id"] = rid
        ctx["t0"] = t0
        path: str = scope["path"]
        inference = path.startswith("/v1/") and scope["method"] == "POST"
        status = 500
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                h = MutableHeaders(scope=message)
                h[REQUEST_ID_HEADER] = rid
                h[TIMING_HEADERS["total"]] = f"{(time.monotonic() - t0) * 1000:.2f}"
            await send(message)

        public = (
            path.startswith(_OPEN_PREFIXES)
            or path == _PUBLIC_PAGE[0]
            or path.startswith(_PUBLIC_PAGE[1])
            or path in _PUBLIC_DOCS
            or path.startswith("/docs/")
        )
        ok, why = (True, "") if public else self._authorized(headers)
        if not ok:
            ctx["error_code"] = ErrorCode.UNAUTHORIZED.value
            response = error_response(
                ErrorCode.UNAUTHORIZED, why, rid, headers={"WWW-Authenticate": "Bearer"}
            )
            await response(scope, receive, send_with_headers)
        else:
            if inference:
                self.state.in_flight += 1
                self.state.metrics.in_flight.inc()
            try:
                await self.app(scope, receive, send_with_headers)
            except Exception:
                log.exception("unhandled error", extra={"fields": {"request_id": rid, "path": path}})
                if not started:
                    ctx["error_code"] = ErrorCode.INTERNAL.value
                    response = error_response(ErrorCode.INTERNAL, "internal server error", rid)
                    await response(scope, receive, send_with_headers)
            finally:
                if inference:
                    self.state.in_flight -= 1
                    self.state.metrics.in_flight.dec()
        self._record(scope, ctx, rid, path, status, time.monotonic() - t0, inference)

    def _record(
        self, scope: Scope, ctx: dict, rid: str, path: str, status: int, seconds: float, inference: bool
    ) -> None:
        label = getattr(scope.get("route"), "path", None) or next(
            (template for regex, template in self._routes if regex.match(path)), "unmatched"
        )
        m = self.state.metrics
        m.requests.labels(label, str(status)).inc()
        code = ctx.get("error_code")
        if code:
            m.errors.labels(label, code).inc()
        if inference and status == 200:  # as the other stages: refusals would pull latencies down
            m.stage_seconds.labels("total").observe(seconds)
        fields = {
            "request_id": rid,
            "method": scope["method"],
            "path": path,
            "status": status,
            "ms": round(seconds * 1000, 2),
            **({"code": code} if code else {}),
            **ctx.get("log", {}),
        }
        quiet = path.startswith(_OPEN_PREFIXES) or path == "/metrics"  # probes and scrapes
        level = logging.DEBUG if quiet else logging.INFO
        log.log(level, "request", extra={"fields": fields})
