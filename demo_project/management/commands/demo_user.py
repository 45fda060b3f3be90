"""Create the demo's admin account (admin / admin) if it does not exist yet."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the demo superuser admin/admin (demo only: never in production)."

    def handle(self, *args: Any, **options: Any) -> None:
        users = get_user_model().objects
        if not users.filter(username="admin").exists():
            users.create_superuser("admin", "admin@example.com", "admin")
            self.stdout.write("Created the demo admin: user admin, password admin.")
        self.stdout.write("Demo: http://127.0.0.1:8000/   Admin: http://127.0.0.1:8000/admin/")
