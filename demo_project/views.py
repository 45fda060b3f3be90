"""The demo's own page: the chat. Its chats and their turns come from
detached_runs' own endpoints (``GET /runs/``, ``GET /runs/<key>/runs/``)."""

from __future__ import annotations

from pathlib import Path

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie


@ensure_csrf_cookie
def chat(request: HttpRequest) -> HttpResponse:
    return render(request, "demo_project/chat.html")


#: The React page's build (``npm run build --prefix frontend``; ``./dev demo``
#: and ``./dev test`` make it).
REACT_PAGE = Path(__file__).resolve().parent / "static" / "react" / "index.html"


@ensure_csrf_cookie
def react_chat(request: HttpRequest) -> HttpResponse:
    """The same chat written with the AI SDK (``frontend/src/main.jsx``):
    ``useChat`` against ``detached_runs.aisdk``. Its page is Vite's build."""
    try:
        page = REACT_PAGE.read_text()
    except FileNotFoundError:
        return HttpResponse(
            "The React page is not built: run `npm ci --prefix frontend && "
            "npm run build --prefix frontend` (./dev demo does it when npm is installed).",
            status=503,
            content_type="text/plain",
        )
    return HttpResponse(page)
