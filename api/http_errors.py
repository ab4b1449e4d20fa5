"""Requests aiohttp's HTTP parser refuses: answered as JSON errors, logged as one line.

aiohttp answers a request it cannot parse (an over-long line, too many headers, control
bytes, conflicting Content-Length/Transfer-Encoding, a method that is not a token) itself,
before any middleware, in text/plain, and logs each with a multi-line ERROR traceback:
client garbage, not a bug of ours, yet one replica logged 4,848 tracebacks. Its hook for
that answer is RequestHandler.handle_error, and aiohttp builds its RequestHandler in
web.Server.__call__, so the runner swaps in a Server that builds this module's handler.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from .errors import error_response

log = logging.getLogger("raftmesh.api.http")
LOG_INTERVAL = 10.0  # seconds between two lines about the same kind of malformed request
MAX_LOGGED_TEXT = 200


class RateLimitedLog:
    """At most one line per kind of event per `interval`, counting the ones not logged, so a
    client sending garbage in a loop cannot fill the disk or bury the other lines."""

    def __init__(self, logger: logging.Logger, interval: float,
                 clock: Callable[[], float] = time.monotonic):
        self.logger, self.interval, self.clock = logger, interval, clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, message: str) -> None:
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        self.logger.warning("%s%s", message, f" (and {suppressed} more {kind} in the last "
                            f"{now - last:.0f}s, not logged)" if suppressed else "")


MALFORMED = RateLimitedLog(log, LOG_INTERVAL)


def one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_LOGGED_TEXT else text[:MAX_LOGGED_TEXT] + "..."


class JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering unparseable requests with a JSON 400 and
    logging what a client's bytes caused as one rate-limited line."""

    __slots__ = ()

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status != 400 or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)  # ours: keep the trace
        self.log_exception("malformed request", exc_info=exc)
        response = error_response(400, "bad_request", "malformed HTTP request: "
                                  + one_line(message or exc.message or type(exc).__name__))
        response.force_close()  # the parser's place in the byte stream is lost
        return response

    def log_exception(self, *args, **kw) -> None:
        """Also reached after a response, e.g. when aiohttp drains a body that does not
        decompress (web.RequestPayloadError)."""
        exc = kw.get("exc_info")
        if not isinstance(exc, (HttpProcessingError, web.RequestPayloadError)):
            return super().log_exception(*args, **kw)
        peer = self.transport.get_extra_info("peername") if self.transport else None
        MALFORMED.warning(type(exc).__name__, f"refused a malformed HTTP request from "
                          f"{peer[0] if peer else '?'}: {type(exc).__name__}: {one_line(str(exc))}")


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """web.AppRunner whose connections are handled by JsonErrorHandler."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer  # built by Application._make_handler, not us
        return server
