"""Bearer API keys: client keys for generation, admin keys for the registry, each optionally
scoped to task-name patterns.

A key entry (``RANKONE_CLIENT_KEYS`` / ``RANKONE_ADMIN_KEYS``, comma-separated) is ``KEY``
(unscoped: every task, today's behaviour) or ``KEY:PATTERN|PATTERN...`` (scoped: only task
names matching one of the glob patterns, e.g. ``sk-a:team-a-*|shared-demo``). A scoped client
key may use and list only its tasks; a scoped admin key may write, read and list only its tasks
(and write only shared prompts whose id matches), and like any admin key it may also use them.

The syntax cannot swallow part of a secret: a key never contains ``:`` or ``,``, so an entry
with more than one ``:`` is refused at start (``sk:live:abc`` is not read as the key ``sk``),
and every scoped entry is logged at start by position with its patterns, so ``abc:def`` never
becomes a scoped key silently. Configuration errors name an entry by its position ("entry 2"),
never by any part of its text.

A key in both lists: each list governs its own routes. On client routes the key's client
entry applies (its client scope); on admin routes its admin entry. A key only in the admin
list is valid on client routes too, with its admin scope.

Keys are compared in constant time against every configured key (no early exit), so the
response time says nothing about how much of a key was right.

Routes get the caller as a ``Caller`` (``service.deps.ClientCaller`` / ``AdminCaller``) and
call ``caller.check(name)`` for every task name they touch, ``caller.allows`` to filter lists.
"""

from __future__ import annotations

import fnmatch
import functools
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from service.errors import ApiError

PATTERN = re.compile(r"^[a-z0-9._*?\[\]-]{1,64}$")


class Role(Enum):
    CLIENT = "client"
    ADMIN = "admin"


@dataclass(frozen=True)
class KeyEntry:
    """One configured key; ``patterns`` None means unscoped."""

    key: str
    patterns: tuple[str, ...] | None = None


def parse_entry(entry: str) -> KeyEntry:
    """``KEY`` or ``KEY:PATTERN|PATTERN``; ValueError naming the problem (never the key, nor
    any other part of the entry: the text after a ``:`` may be a secret's tail)."""
    if entry.count(":") > 1:
        raise ValueError(
            "has more than one ':'; an entry is KEY or KEY:PATTERN|PATTERN and a key cannot "
            "contain ':' (make a new key without it)"
        )
    key, sep, scope = entry.strip().partition(":")
    key = key.strip()
    if not key:
        raise ValueError("has an empty key (entries: KEY or KEY:PATTERN|PATTERN)")
    if not sep:
        return KeyEntry(key)
    patterns = tuple(p.strip() for p in scope.split("|") if p.strip())
    if not patterns:
        raise ValueError("is scoped but has no pattern after ':' (KEY:team-a-*)")
    for number, p in enumerate(patterns, start=1):
        if not PATTERN.fullmatch(p):
            raise ValueError(
                f"has a bad task-name pattern (pattern {number} after ':'): use lowercase "
                "letters, digits, . _ - and the globs * ? [...], at most 64 characters"
            )
    return KeyEntry(key, patterns)


def check_entries(entries: Sequence[str]) -> None:
    """Every entry parses; ValueError naming the first bad one by position (1-based)."""
    for number, entry in enumerate(entries, start=1):
        try:
            parse_entry(entry)
        except ValueError as e:
            raise ValueError(f"entry {number} {e}") from None


def describe_scopes(entries: Sequence[str]) -> list[str]:
    """One line per scoped entry, by position, for the start log (never the key)."""
    return [
        f"entry {number} is scoped to {'|'.join(parsed.patterns)}"
        for number, parsed in enumerate(parse_entries(tuple(entries)), start=1)
        if parsed.patterns is not None
    ]


@functools.lru_cache(maxsize=8)
def parse_entries(entries: tuple[str, ...]) -> tuple[KeyEntry, ...]:
    return tuple(parse_entry(e) for e in entries)


@dataclass(frozen=True)
class Caller:
    """Who is calling: the role of the key given (``None``: no key needed, open) and its scope.

    ``check(name)`` is the one scope check every route applies to a task name it is about to
    use, read or write (403 outside the scope); ``allows(name)`` filters listings.
    """

    role: Role | None = None
    patterns: tuple[str, ...] | None = None

    @property
    def scoped(self) -> bool:
        return self.patterns is not None

    def allows(self, name: str) -> bool:
        if self.patterns is None:
            return True
        return any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def check(self, name: str, what: str = "task") -> str:
        """``name`` if this key may touch it; else ApiError 403 (whether or not it exists)."""
        if not self.allows(name):
            scope = "|".join(self.patterns or ())
            raise ApiError(
                403,
                "forbidden",
                f"this API key is scoped to {what} names matching {scope!r}; {name!r} is outside",
            )
        return name


def _find(key: str, entries: Sequence[KeyEntry]) -> KeyEntry | None:
    found: KeyEntry | None = None
    for entry in entries:  # every entry is compared: no early exit
        if hmac.compare_digest(key.encode(), entry.key.encode()) and found is None:
            found = entry
    return found


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


def authenticate(
    key: str | None,
    role: Role,
    *,
    client_keys: Sequence[KeyEntry],
    admin_keys: Sequence[KeyEntry],
) -> Caller:
    """The caller of a ``role`` route presenting ``key``: 401 (missing / unknown key) or 403
    (client key on an admin route). Admin keys are valid on client routes too; a key in both
    lists is a client there (its client scope), an admin on admin routes."""
    if not (admin_keys if role is Role.ADMIN else client_keys):
        return Caller()
    if key is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    admin = _find(key, admin_keys)
    client = _find(key, client_keys)
    if client is not None and role is Role.CLIENT:  # the client entry governs client routes
        return Caller(Role.CLIENT, client.patterns)
    if admin is not None:
        return Caller(Role.ADMIN, admin.patterns)
    if client is not None:
        raise ApiError(403, "forbidden", "this route needs an admin key; a client key was given")
    raise _unauthorized("invalid API key")


def authorize(
    authorization: str | None, role: Role, *, client_keys: list[str], admin_keys: list[str]
) -> Caller:
    """``authenticate`` from an ``Authorization`` header value and raw key entries."""
    return authenticate(
        bearer(authorization),
        role,
        client_keys=parse_entries(tuple(client_keys)),
        admin_keys=parse_entries(tuple(admin_keys)),
    )
