"""Who owns a session: the logged-in user, or (with ``ALLOW_ANONYMOUS``) the
browser's Django session.

Owners are stored as short strings on the run (``user:<pk>`` or
``anon:<random hex>``). The anonymous id is a random value kept *in* the Django
session, never the session key itself, so the admin shows no credential.

Anonymous owners are cheap: a client without cookies is a new one at every
request. So their runs are also limited per client address
(``MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS``, `address_group`): the owner key of
an anonymous request or socket carries the address it came from
(`AnonymousOwner`).

When a visitor logs in, what their anonymous id owns becomes the user's, as a
shop's cart follows its customer (`adopt_anonymous_runs`, run by Django's
``user_logged_in`` signal; `adopt_scope_runs` after Channels' ``login``): the
runs' rows, and the runs the backend holds, in flight or in their grace period.
Logging out flushes the Django session: the user keeps the sessions, and the
visitor gets a new anonymous id when they start again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import secrets
from collections.abc import Collection
from importlib import import_module
from types import SimpleNamespace
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user
from django.http import HttpRequest
from django.utils.module_loading import import_string

from .conf import get_config
from .db import run_sync
from .exceptions import NotAllowed

logger = logging.getLogger(__name__)

ANON_SESSION_KEY = "_detached_runs_owner"
#: The requester of an anonymous visitor who has no id yet: it owns nothing,
#: and the service never starts a run for it.
ANONYMOUS = "anon:"

#: Seconds a login waits for the backend to adopt the runs it holds.
ADOPT_TIMEOUT = 10.0


class AnonymousOwner(str):
    """An anonymous owner key (``anon:<hex>``) that also carries the client
    address of the request or socket it came with (``address``: as the
    server reported it, None if it reported none), which `RunService.start`
    limits anonymous runs by, and whether its id was made for this request
    (``created``: `forget_new_owner` undoes that). Otherwise it is the plain
    string."""

    address: str | None
    created: bool

    def __new__(
        cls, key: str, address: str | None = None, *, created: bool = False
    ) -> AnonymousOwner:
        owner = super().__new__(cls, key)
        owner.address, owner.created = address, created
        return owner


#: What every reported client address that is not one counts as: a client
#: that makes its own address up (a forged proxy header) shares one limit.
UNPARSED = "unparsed"


def address_group(address: Any) -> str | None:
    """What a client address is counted as for the anonymous runs' limit: an
    IPv4 address as itself, an IPv6 address as its /64 network (one
    subscriber's line gets a whole /64: counted per address, a client would
    have billions), an IPv4 address mapped into IPv6 (a dual-stack socket)
    as the IPv4 address; with a port (``1.2.3.4:5678``, ``[2001:db8::1]:80``)
    or brackets as the address. Anything else that is reported counts as
    `UNPARSED`, one group for all (a made-up address escapes nothing). None
    for no address at all."""
    text = str(address).strip() if address is not None else ""
    if not text:
        return None
    host = text
    if text.startswith("["):  # [v6] or [v6]:port
        host = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # v4:port
        host = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return UNPARSED
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


_warned_no_address = False


def limited_address(owner: Any, address: Any = None) -> str | None:
    """The `address_group` an ``owner``'s start counts against under
    ``MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS``: of ``address`` if given, else of
    the address an `AnonymousOwner` came with. None if the limit does not
    apply: no limit, an owner that is not anonymous (a user, a trusted
    caller), or no usable address (then logged once as a warning, if the
    server reported none)."""
    global _warned_no_address
    if get_config()["MAX_ACTIVE_ANONYMOUS_RUNS_PER_ADDRESS"] is None:
        return None
    if not isinstance(owner, str) or not owner.startswith("anon:"):
        return None
    given = address if address is not None else getattr(owner, "address", None)
    group = address_group(given)
    reported = given is not None or isinstance(owner, AnonymousOwner)
    if group is None and reported and not _warned_no_address:
        _warned_no_address = True
        logger.warning(
            "Anonymous runs are not limited per address: the server reported no usable "
            "client address (%r). Behind a proxy, turn on the server's proxy headers.",
            given,
        )
    return group


def requester(owner: str | None) -> str:
    """What a request or socket with the owner key ``owner`` (`request_owner`,
    `scope_owner`) asks as: that owner, or `ANONYMOUS` for a visitor who has
    no id yet (and owns nothing). `NotAllowed` if it can own nothing because
    ``ALLOW_ANONYMOUS`` is off and nobody is logged in."""
    if owner is not None:
        return owner
    if not get_config()["ALLOW_ANONYMOUS"]:
        raise NotAllowed("Log in first.")
    return ANONYMOUS


def owner_key(owner: Any) -> str:
    """Normalise what callers pass as ``owner=`` (a user, a string or None)."""
    if owner is None:
        return ""
    if isinstance(owner, str):
        return str(owner)  # a plain string, also of an `AnonymousOwner`
    if getattr(owner, "is_authenticated", False):
        return f"user:{owner.pk}"
    raise TypeError("owner must be a user, a string or None")


def may_access(requester: str | None, run_owner: str, session_key: str) -> bool:
    """Whether ``requester`` may see and steer a run owned by ``run_owner``.

    ``None`` is a trusted caller (Python code, the admin) and may do anything.
    ``PERMISSION`` may replace the rule (e.g. to let a team share sessions).
    """
    if requester is None:
        return True
    path = get_config()["PERMISSION"]
    if path:
        check = import_string(path) if isinstance(path, str) else path
        return bool(check(requester, run_owner, session_key))
    return requester == run_owner


async def request_owner(request: HttpRequest, *, create: bool = False) -> str | None:
    """The owner key of an HTTP request, or None if it can own nothing.

    With ``create`` an anonymous visitor gets an owner id stored in their
    session (the session middleware then sets the cookie). The user and the
    session are read on the app's database thread (`detached_runs.db`), which
    keeps its connection, not on the request's own, which would open one.
    """
    return await run_sync(_request_owner, request, create)


def _request_owner(request: HttpRequest, create: bool) -> str | None:
    # AuthenticationMiddleware's lazy user; the session middleware saves a new id.
    owner, created = _owner_of(
        getattr(request, "user", None), getattr(request, "session", None), create
    )
    if owner is not None and owner.startswith("anon:"):
        return AnonymousOwner(owner, request.META.get("REMOTE_ADDR"), created=created)
    return owner


def forget_new_owner(request: HttpRequest, owner: str) -> None:
    """Take back an anonymous id `request_owner` made for this request (its
    start was refused): the session middleware then saves no session, and a
    client refused again and again leaves no session row per request."""
    if getattr(owner, "created", False):
        request.session.pop(ANON_SESSION_KEY, None)


async def scope_owner(scope: dict[str, Any], *, create: bool = False) -> str | None:
    """The same for a Channels scope (behind ``AuthMiddlewareStack``), read on
    the same database thread. ``create`` stores a new anonymous id only in a
    session the browser already has a cookie for (a socket cannot set one)."""
    return await run_sync(_scope_owner, scope, create)


def _scope_owner(scope: dict[str, Any], create: bool) -> str | None:
    session: Any = scope.get("session")
    if create and session is not None and session.session_key is None:
        # No session cookie came with the handshake, and a socket cannot set
        # one: an id stored now would be lost with the socket.
        create = False
    owner, created = _owner_of(scope.get("user"), session, create)
    if created:
        session.save()  # no middleware saves it after a WebSocket handshake
    if owner is not None and owner.startswith("anon:"):
        return AnonymousOwner(owner, scope_address(scope))
    return owner


async def scope_owner_now(scope: dict[str, Any]) -> str | None:
    """The owner of a socket's browser as it is now, not as it was at the
    handshake: its session is read again from the session store. A login or
    logout over HTTP since then cycled or flushed that session, so a socket
    opened before it finds no owner, or another one, here (`RunConsumer`
    closes it: the browser connects again with its new cookie)."""
    return await run_sync(_scope_owner_now, scope)


def _scope_owner_now(scope: dict[str, Any]) -> str | None:
    session: Any = scope.get("session")
    if session is None or session.session_key is None:
        return _scope_owner(scope, False)  # no stored session to read again
    fresh = import_module(settings.SESSION_ENGINE).SessionStore(session_key=session.session_key)
    # AnonymousUser once the session is gone or holds another login.
    user = get_user(SimpleNamespace(session=fresh))  # type: ignore[arg-type]
    owner, _created = _owner_of(user, fresh, False)
    if owner is not None and owner.startswith("anon:"):
        return AnonymousOwner(owner, scope_address(scope))
    return owner


def scope_address(scope: dict[str, Any]) -> str | None:
    """The client address of an ASGI scope (``scope["client"]``), if any."""
    client = scope.get("client")
    return str(client[0]) if client else None


def _owner_of(user: Any, session: Any, create: bool) -> tuple[str | None, bool]:
    """(The owner key of ``user`` or, if anonymous, the id in ``session``; whether
    that id was just created and stored in the session, which is then unsaved).
    Sync: reading the session may query the database."""
    if user is not None and getattr(user, "is_authenticated", False):
        return owner_key(user), False
    if not get_config()["ALLOW_ANONYMOUS"] or session is None:
        return None, False
    anon: str | None = session.get(ANON_SESSION_KEY)
    if anon is not None or not create:
        return anon, False
    anon = f"anon:{secrets.token_hex(16)}"
    session[ANON_SESSION_KEY] = anon
    return anon, True


# -- logging in ----------------------------------------------------------------


def adopt_on_login(sender: Any, request: Any = None, user: Any = None, **kwargs: Any) -> None:
    """Django's ``user_logged_in`` receiver (connected in the app's ``ready``):
    sent by ``login()`` and ``alogin()`` with the request. Channels'
    ``login(scope, user)`` sends it without one: call `adopt_scope_runs`."""
    session = getattr(request, "session", None)
    if session is not None and user is not None:
        adopt_anonymous_runs(session, user)


def adopt_anonymous_runs(session: Any, user: Any) -> int:
    """Make what the anonymous visitor of ``session`` owned ``user``'s, and
    forget their anonymous id; the number of runs (rows) adopted.

    Sync: ``user_logged_in`` calls it in the login's thread, after Django
    cycled the session key (which keeps the session's data, the anonymous id
    too, as long as nobody was logged in). The rows are changed right here
    (in the login's transaction, if any); the runs the backend holds in flight
    or in their grace period are changed on the event loop that holds them:
    a running run goes on streaming to its subscribers, and the user may now
    follow and stop it.
    """
    anon = session.get(ANON_SESSION_KEY) if session is not None else None
    if not anon or not getattr(user, "is_authenticated", False):
        return 0
    new_owner = owner_key(user)
    session_keys, adopted = _adopt_rows(anon, new_owner, user.pk)
    _adopt_in_backend(anon, new_owner, session_keys)
    del session[ANON_SESSION_KEY]
    return adopted


async def adopt_scope_runs(scope: dict[str, Any], user: Any = None) -> int:
    """`adopt_anonymous_runs` for a WebSocket scope: call it after Channels'
    ``await login(scope, user)`` (whose ``user_logged_in`` names no request,
    so no receiver can find the session). ``user`` defaults to
    ``scope["user"]``; the session is saved."""
    from .runs import get_service

    user = user if user is not None else scope.get("user")
    found = await run_sync(_adopt_session, scope.get("session"), user)
    if found is None:
        return 0
    anon, new_owner, session_keys, adopted = found
    await get_service().backend.adopt(anon, new_owner, session_keys)
    return adopted


def _adopt_session(session: Any, user: Any) -> tuple[str, str, list[str], int] | None:
    anon = session.get(ANON_SESSION_KEY) if session is not None else None
    if not anon or not getattr(user, "is_authenticated", False):
        return None
    new_owner = owner_key(user)
    session_keys, adopted = _adopt_rows(anon, new_owner, user.pk)
    del session[ANON_SESSION_KEY]
    session.save()
    return anon, new_owner, session_keys, adopted


def _adopt_rows(owner: str, new_owner: str, user_pk: Any) -> tuple[list[str], int]:
    """Give ``owner``'s rows to the user (sync): (their session keys, how many)."""
    from .models import Run

    rows = Run.objects.filter(owner=owner)
    session_keys = list(rows.order_by().values_list("session_key", flat=True).distinct())
    adopted = rows.update(owner=new_owner, user_id=user_pk) if session_keys else 0
    if adopted:
        logger.info("%d runs of %s adopted by %s on login", adopted, owner, new_owner)
    return session_keys, adopted


def _adopt_in_backend(owner: str, new_owner: str, session_keys: Collection[str]) -> None:
    """`BaseBackend.adopt` from sync code, on the event loop whose backend holds
    the runs: the service's, if it has one running in another thread (a sync
    view under an ASGI server runs in a thread). Otherwise no loop of this
    process holds runs (a WSGI process, a command): a backend of its own
    does what is shared (Redis; the memory backend holds nothing here). A
    failure is logged: the login goes on, and the rows are the user's."""
    from .runs import get_service

    service = get_service()
    backend, loop = service._backend, service._loop
    try:
        here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    try:
        if backend is not None and loop is not None and loop is here:
            # Called from async code on the loop itself: it cannot wait here.
            task = loop.create_task(backend.adopt(owner, new_owner, session_keys))
            _adopting.add(task)
            task.add_done_callback(_adopting.discard)
        elif backend is not None and loop is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(
                backend.adopt(owner, new_owner, session_keys), loop
            )
            future.result(ADOPT_TIMEOUT)
        else:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pool.submit(asyncio.run, _adopt_once(owner, new_owner, session_keys)).result(
                    ADOPT_TIMEOUT
                )
    except Exception:
        logger.exception("Could not adopt the runs in flight of %s for %s", owner, new_owner)


_adopting: set[asyncio.Task[int]] = set()


async def _adopt_once(owner: str, new_owner: str, session_keys: Collection[str]) -> int:
    from .backends import load_backend

    backend = load_backend()
    try:
        return await backend.adopt(owner, new_owner, session_keys)
    finally:
        await backend.shutdown(0)
