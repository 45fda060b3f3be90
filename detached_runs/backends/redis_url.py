"""What ``REDIS_URL`` names: one Redis server, a Redis Cluster, or a master
watched by Redis Sentinel (`parse_redis_url`).

redis-py reads the URL of one server itself (``redis://``, ``rediss://``,
``unix://``); it has no URL for a cluster or for Sentinel, so the Redis
backend takes these two forms, with several addresses each::

    redis+cluster://[user[:password]@]host[:port][,host[:port]...][/]
    redis+sentinel://[user[:password]@]host[:port][,host[:port]...]/<service>[/<db>]

(``rediss+cluster://`` and ``rediss+sentinel://`` for TLS.) A cluster's
addresses are startup nodes, any of its nodes (port 6379 if none is given);
the client finds the others. A Sentinel URL's addresses are the sentinels'
(port 26379 if none is given), ``<service>`` the name of the master they
watch, ``<db>`` its database (0 if none is given). The user and password,
percent-encoded, are the Redis servers' own (for the sentinels', if they
want one, ``connection_kwargs={"sentinel_kwargs": {"password": ...}}``).

No Redis import here: ``manage.py check`` uses it (``detached_runs.E014``)
whether or not redis-py is installed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote, urlsplit

#: Schemes redis-py reads itself (one server).
SERVER_SCHEMES = ("redis", "rediss", "unix")
#: The schemes of `parse_redis_url`'s own forms, and what each names.
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
#: Default ports of a cluster's nodes and of sentinels.
REDIS_PORT, SENTINEL_PORT = 6379, 26379

# A host name or IPv4 address (letters, digits, dots, hyphens, underscores),
# or an IPv6 address in brackets; then a port, if any.
_ADDRESS = re.compile(
    r"(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>[0-9]{1,5}))?", re.ASCII
)
_SERVICE = re.compile(r"[^/\s]+")


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """The Redis a URL names.

    ``kind`` is ``"server"`` for a URL redis-py reads itself (``url`` is then
    all there is to know), ``"cluster"`` or ``"sentinel"``. For these two:
    ``nodes``, the ``(host, port)`` addresses given (startup nodes, or
    sentinels), an IPv6 host without its brackets; ``service`` and ``db``, the
    master a Sentinel URL names (``""`` and 0 for a cluster); ``username`` and
    ``password``, decoded, or None; ``ssl``, whether the scheme is a
    ``rediss+`` one. Its ``repr`` leaves out ``url`` and ``password``, which
    may hold a secret (a log line or a traceback's locals may show it).
    """

    kind: Literal["server", "cluster", "sentinel"]
    url: str = field(repr=False)
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl: bool = False


def parse_redis_url(url: object) -> RedisTarget:
    """What ``url`` names (`RedisTarget`). Raises `ValueError`, with a message
    that says what is wrong and the form expected, if it is not a string, its
    scheme is none of `SERVER_SCHEMES`, `CLUSTER_SCHEMES` and
    `SENTINEL_SCHEMES`, or a cluster or Sentinel URL is malformed, or a
    ``redis://`` or ``rediss://`` URL's port or database is. The rest of a
    one-server URL (its options) is redis-py's to read (and refuse)."""
    if not isinstance(url, str):
        raise ValueError(f"REDIS_URL must be a string, not {type(url).__name__}")
    scheme, separator, rest = url.partition("://")
    scheme = scheme.lower()
    if not separator or scheme not in (*SERVER_SCHEMES, *CLUSTER_SCHEMES, *SENTINEL_SCHEMES):
        raise ValueError(
            f"REDIS_URL {shown_url(url)} does not begin with a known scheme: "
            "redis://, rediss:// or unix:// (one server), redis+cluster:// or "
            "rediss+cluster:// (a cluster), redis+sentinel:// or rediss+sentinel:// (Sentinel)"
        )
    if scheme in SERVER_SCHEMES:
        if scheme != "unix":
            _check_server_url(url)
        return RedisTarget("server", url)
    cluster = scheme in CLUSTER_SCHEMES
    form = (
        f"{scheme}://[user[:password]@]host[:port][,host[:port]...][/]"
        if cluster
        else f"{scheme}://[user[:password]@]host[:port][,host[:port]...]/<service>[/<db>]"
    )

    def malformed(why: str) -> ValueError:
        return ValueError(f"REDIS_URL {shown_url(url)} is malformed: {why}. Expected {form}")

    if "?" in rest or "#" in rest:
        raise malformed(
            "it has a query or fragment (redis-py's options go in "
            "BACKEND_OPTIONS['connection_kwargs'])"
        )
    location, _, path = rest.partition("/")
    if "@" in path:
        # A user or password with a '/' that is not percent-encoded: the rest
        # of it would be read (and quoted in a message) as the path.
        raise malformed(
            "it has an '@' after a '/': percent-encode a '/' of the user or "
            "password (%2F), or an '@' of the master's name (%40)"
        )
    userinfo, at, hosts = location.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes = tuple(
        _address(part, REDIS_PORT if cluster else SENTINEL_PORT, malformed)
        for part in hosts.split(",")
    )
    if cluster:
        if path not in ("", "0"):
            raise malformed(f"a cluster has one database, 0, not {path!r}")
        return RedisTarget(
            "cluster", url, nodes, username=username, password=password, ssl="rediss" in scheme
        )
    service, _, db = path.partition("/")
    service = unquote(service)
    if not _SERVICE.fullmatch(service):
        raise malformed("the name of the master (the service the sentinels watch) is missing")
    if db and not (db.isascii() and db.isdigit()):
        raise malformed(f"the database must be a whole number, not {db!r}")
    return RedisTarget(
        "sentinel",
        url,
        nodes,
        service=service,
        db=int(db or 0),
        username=username,
        password=password,
        ssl="rediss" in scheme,
    )


def _address(
    text: str, default_port: int, malformed: Callable[[str], ValueError]
) -> tuple[str, int]:
    """``(host, port)`` of one ``host[:port]`` of a URL's list (an IPv6 host
    in brackets, returned without them)."""
    match = _ADDRESS.fullmatch(text)
    if match is None:
        raise malformed(f"{text!r} is not a host[:port]" if text else "an address is empty")
    host, port = match["host"], match["port"]
    if port is not None and not 1 <= int(port) <= 65535:
        raise malformed(f"the port of {text!r} is not a number from 1 to 65535")
    return host.strip("[]"), int(port) if port is not None else default_port


def _check_server_url(url: str) -> None:
    """Refuse a ``redis://`` or ``rediss://`` URL whose port or database
    redis-py would refuse later, or read wrongly (``/abc`` it takes for
    database 0): `ValueError`. Its options (the query) are redis-py's."""
    form = "redis://[user[:password]@]host[:port][/<db>][?option=value...]"
    try:
        port = urlsplit(url).port
    except ValueError:
        port = -1
    if port is not None and not 0 < port < 65536:
        raise ValueError(
            f"REDIS_URL {shown_url(url)} is malformed: its port is not a number from 1 to "
            f"65535. Expected {form}"
        )
    path = urlsplit(url).path
    if path not in ("", "/") and not re.fullmatch(r"/[0-9]{1,5}/?", path):
        raise ValueError(
            f"REDIS_URL {shown_url(url)} is malformed: its database ({path!r}) is not a "
            f"number. Expected {form}"
        )


def shown_url(url: str) -> str:
    """``url`` for a message, its password (if any) masked: all that comes
    between the first colon of the user part and the URL's last ``@``,
    whether or not the URL is well formed (a password with a '/', '?' or
    '#' not percent-encoded, a URL with no scheme)."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    userinfo, at, hosts = rest.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.partition(":")[0] + ":***"
    return repr(f"{scheme}{separator}{userinfo}{at}{hosts}")
