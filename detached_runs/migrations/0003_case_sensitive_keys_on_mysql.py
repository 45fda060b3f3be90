"""Session keys and owners compare case-sensitively on MariaDB and MySQL too.

Their default collations (``utf8mb4_general_ci``, ``utf8mb4_0900_ai_ci``) are
case-insensitive: ``CaseX`` and ``casex`` were one session there, so a key
nobody owned answered 404 and its owner read another session's runs. Other
databases compare text exactly already; on them this does nothing, and the
model declares no collation, which would be one vendor's name.
"""

from __future__ import annotations

from typing import Any

from django.db import migrations

#: The columns that name a session or an owner, with their length.
COLUMNS = (("session_key", 64), ("owner", 200))


def binary_collation(apps: Any, schema_editor: Any) -> None:
    connection = schema_editor.connection
    if connection.vendor != "mysql":
        return
    run = apps.get_model("detached_runs", "Run")
    table = schema_editor.quote_name(run._meta.db_table)
    for column, length in COLUMNS:
        schema_editor.execute(
            f"ALTER TABLE {table} MODIFY {schema_editor.quote_name(column)} "
            f"varchar({length}) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL"
        )


class Migration(migrations.Migration):
    atomic = False  # MySQL runs DDL outside transactions anyway, and refuses it inside one
    dependencies = [("detached_runs", "0002_run_worker")]

    operations = [migrations.RunPython(binary_collation, migrations.RunPython.noop)]
