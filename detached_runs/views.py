"""HTTP and SSE views: thin, no run logic (that is `detached_runs.runs`).

Every error is JSON ``{"error": "..."}`` with the status its exception class
names (`detached_runs.exceptions`). CSRF is checked here (not left to the project's
middleware) so that a failure is JSON too and the check cannot be forgotten.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    JsonResponse,
    StreamingHttpResponse,
)
from django.middleware.csrf import CsrfViewMiddleware
from django.urls import reverse
from django.utils.cache import add_never_cache_headers
from django.views.decorators.csrf import csrf_exempt

from . import runs
from .backends.base import Subscription
from .conf import get_config
from .events import KEEPALIVE_SSE, encode_sse
from .exceptions import BadPrompt, InvalidInput, RunNotFound, error_status
from .owners import forget_new_owner, request_owner, requester
from .text import loads
from .validation import validate_session_key

logger = logging.getLogger(__name__)

View = Callable[..., Awaitable[HttpResponseBase]]


#: Seconds a ``503`` answer asks the client to wait before it tries again
#: (its ``Retry-After``).
RETRY_AFTER = 1


def error_response(status: int, message: str) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


class _CsrfCheck(CsrfViewMiddleware):
    """Django's own CSRF check, answering a refusal with our JSON 403 and
    Django's reason ("CSRF cookie not set.").

    The one place the app overrides a private method of another package:
    Django hands a refusal's reason only to the project's
    ``CSRF_FAILURE_VIEW``, and calling that view here (through the public
    ``process_view``) would run the project's sync view inside this async one
    (a failure view that reads the database then makes the refusal a 500)
    and lose the reason. Django is pinned below 6.1, and
    ``tests/test_views.py`` checks the reason and that the project's view is
    not called."""

    def _reject(self, request: HttpRequest, reason: str) -> HttpResponse:
        return error_response(
            403,
            f"CSRF check failed: {reason} Send the csrftoken cookie's value in the "
            "X-CSRFToken header.",
        )


_csrf = _CsrfCheck(lambda request: HttpResponse())


def api(*methods: str) -> Callable[[View], Any]:
    """Allow ``methods``, check CSRF on unsafe ones, turn errors into JSON.

    The one error boundary of the HTTP views: whatever a request makes them
    raise, the client gets JSON ``{"error": ...}`` with a status that says
    whose fault it is (`error_status`), never Django's HTML page or a
    traceback. Every answer is marked not to be cached (a cache middleware
    would otherwise serve a run's status long after it changed).
    """

    def decorate(view: View) -> Any:
        @functools.wraps(view)
        async def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            response: HttpResponseBase
            if request.method not in methods:
                response = error_response(405, f"Method {request.method} not allowed.")
                response["Allow"] = ", ".join(methods)
            else:
                try:
                    response = await _checked(view, wrapper, request, *args, **kwargs)
                except Exception as exc:  # noqa: BLE001 - mapped and logged in error_status
                    response = error_response(*error_status(exc, view.__name__))
                    if response.status_code == 503:
                        # Refused before anything was done (a worker shutting
                        # down or draining, Redis or the database unreachable):
                        # clients and proxies may try again, elsewhere too.
                        response["Retry-After"] = str(RETRY_AFTER)
            if not response.streaming:
                add_never_cache_headers(response)
            return response

        return csrf_exempt(wrapper)

    return decorate


async def _checked(
    view: View, wrapper: Any, request: HttpRequest, *args: Any, **kwargs: Any
) -> HttpResponseBase:
    # Reads request.POST for the form field: its parse errors are the client's.
    if request.method not in ("GET", "HEAD", "OPTIONS", "TRACE"):
        rejected = _csrf.process_view(request, wrapper, args, kwargs)
        if rejected is not None:
            return rejected
    return await view(request, *args, **kwargs)


async def _owner(request: HttpRequest, *, create: bool = False) -> str:
    return requester(await request_owner(request, create=create))


def _start_of(request: HttpRequest) -> dict[str, Any]:
    """A start's arguments from its body: ``prompt``, and from JSON
    ``options`` and ``multitask`` (checked by `runs.start`)."""
    if request.content_type == "application/json":
        payload = loads(request.body or b"null")
        if not isinstance(payload, dict) or "prompt" not in payload:
            raise BadPrompt('Send a JSON object: {"prompt": "..."}.')
        return {
            "prompt": payload["prompt"],
            "options": payload.get("options"),
            "multitask": payload.get("multitask"),
        }
    prompt = request.POST.get("prompt")
    if prompt is None:
        raise BadPrompt('Send a "prompt" (JSON or form field).')
    return {"prompt": prompt}


def _stop_all(request: HttpRequest) -> bool:
    """A stop's ``{"all": true}``: a JSON body, whatever its declared type
    (``fetch`` sends a string as ``text/plain``); a form's ``all`` field
    (``true`` or ``false``); no body is ``false``."""
    if request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        value = request.POST.get("all", "false")
        if value not in ("true", "false"):
            raise InvalidInput('"all" must be true or false.')
        return value == "true"
    if not request.body:
        return False
    payload = loads(request.body)
    if not isinstance(payload, dict):
        raise InvalidInput('Send nothing, or a JSON object: {"all": true}.')
    queued = payload.get("all", False)
    if not isinstance(queued, bool):
        # The same message as the form field's and the WebSocket frame's.
        raise InvalidInput('"all" must be true or false.')
    return queued


@api("GET")
async def sessions(request: HttpRequest) -> HttpResponse:
    """The requester's sessions, most recently active first, a page at a time
    (``?limit=``, ``?cursor=``): ``{"sessions": [...], "next": <cursor or null>}``."""
    page = await runs.sessions(
        owner=await _owner(request),
        limit=request.GET.get("limit"),
        cursor=request.GET.get("cursor"),
    )
    return JsonResponse(page.as_json())


@api("GET")
async def session_runs(request: HttpRequest, session_key: str) -> HttpResponse:
    """The session's runs from the newest backwards, a page at a time, each
    page oldest first: ``{"session", "runs": [...], "next": <cursor or null>}``."""
    validate_session_key(session_key)
    page = await runs.session_runs(
        session_key,
        owner=await _owner(request),
        limit=request.GET.get("limit"),
        cursor=request.GET.get("cursor"),
    )
    return JsonResponse(page.as_json())


@api("GET", "POST", "DELETE")
async def session(request: HttpRequest, session_key: str) -> HttpResponse:
    """``POST``: start a run (202). ``GET``: the session's latest run.
    ``DELETE``: delete the session, every run of it (204)."""
    validate_session_key(session_key)
    if request.method == "DELETE":
        await runs.delete(session_key, owner=await _owner(request))
        return HttpResponse(status=204)
    if request.method == "POST":
        owner = await _owner(request, create=True)
        try:
            run = await runs.start(session_key, owner=owner, **_start_of(request))
        except BaseException:
            forget_new_owner(request, owner)
            raise
        return JsonResponse(
            {
                "id": str(run.id),
                "session": session_key,
                "status": run.status,
                "events_url": reverse("detached_runs:events", args=[session_key]),
            },
            status=202,
        )
    latest = await runs.status(session_key, owner=await _owner(request))
    if latest is None:
        raise RunNotFound("No such session.")
    return JsonResponse({"session": session_key, "run": latest.as_json()})


@api("GET")
async def events(request: HttpRequest, session_key: str) -> HttpResponseBase:
    """SSE: replay the current run (after Last-Event-ID / ``?after=``), then follow it."""
    validate_session_key(session_key)
    owner = await _owner(request)
    after = request.headers.get("Last-Event-ID") or request.GET.get("after") or None
    subscription = await runs.subscribe(session_key, after=after, owner=owner)
    if subscription.ended:
        # Already has the terminal event: 204 tells EventSource to stop reconnecting.
        await subscription.aclose()
        return HttpResponse(status=204)
    response = Stream(
        _stream(subscription, float(get_config()["KEEPALIVE"])),
        content_type="text/event-stream",
    )
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    # An empty list of codings: compression middleware (Django's GZipMiddleware
    # and others) leaves a response that has one alone. Compressed, the events
    # would wait in the compressor's buffer instead of reaching the browser.
    response["Content-Encoding"] = ""
    return response


class Stream(StreamingHttpResponse):
    """A streaming response (SSE, the AI SDK's stream) that a shutdown waits
    for: counted open from its making until the server closes it (Django
    calls `close` once its last byte was sent, or its client left), so that
    the server is handed its signal once the streams its runs' ends closed,
    not while it would still cancel them (`RunService.stream_opened`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._closed = runs.get_service().stream_opened()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._closed()


def _stream(subscription: Subscription, keepalive: float) -> AsyncIterator[bytes]:
    stream = _events(subscription, keepalive)
    # If the client is gone before Django starts iterating, the generator is
    # dropped without ever running its finally: release the subscriber then.
    weakref.finalize(stream, subscription.close)
    return stream


async def _events(subscription: Subscription, keepalive: float) -> AsyncIterator[bytes]:
    # Django consumes this inside aclosing() and cancels it when the client
    # disconnects, so the finally releases the subscriber.
    try:
        # An empty first chunk makes the server send the headers now (EventSource
        # opens) instead of with the first event, which may be a token away.
        yield b""
        async for batch in subscription.batches(keepalive or None):
            yield encode_sse(batch) if batch else KEEPALIVE_SSE
    finally:
        await subscription.aclose()


@api("POST")
async def answer(request: HttpRequest, session_key: str) -> HttpResponse:
    """Answer the question the session's run waits for: a JSON body
    ``{"request": "<id>", "value": <any JSON>}`` (whatever its declared
    type: ``fetch`` sends a string as ``text/plain``); ``{"accepted": true}``,
    or 409 if that request is not pending."""
    validate_session_key(session_key)
    await runs.answer(session_key, loads(request.body or b"null"), owner=await _owner(request))
    return JsonResponse({"accepted": True})


@api("POST")
async def stop(request: HttpRequest, session_key: str) -> HttpResponse:
    """Stop the run in flight: ``{"stopped": true|false}``; with a JSON body
    ``{"all": true}``, cancel the session's queued runs too."""
    validate_session_key(session_key)
    queued = _stop_all(request)
    stopped = await runs.stop(session_key, owner=await _owner(request), queued=queued)
    return JsonResponse({"stopped": stopped})
