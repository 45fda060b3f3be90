"""Every error the app raises on purpose, each with the HTTP status it stands
for (``status_code``): the views answer with it, the WebSocket consumer closes
with ``4000 + status_code``. Messages are safe to show a client."""

from __future__ import annotations

import logging

from django.core.exceptions import (
    BadRequest,
    ImproperlyConfigured,
    RequestDataTooBig,
    SuspiciousOperation,
    TooManyFieldsSent,
    TooManyFilesSent,
)
from django.http import RawPostDataException
from django.http.multipartparser import MultiPartParserError
from django.http.request import UnreadablePostError

from .db import data_errors, database_errors

logger = logging.getLogger(__name__)


class DetachedRunsError(Exception):
    """Base class. ``str(exc)`` is a message a client may see."""

    status_code = 400


class InvalidInput(DetachedRunsError):
    """The request is malformed: nothing was changed (400)."""

    status_code = 400


class BadSessionKey(InvalidInput):
    pass


class BadPrompt(InvalidInput):
    pass


class BadOptions(InvalidInput):
    """Options that are not a JSON object, too large, or refused by ``VALIDATE_OPTIONS``."""


class BadMultitask(InvalidInput):
    """A ``multitask`` that is not one of the policies."""


class BadInput(InvalidInput):
    """An answer to an agent's question (``POST <key>/input/``, the WebSocket
    ``input`` frame) that is malformed: not ``{"request": "<id>", "value":
    <JSON>}``, or a value over ``MAX_INPUT_BYTES`` (400)."""


class BadEventId(InvalidInput):
    """A Last-Event-ID / ``after`` that is not one of ours."""


class BadCursor(InvalidInput):
    """A ``cursor`` of a list (sessions, runs) that is not one this server gave
    for that list: garbage, changed, or from another list."""


class BadLimit(InvalidInput):
    """A page size (``limit``) that is not a whole number in the allowed range."""


class RunNotFound(DetachedRunsError):
    """No run for this session, or not one the requester owns (404: never say which)."""

    status_code = 404


class SessionBusy(DetachedRunsError):
    """``multitask="reject"`` while the session has a run in flight or queued:
    nothing was changed (409)."""

    status_code = 409


class InputNotPending(DetachedRunsError):
    """An answer to a request the session's run is not waiting for: answered
    already, timed out, or another run's (409). Nothing was changed."""

    status_code = 409


class NotAllowed(DetachedRunsError):
    """No owner can be established for the requester (403)."""

    status_code = 403


class LimitExceeded(DetachedRunsError):
    """A configured capacity limit was hit (429)."""

    status_code = 429


class TooManyRuns(LimitExceeded):
    pass


class TooManySubscribers(LimitExceeded):
    pass


class QueueFull(LimitExceeded):
    """``multitask="enqueue"`` with ``MAX_QUEUED_PER_SESSION`` runs queued already."""


class BackendUnavailable(DetachedRunsError):
    """The run backend cannot be reached (503)."""

    status_code = 503


class AgentError(DetachedRunsError):
    """Raise it in an agent to end the run as ``error`` with this message shown
    to clients. Any other exception is logged and shown as a generic message."""

    status_code = 500


class InputTimeout(AgentError):
    """Raised in an agent by ``await ctx.ask(...)`` when no answer came within
    its timeout (``INPUT_TIMEOUT`` by default). The agent may catch it and go
    on (the question is no longer pending: an ``input_timeout`` event says so);
    uncaught, the run ends as ``error`` with this message."""

    def __init__(self, request: str, timeout: float) -> None:
        super().__init__(f"No answer came within {timeout:g} seconds.")
        #: The id of the question that timed out.
        self.request = request
        #: Its timeout, in seconds.
        self.timeout = timeout


def error_status(exc: BaseException, where: str) -> tuple[int, str]:
    """The status and client-safe message for an exception raised while
    handling a request (and the WebSocket consumer's frames).

    * the app's own errors (`detached_runs.exceptions`): their status (4xx,
      503; a `BackendUnavailable` logged with its cause);
    * a request Django cannot parse (too large, too many fields, a broken
      multipart body, a body the client stopped sending, a form sent to a
      view that reads JSON): 400;
    * a database that refused the data itself (`DataError`): 400; any other
      database error (unreachable, restarting, a dropped connection): 503;
    * anything else (a bug, a misconfiguration): 500, logged with its
      traceback, which never reaches the client.
    """
    if isinstance(exc, BackendUnavailable) and exc.__cause__ is not None:
        # The client is told to try again; the operator needs the cause
        # (connection refused, no master of that name, a timeout...).
        cause = exc.__cause__
        logger.warning("%s (in %s; cause: %s: %s)", exc, where, type(cause).__name__, cause)
    if isinstance(exc, DetachedRunsError):
        return exc.status_code, str(exc)
    if isinstance(exc, RequestDataTooBig):
        return 400, "The request body is too large."
    if isinstance(exc, TooManyFieldsSent | TooManyFilesSent):
        return 400, "The request has too many fields."
    if isinstance(exc, SuspiciousOperation | BadRequest | MultiPartParserError):
        logger.warning("Malformed request in %s: %s", where, exc)
        return 400, "The request is malformed."
    if isinstance(exc, UnreadablePostError):
        return 400, "The request body could not be read."
    if isinstance(exc, RawPostDataException):
        # A form's body, parsed (by the CSRF check) before a view that wants JSON read it.
        return 400, "Send a JSON body (Content-Type: application/json), not a form."
    if isinstance(exc, data_errors()):
        logger.warning("The database refused data in %s", where, exc_info=True)
        return 400, "The database cannot store this input."
    if isinstance(exc, database_errors()):
        # Unreachable, restarting, a connection closed under Django's back
        # (SQLite calls that a ProgrammingError): worth trying again.
        logger.exception("Database error in %s", where)
        return 503, "The database is unavailable; try again shortly."
    if isinstance(exc, ImproperlyConfigured):
        logger.exception("detached_runs is misconfigured")
        return 500, "The server is misconfigured."
    logger.exception("Unexpected error in %s", where)
    return 500, "Internal error."
