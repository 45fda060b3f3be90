"""The Vercel AI SDK's chat protocol (``ai`` 7, ``useChat``) over detached runs.

``path("api/", include("detached_runs.aisdk.urls"))`` serves
``DefaultChatTransport({api: "/api/chat"})``: see `docs/aisdk.md`.
"""
