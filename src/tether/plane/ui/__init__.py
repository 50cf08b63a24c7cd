"""The Remote Agents pages in Airflow's own UI: agents, tokens, allowed IP ranges, register an agent,
and the "Agent" tab of a task instance (ADR 6).

Airflow shows each page in its frame as an external view of Tether's plugin. The server
renders a page's frame; the page's script reads and changes everything through the admin
REST API (``tether.plane.api.admin``) with the browser's Airflow session, so the pages
decide nothing the API does not decide the same way. Nothing here is built or fetched
from elsewhere: templates, script and styles ship in the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

import tether
from tether import errors
from tether.plane.api.admin import may_change

HERE = Path(__file__).parent
#: Where the plugin mounts Tether's app in the API server.
MOUNT = "/tether"
CATEGORY = "Remote Agents"


@dataclass(frozen=True)
class Page:
    slug: str
    title: str
    #: Airflow's route for the view: ``/plugin/<url_route>``.
    url_route: str
    #: A sentence under the title.
    lead: str


PAGES = (
    Page("agents", "Agents", "tether-agents", "Agents connected to this Airflow, their health and their work."),
    Page(
        "tokens",
        "Agent Tokens",
        "tether-tokens",
        "Agents authenticate with these tokens. A token's value is shown once, when it is created.",
    ),
    Page(
        "ip-ranges",
        "Allowed IP Ranges",
        "tether-ip-ranges",
        "Agents may call only from these ranges. An empty list lets them call from any address.",
    ),
    Page(
        "register",
        "Register a Remote Agent",
        "tether-register",
        "Choose a token and what the agents serve, then install them with the Helm chart.",
    ),
)
TASK_INSTANCE = Page(
    "task-instance", "Agent", "tether-agent", "Which agent ran each try of this task instance, and when."
)
_BY_SLUG = {page.slug: page for page in (*PAGES, TASK_INSTANCE)}


def external_views() -> list[dict[str, Any]]:
    """Airflow's external views for the pages: a "Remote Agents" menu, and a tab of every task instance.

    Their URLs are relative: Airflow's UI resolves them against its base URL, so the pages are
    found where the API server serves Airflow, at the root or under a path of ``[api] base_url``.
    """
    base = MOUNT.lstrip("/")
    icon, icon_dark = f"{base}/ui/static/icon.svg", f"{base}/ui/static/icon-dark.svg"
    views: list[dict[str, Any]] = [
        {
            "name": page.title,
            "href": f"{base}/ui/{page.slug}",
            "destination": "nav",
            "category": CATEGORY,
            "url_route": page.url_route,
            "icon": icon,
            "icon_dark_mode": icon_dark,
        }
        for page in PAGES
    ]
    views.append(
        {
            "name": TASK_INSTANCE.title,
            "href": f"{base}/ui/{TASK_INSTANCE.slug}?dag_id={{DAG_ID}}&run_id={{RUN_ID}}&task_id={{TASK_ID}}"
            "&map_index={MAP_INDEX}",
            "destination": "task_instance",
            "url_route": TASK_INSTANCE.url_route,
            "icon": icon,
            "icon_dark_mode": icon_dark,
        }
    )
    return views


@cache
def _templates() -> Environment:
    return Environment(
        loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True), auto_reload=False
    )


def ui_static() -> StaticFiles:
    return StaticFiles(directory=HERE / "static")


def _html(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    text = _templates().get_template(template).render(version=tether.__version__, **context)
    return HTMLResponse(
        text,
        status_code=status_code,
        headers={
            # Shown only in a frame of this server's own pages (Airflow's UI), and loading only from it.
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
            "script-src 'self'; frame-ancestors 'self'; form-action 'self'",
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        },
    )


def ui_router() -> APIRouter:
    router = APIRouter(tags=["ui"], include_in_schema=False)

    @router.get("/ui/{slug}", response_class=HTMLResponse)
    async def page(slug: str, request: Request) -> HTMLResponse:
        current = _BY_SLUG.get(slug)
        if current is None:
            return _html("message.html", 404, title="Not found", message=f"Tether has no page {slug!r}.")
        authorize = request.app.state.tether_authorizer
        try:
            user: str = await authorize(request, "GET")
        except errors.Unauthorized:
            return _html(
                "message.html", 401, title=current.title, message="Log in to Airflow to see this page.", login=True
            )
        except errors.Forbidden as exc:
            return _html("message.html", 403, title=current.title, message=exc.detail)
        return _html(f"{slug}.html", page=current, pages=PAGES, user=user, may_change=await may_change(request))

    return router
