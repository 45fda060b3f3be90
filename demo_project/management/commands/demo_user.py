"""Create the demo's admin account (admin / admin) if it does not exist yet,
and say where the demo is served.

``./dev demo [runserver arguments]`` runs ``manage.py demo_user -- <the same
arguments>`` before runserver, so the address printed here is the one
runserver will listen on (``./dev demo 127.0.0.1:8101`` prints port 8101).
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.management import get_commands, load_command_class
from django.core.management.base import BaseCommand, CommandParser
from django.core.management.commands.runserver import naiveip_re


class Command(BaseCommand):
    help = "Create the demo superuser admin/admin (demo only: never in production)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "runserver_args",
            nargs="*",
            help="the arguments runserver gets (after --), to print its address",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        users = get_user_model().objects
        if not users.filter(username="admin").exists():
            users.create_superuser("admin", "admin@example.com", "admin")
            self.stdout.write("Created the demo admin: user admin, password admin.")
        url = runserver_url(options["runserver_args"])
        self.stdout.write(f"Demo: {url}   Admin: {url}admin/")


def runserver_url(runserver_args: list[str]) -> str:
    """The URL runserver serves on with these arguments: parsed by the
    project's own runserver (daphne's here), with its defaults."""
    runserver: Any = load_command_class(get_commands()["runserver"], "runserver")
    parsed = runserver.create_parser("manage.py", "runserver").parse_args(runserver_args)
    host = "[::1]" if parsed.use_ipv6 else "127.0.0.1"
    port = str(runserver.default_port)
    if parsed.addrport:
        match = naiveip_re.match(parsed.addrport)
        if match is None:  # runserver will refuse it, and say why
            return f"http://{parsed.addrport}/"
        address, port = match["addr"], match["port"]
        if address:  # an IPv6 address keeps its brackets here
            host = "0.0.0.0" if address == "0" else address
    return f"http://{host}:{port}/"
