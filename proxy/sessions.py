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


class Role(enum.Enum):
    """What a session-addressed route does on an instance that does not hold the session."""

    REFUSES = "refuses"  # answers 404 "Session not found": the answer itself says "wrong owner"
    ACTS = "acts"  # answers success anyway: only an owner confirmed to hold it may get it
    STARTS = "starts"  # acts, and starts the session there: placed when nobody holds it
    DELETES = "deletes"  # acts, and deletes the session's files: every holder, and no one else


@dataclass(frozen=True, slots=True)
class Target:
    """What a request is for. Frozen: the targets of the list, passthrough and body routes are
    made once and shared by every request."""

    kind: Kind
    session_id: str | None = None
    role: Role = Role.REFUSES


_LIST = Target(Kind.LIST)
_PASSTHROUGH = Target(Kind.PASSTHROUGH)


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
        # Routes named by template ("DELETE /api/sessions/{id}"): the id's span is replaced by
        # "{id}" to look one up, so only requests that name a session pay for it.
        roles: dict[tuple[str, str], Role] = {}
        for route in settings.confirm_routes:
            roles[_route_key(route)] = Role.ACTS
        for route in settings.start_routes:
            roles[_route_key(route)] = Role.STARTS
        roles[_route_key(settings.delete_route)] = Role.DELETES
        self._roles = roles
        # Routes that carry the id in the body have one target each, made once.
        self._body_targets = {
            key: Target(
                Kind.CREATE if key == self._create else Kind.BODY,
                None,
                roles.get((key[0], key[1]), Role.REFUSES),
            )
            for key in self._body_routes
        }

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
        body_target = self._body_targets.get(key)
        if body_target is not None:
            return body_target
        if key == self._list:
            return _LIST
        if path in self._passthrough_exact:
            return _PASSTHROUGH
        match = self._path_re.match(path)
        if match is not None:
            # Each alternative has one group (the rest is escaped): the one that took part
            # closed last.
            group = match.lastindex or 0
            session_id = match.group(group)
            if session_id:
                start, end = match.span(group)
                role = self._roles.get((method, path[:start] + "{id}" + path[end:]), Role.REFUSES)
                return Target(Kind.PATH, self.validate(session_id), role)
        if path.startswith(self._passthrough_prefixes):
            return _PASSTHROUGH
        raise UnknownRoute(f"the proxy has no route for {method} {path[:200]}")

    def role_of(self, method: str, template: str) -> Role:
        """The role of a route given as a template, for tests and the README's table."""
        return self._roles.get((method, template), Role.REFUSES)

    def session_from_body(self, body: bytes, scan_above: int = 64 * 1024) -> str:
        """The body's top-level ``session_id``, validated; with several, the last (as JSON.parse).

        A body of up to ``scan_above`` bytes is parsed whole. A larger one is not built into
        objects: its top level is scanned for the key, strings skipped by finding their closing
        quote and nested values by counting brackets (at most 512 deep), so a big upload costs a
        few finds per string, and a caller may run it in a thread without holding the event loop
        (the C parser would hold the GIL to the end). Its nested values are left for the instance
        to judge. Nesting too deep for either is a malformed body, not a crash.
        """
        if len(body) <= scan_above:
            try:
                document = json.loads(body)
            except RecursionError:
                raise MalformedBody("the body is nested too deeply") from None
            except ValueError:
                raise MalformedBody("the body is not valid JSON") from None
            if not isinstance(document, dict):
                raise MalformedBody("the body is not a JSON object")
            if "session_id" not in document:
                raise MissingSessionId()
            return self.validate(document["session_id"])

        max_depth = 512
        whitespace = re.compile(rb"[ \t\n\r]*").match
        structural = re.compile(rb'["\[\]{}]').search
        scalar = re.compile(
            rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null"
        ).match
        size = len(body)

        def space(i: int) -> int:  # past the whitespace at i
            found = whitespace(body, i)
            assert found is not None  # it matches the empty string
            return found.end()

        def malformed(what: str) -> MalformedBody:
            return MalformedBody(f"the body is not valid JSON ({what})")

        def string_end(i: int) -> int:  # body[i] is the opening quote
            j = i + 1
            while True:
                j = body.find(b'"', j)
                if j < 0:
                    raise malformed("unterminated string")
                k = j
                while body[k - 1] == 0x5C:  # a quote after an odd run of backslashes is escaped
                    k -= 1
                if (j - k) % 2 == 0:
                    return j + 1
                j += 1

        def container_end(i: int) -> int:  # body[i] is '[' or '{'
            depth = 0
            while True:
                found = structural(body, i)
                if found is None:
                    raise malformed("unterminated array or object")
                i = found.start()
                char = body[i]
                if char == 0x22:
                    i = string_end(i)
                    continue
                if char in b"[{":
                    depth += 1
                    if depth > max_depth:
                        raise MalformedBody("the body is nested too deeply")
                else:
                    depth -= 1
                    if depth == 0:
                        return i + 1
                i += 1

        i = space(0)
        if i >= size or body[i] != 0x7B:
            raise MalformedBody("the body is not a JSON object")
        i = space(i + 1)
        value: tuple[int, int] | None = None
        if i < size and body[i] == 0x7D:
            i += 1
        else:
            while True:
                if i >= size or body[i] != 0x22:
                    raise malformed("expected a key")
                end = string_end(i)
                key = body[i:end]
                if b"\\" not in key:
                    is_session_id = key == b'"session_id"'
                else:  # escapes: compare what they spell
                    try:
                        is_session_id = json.loads(key) == "session_id"
                    except ValueError:
                        raise malformed("bad key") from None
                i = space(end)
                if i >= size or body[i] != 0x3A:
                    raise malformed("expected ':'")
                i = space(i + 1)
                char = body[i] if i < size else 0
                if char == 0x22:
                    end = string_end(i)
                elif char in b"[{":
                    end = container_end(i)
                else:
                    number_or_literal = scalar(body, i)
                    if number_or_literal is None:
                        raise malformed("expected a value")
                    end = number_or_literal.end()
                if is_session_id:
                    value = (i, end)
                i = space(end)
                if i < size and body[i] == 0x2C:
                    i = space(i + 1)
                    continue
                if i < size and body[i] == 0x7D:
                    i += 1
                    break
                raise malformed("expected ',' or '}'")
        if space(i) != size:
            raise malformed("data after the object")
        if value is None:
            raise MissingSessionId()
        start, end = value
        if body[start] in b"[{":
            return self.validate([] if body[start] == 0x5B else {})
        try:
            session_id = json.loads(body[start:end])
        except ValueError:
            raise malformed("bad string") from None
        return self.validate(session_id)


def _route_key(route: str) -> tuple[str, str]:
    method, _, template = route.partition(" ")
    return method, template
