"""Who owns a session: the logged-in user, or (with ``ALLOW_ANONYMOUS``) the
browser's Django session.

Owners are stored as short strings on the run (``user:<pk>`` or
``anon:<random hex>``). The anonymous id is a random value kept *in* the Django
session, never the session key itself, so the admin shows no credential.
"""

from __future__ import annotations

import secrets
from typing import Any

from django.http import HttpRequest
from django.utils.module_loading import import_string

from .conf import get_config
from .db import run_sync

ANON_SESSION_KEY = "_detached_runs_owner"
#: The requester of an anonymous visitor who has no id yet: it owns nothing,
#: and the service never starts a run for it.
ANONYMOUS = "anon:"


def owner_key(owner: Any) -> str:
    """Normalise what callers pass as ``owner=`` (a user, a string or None)."""
    if owner is None:
        return ""
    if isinstance(owner, str):
        return owner
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
    owner, _created = _owner_of(
        getattr(request, "user", None), getattr(request, "session", None), create
    )
    return owner


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
    return owner


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
