"""The Remote Agents pages ship whole in the wheel and load nothing from elsewhere."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import tether.plane.ui as ui

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "tether"
ASSETS = sorted(p for folder in ("templates", "static") for p in (ui.HERE / folder).iterdir() if p.is_file())
#: A URL a browser would fetch from another origin: a script, a style sheet, a font, an image.
REMOTE = re.compile(
    r"""(src|href|action)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import|fetch\(\s*["']https?:"""
)


def test_every_page_file_is_package_data() -> None:
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["tether"]
    assert ASSETS
    for path in ASSETS:
        relative = path.relative_to(PACKAGE).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative


def test_no_page_file_loads_anything_from_another_origin() -> None:
    for remote in ('<script src="https://cdn.example/x.js">', "url(//fonts.example/a.woff2)", "@import 'x.css';"):
        assert REMOTE.search(remote), remote
    assert REMOTE.search('<script src="static/theme.js">') is None
    for path in ASSETS:
        if path.suffix == ".svg":
            continue
        found = REMOTE.search(path.read_text())
        assert found is None, f"{path.name}: {found.group(0) if found else ''}"


def test_every_template_a_page_names_exists() -> None:
    for page in (*ui.PAGES, ui.TASK_INSTANCE):
        assert (ui.HERE / "templates" / f"{page.slug}.html").is_file(), page.slug
