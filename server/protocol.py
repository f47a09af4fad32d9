"""The HTTP/1.1 protocol `cotap serve` runs: uvicorn's, with bounds on the request line and headers.

uvicorn's httptools protocol buffers a request's line and headers without any limit (an 8 MB
header was accepted) and for as long as they take to arrive, so one client could make the server
hold any amount of memory, or a connection forever (slowloris), before the app sees the request.
Here bytes received while a request's headers are incomplete are counted, and past
`max_header_bytes` the connection gets 431 with the error envelope and is closed; and a request
line and headers that have not all arrived `header_timeout_s` after the request began (or after
the connection opened, for a connection that sends nothing) get 408 with the envelope (or, when
nothing was sent, a plain close). With the pure-Python h11 protocol (when httptools is missing)
h11's own incomplete-event limit applies and there is no header timeout.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from cotap.core.wire import ERROR_MEDIA_TYPE, REQUEST_ID_HEADER, ErrorCode
from cotap.server.errors import envelope_bytes


class _HeadersTooLarge(Exception):
    """Raised from a parser callback to stop parsing a request already refused with 431."""


def http_protocol(header_timeout_s: float, max_header_bytes: int) -> Any:
    """The protocol class for `uvicorn.Config(http=...)`: bounded httptools, else "h11" (then
    pass `h11_max_incomplete_event_size=max_header_bytes`). The bounds come from the settings,
    which own their defaults."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # no httptools: h11 bounds headers itself (h11_max_incomplete_event_size)
        return "h11"

    class BoundedHeadersProtocol(HttpToolsProtocol):
        """Refuses (431) a request whose line and headers exceed `max_header_bytes`.

        Two counts, either of which refuses: the request line and headers as the parser hands
        them over (at most their size on the wire, whatever reads they came in), and, for headers still incomplete, the
        bytes of every read after the one in which the request began (that read's start may hold
        the end of an earlier pipelined request), so a header that never ends is held to the
        limit plus one read. No request under the limit is ever refused.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = False  # a request has begun and its headers are not complete
            self._began_in_read = False
            self._head_bytes = 0  # bytes of reads while the headers were incomplete
            self._parsed_bytes = 0  # request line and headers as parsed
            self._refused = False
            self._head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()  # a connection that never sends a request line is closed too

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head = True
            self._began_in_read = True
            self._head_bytes = 0
            self._parsed_bytes = len("GET  HTTP/1.1\r\n")  # the request line around its URL, once
            self._arm()

        def on_url(self, url: bytes) -> None:  # called once per read the URL spans
            self._count_parsed(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count_parsed(len(name) + len(value) + len(":\r\n"))  # the space after ':' is optional
            super().on_header(name, value)

        def _count_parsed(self, n: int) -> None:
            self._parsed_bytes += n
            if self._parsed_bytes > max_header_bytes:
                self._refuse()
                raise _HeadersTooLarge()  # uvicorn sees a parser error; `send_400_response` stays quiet

        def send_400_response(self, msg: str) -> None:
            if not self._refused:  # a refused request has its answer (431) already
                super().send_400_response(msg)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._disarm()
            super().on_headers_complete()

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timeout)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timeout(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if not self._in_head:  # nothing sent since the connection opened
                self.transport.close()
                return
            self.logger.warning("request headers not complete after %g s: refused (408)", header_timeout_s)
            self._answer(
                "408 Request Timeout",
                ErrorCode.REQUEST_TIMEOUT,
                f"request line and headers did not arrive within {header_timeout_s:g} s (header_timeout_s)",
            )

        def data_received(self, data: bytes) -> None:
            self._began_in_read = False
            super().data_received(data)
            if not self._in_head or self._began_in_read or self.transport.is_closing():
                return
            self._head_bytes += len(data)
            if self._head_bytes > max_header_bytes:
                self._refuse()

        def _refuse(self) -> None:
            self._refused = True
            self.logger.warning("request headers over %d bytes refused (431)", max_header_bytes)
            self._answer(
                "431 Request Header Fields Too Large",
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"request line and headers exceed {max_header_bytes} bytes (max_header_bytes)",
            )

        def _answer(self, status: str, code: ErrorCode, message: str) -> None:
            """Answer with the envelope and close: the request never reached the app."""
            request_id = uuid.uuid4().hex
            body = envelope_bytes(code, message, request_id)
            head = (
                f"HTTP/1.1 {status}\r\n"
                f"content-type: {ERROR_MEDIA_TYPE}\r\ncontent-length: {len(body)}\r\n"
                f"{REQUEST_ID_HEADER}: {request_id}\r\nconnection: close\r\n\r\n"
            )
            self.transport.write(head.encode("ascii") + body)
            self.transport.close()
            self._in_head = False
            self._disarm()

    return BoundedHeadersProtocol
