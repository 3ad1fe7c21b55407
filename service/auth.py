"""Bearer API keys: client keys for generation, admin keys for the registry.

Keys are compared in constant time against every configured key (no early exit), so the
response time says nothing about how much of a key was right.
"""

from __future__ import annotations

import hmac
from enum import Enum

from service.errors import ApiError


class Role(Enum):
    CLIENT = "client"
    ADMIN = "admin"


def _matches(key: str, keys: list[str]) -> bool:
    found = False
    for candidate in keys:
        found |= hmac.compare_digest(key.encode(), candidate.encode())
    return found


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def authorize(
    authorization: str | None, role: Role, *, client_keys: list[str], admin_keys: list[str]
) -> None:
    """Raise 401 (missing / unknown key) or 403 (client key on an admin route)."""
    if not (admin_keys if role is Role.ADMIN else client_keys):
        return
    key = bearer(authorization)
    if key is None:
        raise ApiError(
            401,
            "unauthorized",
            "missing API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    is_admin = _matches(key, admin_keys)
    is_client = _matches(key, client_keys)
    if role is Role.ADMIN and is_admin:
        return
    if role is Role.CLIENT and (is_client or is_admin):
        return
    if role is Role.ADMIN and is_client:
        raise ApiError(403, "forbidden", "this route needs an admin key; a client key was given")
    raise ApiError(401, "unauthorized", "invalid API key", headers={"WWW-Authenticate": "Bearer"})
