"""The WebSocket consumer: follow, start and stop a session's runs over one socket.

Same service, same semantics as the SSE view (replay then live, no gap, no
duplicate, compact replay, ownership); no run logic here. Protocol:

* connect to ``.../<session_key>/`` (optionally ``?after=<event id>``): the
  socket follows the session's current run and sends each event as a text
  frame ``{"id", "event", "data"}``. An unknown session, or one the requester
  does not own, is closed with code 4404 (other refusals: 4400 bad key, 4403
  not logged in, 4429 over a limit, 4503 unavailable).
* client frames: ``{"type": "start", "prompt": "..."}`` starts a run; the
  socket sends the rest of the run it was following (stopped by the start)
  up to its ``done``, then follows the new run from its ``start`` event.
  ``{"type": "stop"}`` stops the run in flight (its ``done`` event
  follows); ``{"type": "resume", "after": "<id>"}`` re-follows the current
  run after that id. ``{"type": "input", "request": "<id>", "value": ...}``
  answers the question the run waits for (``ctx.ask``): its
  ``input_received`` event follows, or an error frame (the request is not
  pending, as HTTP's 409).
* a bad frame is answered with ``{"event": "error", "data": {"error": "...",
  "status": 400}}``, ``status`` being what an HTTP request would get (409 for
  a ``reject`` with a run in flight, 429 over a limit, 503...); the socket
  stays open and no run changes.
* after a run's ``done`` the socket stays open for the next ``start``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import parse_qs

from channels.generic.websocket import AsyncWebsocketConsumer

from . import runs
from .backends.base import Subscription
from .conf import get_config
from .events import DONE
from .exceptions import DetachedRunsError, InvalidInput, NotAllowed, RunNotFound, error_status
from .models import Run
from .owners import ANONYMOUS, requester, scope_address, scope_owner, scope_owner_now
from .text import loads
from .validation import validate_session_key

logger = logging.getLogger(__name__)

#: Close code for errors that are not the client's (RFC 6455 "internal error").
CLOSE_INTERNAL = 1011


def _disconnected() -> tuple[type[BaseException], ...]:
    """What a server raises from ``send`` on a socket the client has closed."""
    kinds: list[type[BaseException]] = [ConnectionError]
    try:  # daphne (autobahn)
        from autobahn.exception import Disconnected

        kinds.append(Disconnected)
    except ImportError:
        pass
    try:  # uvicorn
        from uvicorn.protocols.utils import ClientDisconnected

        kinds.append(ClientDisconnected)
    except ImportError:
        pass
    return tuple(kinds)


_DISCONNECTED = _disconnected()


class RunConsumer(AsyncWebsocketConsumer):
    session_key: str
    owner: str

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pump: asyncio.Task[None] | None = None

    # -- connection --------------------------------------------------------

    async def connect(self) -> None:
        # Accept first: a close code only reaches a browser after the handshake.
        await self.accept()
        self.session_key = self.scope["url_route"]["kwargs"].get("session_key", "")
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        after = (query.get("after") or [None])[0] or None
        try:
            validate_session_key(self.session_key)
            self.owner = await _owner(self.scope)
            try:
                subscription = await runs.subscribe(self.session_key, after=after, owner=self.owner)
            except RunNotFound:
                if not await runs.get_service().is_free(self.session_key):
                    raise
                # Nobody's yet: the socket waits, idle, for its start frame.
                # (A POST tells a stranger as much: a taken key answers 404.)
                return
        except Exception as exc:  # noqa: BLE001 - mapped and logged in error_status
            status, message = error_status(exc, "WebSocket connect")
            if isinstance(exc, DetachedRunsError):
                await self.close(code=4000 + status, reason=message[:120])
            else:
                await self.close(code=CLOSE_INTERNAL)
            return
        await self._follow(subscription)

    async def disconnect(self, code: int) -> None:
        # Only this subscriber goes; the run goes on.
        await self._unfollow()

    # -- client frames -----------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            if not await self._same_owner():
                # Logged in or out over HTTP since the handshake: what this
                # socket may do was decided for another owner.
                await self.close(code=4403, reason="This browser's login changed: connect again.")
                return
            frame = _decode(text_data)
            kind = frame.get("type")
            if kind == "start":
                await self._start(frame)
            elif kind == "stop":
                queued = frame.get("all", False)
                if not isinstance(queued, bool):
                    raise InvalidInput('"all" must be true or false.')
                await runs.stop(self.session_key, owner=self.owner, queued=queued)
            elif kind == "input":
                answer = {key: frame[key] for key in ("request", "value") if key in frame}
                await runs.answer(self.session_key, answer, owner=self.owner)
            elif kind == "resume":
                after = frame.get("after")
                if after is not None and not isinstance(after, str):
                    raise InvalidInput('"after" must be an event id (a string) or null.')
                await self._follow(
                    await runs.subscribe(self.session_key, after=after, owner=self.owner)
                )
            else:
                raise InvalidInput('Unknown frame type: use "start", "stop", "resume" or "input".')
        except Exception as exc:  # noqa: BLE001 - mapped and logged in error_status
            # The socket stays open whatever the frame did: the client gets
            # the status and message an HTTP request would have.
            await self._error(*error_status(exc, f"a WebSocket frame on {self.session_key}"))

    async def _same_owner(self) -> bool:
        try:
            now = await _owner(self.scope, fresh=True)
        except NotAllowed:
            return False
        return str(now) == str(self.owner)

    async def _start(self, frame: dict[str, Any]) -> None:
        if "prompt" not in frame:
            raise InvalidInput('A "start" frame needs a "prompt".')
        if self.owner == ANONYMOUS:
            # An anonymous visitor's first run: it needs an id of its own.
            owner = await scope_owner(self.scope, create=True)
            if owner is None:
                raise NotAllowed(
                    "This browser has no session cookie to own a conversation with: "
                    "load a page of the site first, or start the first run over HTTP."
                )
            self.owner = owner
        # The client address limits an anonymous owner's runs, as over HTTP.
        run = await runs.start(
            self.session_key,
            prompt=frame["prompt"],
            owner=self.owner,
            address=scope_address(self.scope),
            options=frame.get("options"),
            multitask=frame.get("multitask"),
        )
        if run.status == Run.Status.QUEUED:
            # The socket follows it when it starts (`_forward`), after the runs
            # before it: which it follows now, or from here on if it was idle.
            if self._pump is None or self._pump.done():
                await self._follow(await runs.subscribe(self.session_key, owner=self.owner))
            return
        # Follow the new run from its start event, once the run followed so far
        # (stopped by this start) has sent the rest of its events and its done.
        subscription = await runs.subscribe(self.session_key, owner=self.owner)
        await self._follow(subscription, after_previous=True)

    async def _error(self, status: int, message: str) -> None:
        data = {"error": message, "status": status}
        await self.send(text_data=json.dumps({"event": "error", "data": data}))

    # -- following a run ---------------------------------------------------

    async def _follow(self, subscription: Subscription, *, after_previous: bool = False) -> None:
        """Forward ``subscription`` to the socket instead of what it followed so far.

        With ``after_previous`` the old pump is not cut short: it goes on until
        its run's terminal event (a ``start`` has just stopped that run), and
        the new subscription's frames follow it. Otherwise (``resume``) the old
        pump is cancelled at once.
        """
        previous, self._pump = self._pump, None
        if previous is not None and not after_previous:
            await _cancel(previous)
            previous = None
        self._pump = asyncio.create_task(
            self._forward(subscription, previous), name=f"detached_runs:ws:{self.session_key}"
        )

    async def _unfollow(self) -> None:
        pump, self._pump = self._pump, None
        if pump is not None:
            # Wait for it: its clean-up releases the subscriber (and those of
            # the pumps it was waiting for).
            await _cancel(pump)

    async def _forward(
        self, subscription: Subscription, previous: asyncio.Task[None] | None = None
    ) -> None:
        try:
            if previous is not None:
                await _drain(previous)
            # A socket that is behind gets what piled up, merged, at its next read
            # of the shared log: it holds no queue of its own.
            while True:
                last = None
                async for batch in subscription.batches():
                    for event in batch:
                        await self.send(text_data=event.frame)
                    last = batch[-1] if batch else last
                if last is None or last.event != DONE:
                    break
                # Runs queued behind the one that ended start one after the
                # other: the socket follows them as they do. A run started
                # otherwise (a start frame, another tab) is followed by the
                # pump of that start or of a resume, not this one.
                try:
                    subscription = await runs.subscribe(
                        self.session_key, after=last.id, owner=self.owner
                    )
                except DetachedRunsError:
                    break  # the session went (deleted), or its backend is unreachable
                if subscription.ended or not subscription.meta.get("queued"):
                    subscription.close()
                    break
        except asyncio.CancelledError:
            raise
        except _DISCONNECTED:
            # The browser went away between two frames: a normal end for a
            # subscriber (the run goes on); the disconnect handler follows.
            logger.debug("WebSocket of session %s closed while forwarding", self.session_key)
        except Exception:
            logger.exception("Forwarding session %s to a WebSocket failed", self.session_key)
        finally:
            subscription.close()  # if cancelled before it was iterated


#: Seconds a socket waits for the run it followed to send its terminal event,
#: after a ``start`` frame stopped that run, before it follows the new run
#: anyway. A stopped run ends as soon as its save returns (retried for about
#: 4 s when the database fails), so this is reached only by a run that is
#: not this process's to stop, e.g. one served from the database while another
#: worker of the memory backend runs it.
PREVIOUS_RUN_WAIT = 10.0


async def _drain(pump: asyncio.Task[None]) -> None:
    """Let ``pump`` send the rest of its run (up to its terminal event) first;
    cancel it if that takes longer than `PREVIOUS_RUN_WAIT` or if we are cancelled."""
    try:
        await asyncio.wait([pump], timeout=PREVIOUS_RUN_WAIT)
    finally:
        await _cancel(pump)


async def _cancel(pump: asyncio.Task[None]) -> None:
    if not pump.done():
        pump.cancel()
        # No frame of the old subscription may follow one of the new.
        await asyncio.wait([pump])


def _decode(text_data: str | None) -> dict[str, Any]:
    if text_data is None:
        raise InvalidInput("Send JSON text frames, not binary ones.")
    config = get_config()
    limit = config["MAX_PROMPT_CHARS"]
    json_limit = max(config["MAX_OPTIONS_BYTES"], config["MAX_INPUT_BYTES"])
    if limit is not None and len(text_data) > _frame_limit(limit, json_limit):
        # Refused before parsing; still say which limits apply.
        raise InvalidInput(
            f"The frame is too large ({len(text_data)} characters); "
            f"a prompt may have at most {limit} characters, "
            f"its options {config['MAX_OPTIONS_BYTES']} bytes of JSON, "
            f"an answer's value {config['MAX_INPUT_BYTES']}."
        )
    frame = loads(text_data, name="frame")
    if not isinstance(frame, dict):
        raise InvalidInput('A frame is a JSON object with a "type".')
    return frame


def _frame_limit(prompt_limit: int, options_limit: int) -> int:
    """The largest frame worth parsing: a prompt of ``prompt_limit`` characters
    each escaped as JSON at its longest (``\\ud83d\\ude00``, 12 characters for
    one astral character, as ``json.dumps`` writes it by default), options
    (or an answer's value) of ``options_limit`` bytes each escaped at its longest (``\\u0001``, 6
    characters for one byte), plus room for the rest of the frame. So valid
    input is never refused for its encoding, and a prompt over the limit up to
    about 12 times the limit gets `validate_prompt`'s own message; only larger
    frames are refused unread."""
    return 12 * prompt_limit + 6 * options_limit + 1024


async def _owner(scope: dict[str, Any], *, fresh: bool = False) -> str:
    return requester(await (scope_owner_now(scope) if fresh else scope_owner(scope)))
