"""Graceful shutdown: on SIGTERM/SIGINT, end every run in flight before the
server tears the event loop down.

ASGI servers handle these signals themselves (daphne through Twisted, uvicorn
through its own handlers) and, once told, cancel what runs and stop the loop:
runs would die mid-answer with their last seconds of text unsaved. So the
first time a run starts, the service wraps the server's handlers: a signal
first ends every run (status ``interrupted``, partial text saved, the terminal
event sent to every subscriber), bounded by ``SHUTDOWN_TIMEOUT``, and only
then hands the signal on to the server, once the streams of its runs' ends
have closed (a server cancels the responses it still has). A second signal
cuts that short: a drain (``SHUTDOWN_MODE = "drain"``) ends, the runs are
interrupted now, and the first signal is handed on as soon as they are saved
and their streams closed, within ``HURRY_WITHIN`` seconds in any case; so a
server which waits for its connections to close (uvicorn does, until a
second SIGINT) goes now too. The server gets each signal once, in order.

Only handlers a server installed are wrapped (a Python callable other than
Python's own SIGINT default), so a test runner or a shell is left alone. Set
``DETACHED_RUNS["HANDLE_SIGNALS"] = False`` to opt out and call
``runs.get_service().shutdown()`` yourself. For servers that speak the ASGI
lifespan protocol, `LifespanApp` does the same on ``lifespan.shutdown``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

from .conf import get_config

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Seconds after a second signal within which the server gets the first one,
#: however far the shutdown got (it usually has ended by then: the runs are
#: interrupted at once, and their streams close).
HURRY_WITHIN = 3.0
_shutdown: Callable[[], Awaitable[None]] | None = None
_hurry: Callable[[], None] | None = None
#: ``first``: the signal that began the shutdown, while it is not handed on
#: to the server yet (its number, frame and the server's handler).
_state: dict[str, Any] = {"shutting_down": False, "first": None}


def install_signal_handlers(
    shutdown: Callable[[], Awaitable[None]], hurry: Callable[[], None] | None = None
) -> bool:
    """Wrap the server's SIGTERM/SIGINT handlers (once); True if any was
    wrapped. ``hurry()`` is called (on the event loop) at a second signal:
    what ``shutdown()`` still waits for, it ends now."""
    global _shutdown, _hurry
    if not get_config()["HANDLE_SIGNALS"]:
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    loop = asyncio.get_running_loop()
    _shutdown, _hurry = shutdown, hurry
    wrapped = False
    for number in SIGNALS:
        previous = signal.getsignal(number)
        if getattr(previous, "_detached_runs", False):
            wrapped = True
            continue
        if not callable(previous) or previous is signal.default_int_handler:
            continue  # nobody but Python's defaults: not a server we can hand on to
        signal.signal(number, _make_handler(loop, previous))
        wrapped = True
    return wrapped


def _make_handler(loop: asyncio.AbstractEventLoop, previous: Any) -> Any:
    def handler(number: int, frame: FrameType | None) -> None:
        # In signal context: do nothing here but hand over to the loop.
        loop.call_soon_threadsafe(_on_signal, loop, number, frame, previous)

    handler._detached_runs = True  # type: ignore[attr-defined]
    return handler


def _on_signal(loop: asyncio.AbstractEventLoop, number: int, frame: Any, previous: Any) -> None:
    if _state["shutting_down"]:
        first = _state["first"]
        if first is None:
            # The server has the first one already: this one is its second.
            logger.warning("Second %s: handed on to the server", signal.Signals(number).name)
            _hand_on(number, frame, previous)
            return
        logger.warning("Second %s: shutting down without waiting", signal.Signals(number).name)
        if _hurry is not None:
            _hurry()  # the runs are interrupted now, not at the end of a drain
        # The hurried shutdown hands the first signal on once the runs are
        # saved and their streams closed, which takes a moment; in any case
        # within HURRY_WITHIN seconds.
        loop.call_later(HURRY_WITHIN, _hand_on_first)
        return
    _state["shutting_down"] = True
    _state["first"] = (number, frame, previous)
    logger.info(
        "%s: %s before shutdown",
        signal.Signals(number).name,
        "draining the runs in flight"
        if get_config()["SHUTDOWN_MODE"] == "drain"
        else "ending the runs in flight",
    )
    task = loop.create_task(_graceful(), name="detached_runs:shutdown")
    _tasks.add(task)


_tasks: set[asyncio.Task[None]] = set()


async def _graceful() -> None:
    timeout = float(get_config()["SHUTDOWN_TIMEOUT"])
    try:
        if _shutdown is not None:
            await asyncio.wait_for(_shutdown(), timeout + 1)
    except Exception:
        logger.exception("Graceful shutdown of runs failed")
    finally:
        _hand_on_first()


def _hand_on_first() -> None:
    """Hand the signal that began the shutdown on to the server, once."""
    first, _state["first"] = _state["first"], None
    if first is not None:
        _hand_on(*first)


def _hand_on(number: int, frame: Any, previous: Any) -> None:
    if callable(previous):
        previous(number, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)


class LifespanApp:
    """An ASGI app for the ``lifespan`` scope: ends runs on ``lifespan.shutdown``.

    Route it in your ``ProtocolTypeRouter`` as ``"lifespan": LifespanApp()``.
    """

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        from .runs import get_service

        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await get_service().shutdown()
                except Exception:
                    logger.exception("Ending runs at lifespan shutdown failed")
                await send({"type": "lifespan.shutdown.complete"})
                return
