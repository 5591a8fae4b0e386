"""The errors the proxy answers with itself, each with its HTTP status and ``X-Proxy-Error`` code.

Transport failures are mapped into this hierarchy at the boundary (``forward.py``), so everything
above it reasons about *what happened* (never left, refused, ambiguous) instead of library types.
"""

from __future__ import annotations


class ProxyError(Exception):
    status: int = 502
    code: str = "proxy-error"
    message: str = "the proxy could not complete the request"
    # The request reached an instance, which may have carried it out (no answer says whether).
    maybe_sent: bool = False

    def __init__(self, detail: str | None = None, *, retry_after: int | None = None) -> None:
        self.detail = detail or self.message
        self.retry_after = retry_after
        self.attempts = 0  # tries made before giving up; set by the attempt loop
        self.instance: str | None = None  # the instance whose failure this is, when there is one
        super().__init__(self.detail)


# --- the client's request is wrong ---------------------------------------------------------------


class BadRequest(ProxyError):
    """Refused by the HTTP parser (smuggling shapes, HTTP/0.9, bad bytes): answered, then closed."""

    status, code = 400, "bad-request"
    message = "the request is not valid HTTP/1.1"


class BadSessionId(ProxyError):
    status, code = 400, "bad-session-id"
    message = "the session id is not valid"


class BadPath(ProxyError):
    status, code = 400, "bad-path"
    message = "the path contains dot segments or encoded separators"


class MalformedBody(ProxyError):
    status, code = 400, "malformed-body"
    message = "the body is not a JSON object"


class MissingSessionId(ProxyError):
    status, code = 400, "missing-session-id"
    message = "the body has no session_id"


class UnknownRoute(ProxyError):
    status, code = 404, "unknown-route"
    message = "the proxy has no route for this path"


class BodyTooLarge(ProxyError):
    status, code = 413, "body-too-large"
    message = "the request body is larger than the proxy accepts"


class HeadersTooLarge(ProxyError):
    status, code = 431, "headers-too-large"
    message = "the request headers are larger than the proxy accepts"


class ClientTooSlow(ProxyError):
    status, code = 408, "client-timeout"
    message = "the request body did not arrive in time"


class Overloaded(ProxyError):
    status, code = 503, "overloaded"
    message = "too many requests in flight"


class RateLimited(ProxyError):
    """The session's send budget (SEND_RATE) is spent and its queue is full or too long."""

    status, code = 429, "rate-limited"
    message = "too many sends for this session; retry after the Retry-After seconds"


class IdempotencyMismatch(ProxyError):
    """The Idempotency-Key was used before for a different request."""

    status, code = 422, "idempotency-key-mismatch"
    message = "this Idempotency-Key was used for a different request (another body or route)"


# --- the fleet cannot serve it -------------------------------------------------------------------


class SessionNotFound(ProxyError):
    status, code = 404, "session-not-found"
    # The instance's own words, so an application matching on them keeps working.
    message = "Session not found"


class SessionRestoring(ProxyError):
    """Held while the session comes back, past a bound: come back later (with Retry-After)."""

    status, code = 503, "session-restoring"
    message = "the session is not running on any instance yet; it is expected back"


class NoHealthyInstance(ProxyError):
    status, code = 503, "no-healthy-instance"
    message = "no healthy instance is available"


class UpstreamUnreachable(ProxyError):
    """The request never reached an instance (refused, connect timeout): safe to replay."""

    status, code = 502, "upstream-unreachable"
    message = "the instance could not be reached"


class OwnerGone(UpstreamUnreachable):
    """The owner cannot be reached and no other instance holds the session: a start may place it."""


class OwnerUnconfirmed(ProxyError):
    """The status probe before an acting route failed: the request itself was never sent."""

    status, code = 502, "owner-unconfirmed"
    message = "the instance did not answer whether it holds the session; nothing was sent"


class UpstreamAmbiguous(ProxyError):
    """The request was sent, then the connection died: the instance may have acted on it."""

    status, code = 502, "upstream-ambiguous"
    maybe_sent = True
    message = (
        "the instance received the request and closed the connection without answering; "
        "it may or may not have been carried out"
    )


class UpstreamTimeout(ProxyError):
    """The request was sent and no answer came in time: as ambiguous as a reset."""

    status, code = 504, "upstream-timeout"
    maybe_sent = True
    message = (
        "the instance did not answer in time; the request may or may not have been carried out"
    )


class UpstreamBadResponse(ProxyError):
    status, code = 502, "upstream-bad-response"
    maybe_sent = True  # it answered, with garbage: it may have acted first
    message = "the instance answered with something that is not valid HTTP"


class ReplayExhausted(ProxyError):
    status, code = 502, "replay-exhausted"
    message = "the request was retried as often as allowed without success"


# --- the proxy itself ----------------------------------------------------------------------------


class InternalError(ProxyError):
    """A failure of the proxy itself: still answered in the proxy's shape."""

    status, code = 500, "internal-error"
    message = "the proxy failed while handling the request"


def all_codes() -> set[str]:
    """Every ``X-Proxy-Error`` code the proxy can answer with."""
    codes: set[str] = set()
    pending: list[type[ProxyError]] = [ProxyError]
    while pending:
        kind = pending.pop()
        codes.add(kind.code)
        pending.extend(kind.__subclasses__())
    return codes
