"""Connections to Redis: one URL names either a single server or a primary under Sentinel.

- ``redis://[:password@]host:port/db`` (also ``rediss://``, ``unix://``): that server.
- ``redis+sentinel://[:password@]host:port[,host:port...]/<primary name>[/db]``: the Sentinels
  to ask; every connection goes to the primary they name *now*. When the primary fails and a
  replica is promoted, a new connection (or one that meets a dropped socket, or a write refused
  by a demoted primary, READONLY) asks the Sentinels again, so the clients follow a failover
  without a restart. The password is the data nodes'; the Sentinels are reached without one.

``pool(url, ...)`` builds the connection pool of either kind with the same options, blocking
(a caller waits up to ``timeout`` for a free connection, instead of failing) in both cases.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from redis.asyncio import BlockingConnectionPool
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

SENTINEL_SCHEME = "redis+sentinel://"
_USERINFO = re.compile(r"^(?P<scheme>[a-z+]+://)(?P<user>[^:@/]*):(?P<password>[^@/]*)@")


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)


@dataclass(frozen=True)
class SentinelURL:
    sentinels: list[tuple[str, int]]
    service: str  # the primary's name in the Sentinels' configuration
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelURL:
    """``redis+sentinel://[user:password@]h1:26379,h2:26379/<primary name>[/db]``;
    ValueError saying what is wrong."""
    if not url.startswith(SENTINEL_SCHEME):
        raise ValueError(f"a Sentinel URL starts with {SENTINEL_SCHEME}")
    rest = url[len(SENTINEL_SCHEME) :]
    username = password = None
    if "@" in rest.split("/", 1)[0]:
        userinfo, rest = rest.split("@", 1)
        user, _, pw = userinfo.partition(":")
        username, password = unquote(user) or None, unquote(pw) or None
    hosts, _, path = rest.partition("/")
    parts = [p for p in path.split("/") if p]
    if not hosts or not parts or len(parts) > 2:
        raise ValueError(
            "a Sentinel URL is redis+sentinel://host:port[,host:port...]/<primary name>[/db]"
        )
    sentinels = []
    for hp in hosts.split(","):
        host, _, port = hp.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"Sentinel address {hp!r} is not host:port")
        sentinels.append((host, int(port)))
    if len(parts) == 2 and not parts[1].isdigit():
        raise ValueError(f"database {parts[1]!r} in the Sentinel URL is not a number")
    db = int(parts[1]) if len(parts) == 2 else 0
    return SentinelURL(sentinels, parts[0], db, username, password)


def is_sentinel(url: str) -> bool:
    return url.startswith(SENTINEL_SCHEME)


class BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):  # type: ignore[misc]
    """Connections to the Sentinels' current primary, from a bounded pool that waits for a free
    connection (the plain Sentinel pool fails when it is exhausted)."""


def pool(
    url: str,
    *,
    max_connections: int,
    timeout: float,
    connection_class: Callable[[type[Any]], type[Any]] | None = None,
    **connection_kwargs: Any,
) -> BlockingConnectionPool:
    """A blocking connection pool for ``url`` (a server, or a primary under Sentinel).

    ``connection_class`` wraps the URL's own connection class (a function of the base class,
    e.g. one adding a health check), so it applies in both modes.
    """
    if not is_sentinel(url):
        plain = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout, **connection_kwargs
        )
        if connection_class is not None:
            plain.connection_class = connection_class(plain.connection_class)
        return plain
    parsed = parse_sentinel_url(url)
    timeouts = {
        k: connection_kwargs[k]
        for k in ("socket_timeout", "socket_connect_timeout")
        if k in connection_kwargs
    }
    manager = Sentinel(parsed.sentinels, sentinel_kwargs=timeouts)
    sentinel_pool = BlockingSentinelPool(
        parsed.service,
        manager,
        max_connections=max_connections,
        timeout=timeout,
        db=parsed.db,
        username=parsed.username,
        password=parsed.password,
        **connection_kwargs,
    )
    if connection_class is not None:
        sentinel_pool.connection_class = connection_class(sentinel_pool.connection_class)
    return sentinel_pool
