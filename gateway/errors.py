"""The GatewayError tree: every failure the gateway reports has a status, a stable code and a message.

Both planes render from these attributes, so a code means the same thing on the API and at the edge.
Library exceptions are translated at the boundary with ``raise ... from``.
"""

from __future__ import annotations


class GatewayError(Exception):
    status: int = 500
    code: str = "internal_error"
    message: str = "internal error"

    def __init__(self, message: str | None = None, *, code: str | None = None) -> None:
        self.message = message or type(self).message
        if code:
            self.code = code
        super().__init__(self.message)


class BadRequest(GatewayError):
    status, code, message = 400, "bad_request", "bad request"


class Unauthorized(GatewayError):
    status, code, message = 401, "unauthorized", "Invalid or missing API key"


class NotFound(GatewayError):
    status, code, message = 404, "not_found", "not found"


class Conflict(GatewayError):
    status, code, message = 409, "conflict", "conflict"


class PayloadTooLarge(GatewayError):
    status, code, message = 413, "payload_too_large", "request body too large"


class UnsupportedMediaType(GatewayError):
    status, code, message = 415, "unsupported_media_type", "Content-Type must be application/json"


class Unsupported(GatewayError):
    """A valid request for a capability this deployment does not have."""

    status, code, message = 422, "unsupported", "not supported"


class ListenFailed(GatewayError):
    """A listener could not be opened (the address is in use or not ours): the setting is named."""

    status, code, message = 500, "listen_failed", "cannot listen"

    def __init__(self, setting: str, address: str, exc: OSError) -> None:
        # uvloop's text repeats the address before the reason; the reason is the part after the last colon.
        reason = (exc.strerror or str(exc)).rpartition(": ")[2]
        super().__init__(f"cannot listen on {address} ({setting}): {reason}")


class VmNotRunning(GatewayError):
    status, code, message = 410, "vm_not_running", "VM is not running"


class DriverError(GatewayError):
    """The VM driver failed to create, inspect or destroy a VM."""

    status, code, message = 502, "driver_error", "VM driver failed"


class TooManyRequests(GatewayError):
    """A per-resource cap is reached; ``retry_after`` (seconds) goes out as Retry-After."""

    status, code, message = 429, "too_many_requests", "too many requests"

    def __init__(self, message: str | None = None, *, code: str | None = None, retry_after: int = 1) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class CapacityExhausted(GatewayError):
    status, code, message = 503, "capacity_exhausted", "no free VM slots"


class StoreUnavailable(GatewayError):
    status, code, message = 503, "store_unavailable", "state store unavailable"


class Timeout(GatewayError):
    status, code, message = 504, "timeout", "timed out"


# Every answer the edge makes itself, by the code it carries in X-Gateway-Error: its status and default
# message. One table, so that a code means one thing wherever the edge answers it (and the README's and
# the access log's codes are these).
EDGE_ERRORS: dict[str, tuple[int, str]] = {
    # The request itself
    "bad_request": (400, "malformed request"),
    "bad_host": (400, "missing or malformed Host header"),
    "invalid_target": (400, "invalid request target"),
    "method_not_allowed": (405, "CONNECT is not supported"),
    "body_too_large": (413, "the request body is larger than this route allows"),
    "uri_too_long": (414, "the request target is too long"),
    "misdirected_request": (
        421, "this connection was opened for another host name; open a new one for this host"
    ),
    "headers_too_large": (431, "request headers too large"),
    # Routing
    "no_route": (404, "no such app: the VM does not exist, has ended, or this port is not exposed"),
    "vm_suspended": (
        409, "the VM is suspended: resume it (POST /v1/vms/{id}/resume), or turn on its auto_resume"
    ),
    "vm_wake_timeout": (503, "the VM is resuming and was not back in time: try again"),
    "store_unavailable": (503, "routing unavailable"),
    # Signed URLs (?signature=...&expires=...): authentic but past its time, or not signed by this VM's
    # current URL key (tampered, rotated, for another app or a replaced share).
    "signature_expired": (403, "this signed URL has expired: ask for a new one"),
    "signature_invalid": (
        403, "this signed URL's signature is not valid (altered, revoked by a key rotation, or another app's)"
    ),
    # The edge itself
    "too_many_connections": (503, "too many open connections; try again later"),
    "too_many_vm_exchanges": (429, "this app has too many requests in flight; try again shortly"),
    "too_many_requests": (429, "too many API requests with this key; slow down (see Retry-After)"),
    "shutting_down": (503, "this gateway process is shutting down; try again"),
    # The app in the VM
    "upstream_refused": (502, "nothing is listening on this port in the VM"),
    "upstream_closed": (502, "the app closed the connection without answering"),
    "upstream_bad_upgrade": (502, "the app's upgrade response is not a valid handshake"),
    "upstream_bad_response": (502, "the app's answer is not HTTP/1.1"),
    "upstream_head_too_large": (502, "the app's response head is too large"),
    "upstream_connect_timeout": (504, "the app did not accept a connection in time"),
    "upstream_timeout": (504, "the app did not answer in time"),
}  # fmt: skip


def edge_error(code: str) -> tuple[int, str]:
    """(status, default message) of an edge-made answer; KeyError for a code not in the table."""
    return EDGE_ERRORS[code]
