"""Every error the app raises on purpose, each with the HTTP status it stands
for (``status_code``): the views answer with it, the WebSocket consumer closes
with ``4000 + status_code``. Messages are safe to show a client."""

from __future__ import annotations


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


class BadEventId(InvalidInput):
    """A Last-Event-ID / ``after`` that is not one of ours."""


class RunNotFound(DetachedRunsError):
    """No run for this session, or not one the requester owns (404: never say which)."""

    status_code = 404


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


class BackendUnavailable(DetachedRunsError):
    """The run backend cannot be reached (503)."""

    status_code = 503


class AgentError(DetachedRunsError):
    """Raise it in an agent to end the run as ``error`` with this message shown
    to clients. Any other exception is logged and shown as a generic message."""

    status_code = 500
