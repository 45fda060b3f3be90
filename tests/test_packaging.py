"""The distributions: `python -m build` makes a wheel and an sdist that carry
what a Django project needs from the app (migrations, static files, the
admin's template, py.typed) and nothing of the development tree."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # No isolation: the build backend comes from the dev extras, so the test
    # needs no network and takes seconds.
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return out


def test_the_wheel_has_migrations_static_files_and_the_typed_marker(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for name in (
        "detached_runs/py.typed",
        "detached_runs/static/detached_runs/detached-runs.js",
        "detached_runs/migrations/0001_initial.py",
        "detached_runs/backends/redis.py",
        "detached_runs/agents/openai.py",
        "detached_runs/templates/admin/detached_runs/run/change_list.html",
        "detached_runs/templates/admin/detached_runs/run/change_form.html",
        "detached_runs/templates/admin/detached_runs/run/log_events.html",
        "detached_runs/static/detached_runs/admin-live.js",
        "detached_runs/static/detached_runs/admin.css",
        "detached_runs/aisdk/views.py",
    ):
        assert name in names, name
    assert not [n for n in names if n.startswith(("tests/", "demo_project/", "bench/"))]


def test_the_wheel_metadata_names_the_license_extras_and_versions(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (metadata,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    assert "License-Expression: MIT" in text
    assert "Provides-Extra: redis" in text and "Provides-Extra: openai" in text
    assert "Classifier: Framework :: Django :: 5.2" in text
    assert "Classifier: Programming Language :: Python :: 3.11" in text
    assert "Requires-Python: >=3.11" in text


def test_the_sdist_carries_the_tests_docs_license_and_changelog(dist: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {n.split("/", 1)[1] for n in archive.getnames() if "/" in n}
    for name in (
        "LICENSE",
        "CHANGELOG.md",
        "README.md",
        "CONTRIBUTING.md",
        "tests/conftest.py",
        "tests/settings.py",
        "docs/conf.py",
        "docs/snippets/asgi.py",  # tests/test_install_snippets.py runs them
        "frontend/package-lock.json",  # tests/test_e2e_aisdk.py reads streams with it
        "frontend/parse-ui-stream.mjs",
    ):
        assert name in names, name
    assert not [n for n in names if n.startswith(("docs/_build", "frontend/node_modules"))]
    assert "detached_runs/static/detached_runs/detached-runs.js" in names
    assert not [n for n in names if n.endswith((".pyc", ".sqlite3"))]
