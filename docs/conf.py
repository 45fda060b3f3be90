"""Sphinx configuration: Markdown pages (MyST) with the furo theme.

Build with ``./dev docs``, which treats every warning as an error, so a
broken link or a snippet file that moved fails CI.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

project = "detached_runs"
author = "The detached_runs authors"
copyright = "the detached_runs authors"
release = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
# Pages link to each other's sections as page.md#heading-text.
myst_heading_anchors = 3
exclude_patterns = ["_build"]

html_theme = "furo"
html_title = f"detached_runs {release}"
