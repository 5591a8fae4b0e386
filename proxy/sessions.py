"""Which session a request is for: from the path or the JSON body, validated before anything else.

The path is read *raw* (undecoded), so ``a%2Fb`` is one bad id rather than two good segments, and
a path with dot segments or encoded separators is refused instead of being normalised into a
different route on the instance.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass

from .config import Settings
from .errors import BadPath, BadSessionId, MalformedBody, MissingSessionId, UnknownRoute


class Kind(enum.Enum):
    PATH = "path"  # session id in the path: route to its owner
    BODY = "body"  # session id in the JSON body: route to its owner
    CREATE = "create"  # a new session: place it on the least-loaded instance
    LIST = "list"  # the fleet-wide list: fan out and merge
    PASSTHROUGH = "passthrough"  # no session: any healthy instance


@dataclass(frozen=True, slots=True)
class Target:
    kind: Kind
    session_id: str | None = None


# Encoded '.', '/' and '\' would let a client smuggle a different route past the id check.
_ENCODED_SEPARATOR = re.compile(r"%(2[eEfF]|5[cC])")


class SessionRouter:
    """Classifies a request by method and raw path; extracts and validates session ids."""

    def __init__(self, settings: Settings) -> None:
        self._id_re = re.compile(settings.session_id_pattern)
        self._body_routes = {tuple(r.split(" ", 1)) for r in settings.body_routes}
        self._create = tuple(settings.create_route.split(" ", 1))
        self._list = tuple(settings.list_route.split(" ", 1))
        self._passthrough_exact = {p for p in settings.passthrough_routes if not p.endswith("*")}
        self._passthrough_prefixes = tuple(
            p[:-1] for p in settings.passthrough_routes if p.endswith("*")
        )
        # One alternation for all patterns: a single regex call per request, whatever their number.
        alternatives = []
        for pattern in settings.path_patterns:
            head, _, tail = pattern.partition("{id}")
            alternatives.append(re.escape(head) + r"([^/]*)" + re.escape(tail))
        self._path_re = re.compile(r"(?:" + "|".join(alternatives) + r")(?:/.*)?\Z", re.DOTALL)

    def validate(self, session_id: object) -> str:
        if not isinstance(session_id, str) or not self._id_re.fullmatch(session_id):
            shown = session_id if isinstance(session_id, str) else type(session_id).__name__
            raise BadSessionId(f"the session id {shown[:64]!r} is not valid")
        return session_id

    def classify(self, method: str, raw_path: str) -> Target:
        if "%" in raw_path and _ENCODED_SEPARATOR.search(raw_path):
            raise BadPath()
        if "/." in raw_path or "\\" in raw_path:
            segments = raw_path.split("/")
            if "." in segments or ".." in segments or "\\" in raw_path:
                raise BadPath()
        path = raw_path[:-1] if len(raw_path) > 1 and raw_path.endswith("/") else raw_path
        key = (method, path)
        if key in self._body_routes:
            return Target(Kind.CREATE if key == self._create else Kind.BODY)
        if key == self._list:
            return Target(Kind.LIST)
        if path in self._passthrough_exact:
            return Target(Kind.PASSTHROUGH)
        match = self._path_re.match(path)
        if match is not None:
            session_id = next(g for g in match.groups() if g is not None)
            if session_id:
                return Target(Kind.PATH, self.validate(session_id))
        if path.startswith(self._passthrough_prefixes):
            return Target(Kind.PASSTHROUGH)
        raise UnknownRoute(f"the proxy has no route for {method} {path[:200]}")

    def session_from_body(self, body: bytes) -> str:
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise MalformedBody("the body is not valid JSON") from None
        if not isinstance(document, dict):
            raise MalformedBody("the body is not a JSON object")
        if "session_id" not in document:
            raise MissingSessionId()
        return self.validate(document["session_id"])
