"""The demo's own pages: the chat and the turns of a session (its earlier runs)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie

from detached_runs.models import Run
from detached_runs.owners import request_owner
from detached_runs.validation import SESSION_KEY_RE


@ensure_csrf_cookie
def chat(request: HttpRequest) -> HttpResponse:
    return render(request, "demo_project/chat.html")


async def history(request: HttpRequest, session_key: str) -> JsonResponse:
    """The runs of one of the visitor's sessions, oldest first."""
    owner = await request_owner(request)
    if owner is None or not SESSION_KEY_RE.match(session_key):
        return JsonResponse({"turns": []})
    rows = Run.objects.filter(session_key=session_key, owner=owner).order_by("started_at")
    turns = [
        {
            "id": str(run.id),
            "prompt": run.prompt,
            "output": run.output,
            "status": run.status,
            "error": run.error,
            "started_at": run.started_at.isoformat(),
        }
        async for run in rows
    ]
    return JsonResponse({"turns": turns})
