# mysite/settings.py: startproject's apps, with daphne first (runserver then
# serves ASGI, which streaming needs), channels and detached_runs.
INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "detached_runs",
]
ASGI_APPLICATION = "mysite.asgi.application"
DETACHED_RUNS = {"AGENT": "mysite.agents.agent"}
