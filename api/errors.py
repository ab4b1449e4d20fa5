"""JSON errors with stable codes, and the middleware that guarantees them.

Clients branch on `code`, never on message text. A client's mistake is always a 4xx with a
message naming the problem; 500 is reserved for our own bugs and logged with a trace.
"""
from __future__ import annotations

import logging

from aiohttp import web

log = logging.getLogger("raftmesh.api")

# code -> (status, meaning); the OpenAPI document lists these.
ERROR_CODES = {
    "bad_request": (400, "malformed request: not JSON, bad query, malformed HTTP"),
    "validation_failed": (400, "the body does not match the schema; see details[]"),
    "unauthenticated": (401, "missing, malformed, unknown or expired API key"),
    "forbidden": (403, "the API key lacks the scope this operation needs"),
    "not_found": (404, "no such resource or route"),
    "method_not_allowed": (405, "the route exists but not with this method"),
    "conflict": (409, "the state does not allow this (duplicate, still in use, ...)"),
    "version_conflict": (409, "expected_version does not match the current one"),
    "already_member": (409, "the replica is already a member of the cluster; nothing changed"),
    "membership_change_in_progress": (409, "another membership change is not committed yet; "
                                           "nothing changed, retry"),
    "payload_too_large": (413, "the body exceeds the size limit"),
    "unsupported_media_type": (415, "the body's Content-Type is not the one the operation takes "
                                    "(application/json or text/plain, UTF-8)"),
    "expectation_failed": (417, "an Expect header other than 100-continue"),
    "no_leader": (503, "no quorum or leader right now; the write was NOT applied, retry"),
    "outcome_unknown": (503, "the write may or may not have been applied; retry with the "
                             "same Idempotency-Key to find out"),
    "not_ready": (503, "this replica cannot serve a linearizable read right now"),
    "preauth_key_invalid": (401, "the pre-auth key is expired, used up or revoked"),
    "pending_approval": (403, "the node waits for an admin to approve it"),
    "node_expired": (401, "the node's key expired or it logged out; register again with an "
                          "auth key"),
    "unsupported_protocol_version": (426, "the agent's protocol version is one this replica "
                                          "does not serve; the message names those it does"),
    "invalid_route": (400, "a route is not a CIDR, or one to approve is not advertised"),
    "invalid_exit_node": (400, "the exit node an agent reports using is no node offering "
                               "approved exit routes"),
    "invalid_setting": (400, "a cluster setting (DNS, lifecycle) out of its allowed values; the "
                             "message names it"),
    "address_pool_exhausted": (507, "no free overlay address is left"),
    "bad_command": (400, "a malformed command reached the state machine"),
    "unknown_command": (400, "a command the state machine does not know"),
    "already_bootstrapped": (409, "a bootstrap-only command after bootstrap"),
    "login_invalid": (400, "no single sign-on in progress for this state (unknown, used or "
                           "expired), or the identity provider's answer failed validation"),
    "login_required": (401, "sign in at the identity provider first"),
    "idp_unavailable": (503, "the identity provider cannot be reached; existing nodes are "
                             "unaffected, new logins must wait"),
    "user_locked": (403, "the user or device is locked by an admin"),
    "internal": (500, "a bug in raftmesh; it is logged"),
}


MAX_BODY_BYTES = web.AppKey("max_body_bytes", int)


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, details: list | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


def error_body(code: str, message: str, details: list | None = None) -> dict:
    body = {"error": {"code": code, "message": message}}
    if details:
        body["error"]["details"] = details
    return body


def error_response(status: int, code: str, message: str, details: list | None = None) -> web.Response:
    return web.json_response(error_body(code, message, details), status=status)


_HTTP_CODES = {400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large"}


@web.middleware
async def error_middleware(request: web.Request, handler):
    try:
        return await handler(request)
    except APIError as e:
        return error_response(e.status, e.code, e.message, e.details)
    except web.RequestPayloadError as e:  # e.g. a body that does not decode as its Content-Encoding
        return error_response(400, "bad_request", f"cannot read the request body: {e}")
    except web.HTTPRequestEntityTooLarge:
        limit = request.app.get(MAX_BODY_BYTES)
        return error_response(413, "payload_too_large", f"body exceeds the limit of {limit} bytes")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, "bad_request")
        message = {404: f"no route {request.path}",
                   405: f"{request.method} is not allowed on {request.path}"}.get(e.status, e.reason)
        response = error_response(e.status, code, message)
        if "Allow" in e.headers:  # a 405 must say what is allowed (RFC 9110 15.5.6)
            response.headers["Allow"] = e.headers["Allow"]
        return response
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error; see the replica's log")
