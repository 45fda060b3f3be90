"""Ready-made agents, each behind an optional extra so the app itself needs none.

- `detached_runs.agents.openai` — any OpenAI-compatible chat-completions endpoint
  (``pip install django-detached-runs[openai]``).
"""
