from __future__ import annotations

import json

from django.contrib import admin
from django.contrib.auth import aauthenticate, alogin, alogout
from django.http import HttpRequest, JsonResponse
from django.urls import include, path


async def log_in(request: HttpRequest) -> JsonResponse:
    """A project's own async login view, as the end-to-end tests use it
    (``POST {"username", "password"}``, CSRF checked by the middleware)."""
    if request.method != "POST":
        return JsonResponse({"error": "POST your username and password."}, status=405)
    payload = json.loads(request.body or b"{}")
    user = await aauthenticate(
        request, username=payload.get("username"), password=payload.get("password")
    )
    if user is None:
        return JsonResponse({"error": "Wrong username or password."}, status=403)
    await alogin(request, user)
    return JsonResponse({"user": user.pk})


async def log_out(request: HttpRequest) -> JsonResponse:
    if request.method != "POST":
        return JsonResponse({"error": "POST to log out."}, status=405)
    await alogout(request)
    return JsonResponse({"user": None})


urlpatterns = [
    path("admin/", admin.site.urls),
    path("runs/", include("detached_runs.urls")),
    path("api/", include("detached_runs.aisdk.urls")),
    path("metrics", include("detached_runs.metrics.urls")),
    path("login/", log_in),
    path("logout/", log_out),
]
