"""The Remote Agents pages in Airflow's UI, in a real headless Chromium (Debian's ``chromium``).

One plane on PostgreSQL - API server, scheduler, DAG processor - with one live agent
serves the whole module. Users log in through Airflow's own login page (the simple
auth manager); every action goes through the page, and its effect is checked on the
plane itself. Each page is photographed in light and dark mode into docs/ui/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from playwright.sync_api import Browser, FrameLocator, Page, expect, sync_playwright

from tests.chart.rendering import pod_specs, render, validate
from tests.conftest import running_plane
from tether.embedded import AgentProcess, Plane, start_agent, wait_until
from tether.plane.values import agent_values

DAGS = Path(__file__).parent / "dags_ui"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "ui"
CHROMIUM = os.environ.get("TETHER_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
AGENT = "ui-agent"
#: What the pages show for an empty value.
NOTHING = "\u2013"
VIEWPORT = {"width": 1440, "height": 900}


@pytest.fixture(scope="module", autouse=True)
def _patient_assertions() -> Iterator[None]:
    """Playwright's 5 s default for ``expect`` is short for a whole plane and a browser on two cores."""
    expect.set_options(timeout=20_000)
    yield
    expect.set_options(timeout=5_000)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str) -> Iterator[Plane]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the browser tests need Debian's chromium at {CHROMIUM}: run scripts/install-chromium as root")
    with running_plane(
        pg_admin_url,
        tmp_path_factory.mktemp("ui") / "plane",
        DAGS,
        {
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
            "AIRFLOW__TETHER__HEARTBEAT_INTERVAL": "1",
        },
    ) as plane:
        yield plane


@pytest.fixture(scope="module")
def agent(plane: Plane) -> AgentProcess:
    started = start_agent(plane, AGENT, plane.create_token("ui"), queues="uiq", slots="2")
    wait_until(lambda: started.health("/readyz") == 200, 120, "the agent ready")
    return started


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


def _password(plane: Plane, user: str) -> str:
    passwords: dict[str, str] = json.loads((plane.home / "simple_auth_manager_passwords.json.generated").read_text())
    return passwords[user]


def _log_in(browser: Browser, plane: Plane, user: str) -> Page:
    """A page of a new browser session, logged in to Airflow through its login form."""
    context = browser.new_context(viewport=VIEWPORT, color_scheme="light", accept_downloads=True)
    context.set_default_timeout(20_000)
    page = context.new_page()
    page.goto(f"{plane.url}/auth/login/")
    page.get_by_label("Username").fill(user)
    page.get_by_label("Password").fill(_password(plane, user))
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda url: "/auth/login" not in url)
    return page


@pytest.fixture(scope="module")
def admin(browser: Browser, plane: Plane, agent: AgentProcess) -> Iterator[Page]:
    page = _log_in(browser, plane, "admin")
    yield page
    page.context.close()


def _open(page: Page, plane: Plane, route: str, title: str) -> FrameLocator:
    """Open one of the pages as a user does, in Airflow's frame; wait until its data is shown."""
    page.goto(f"{plane.url}{route}")
    frame = page.frame_locator(f"iframe[title='{title}']")
    # "No Loading row" holds before the frame has loaded at all: wait for the page first.
    expect(frame.locator("main#tether[data-page]")).to_be_attached()
    expect(frame.locator("#rows td.muted:text('Loading…')")).to_have_count(0)
    return frame


def _shoot(page: Page, frame: FrameLocator, name: str) -> None:
    """Screenshots in light and dark mode; the page follows Airflow's colour mode as it changes."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for mode in ("light", "dark"):
        page.evaluate(
            """mode => {
                localStorage.setItem('theme', mode);
                const root = document.documentElement;
                root.classList.remove('light', 'dark');
                root.classList.add(mode);
                root.style.colorScheme = mode;
            }""",
            mode,
        )
        expect(frame.locator("html")).to_have_attribute("data-theme", mode)
        # The page takes Airflow's own colours, whichever the mode.
        expect(frame.locator("body")).to_have_css("background-color", _airflow_colour(page, "bg"))
        expect(frame.locator("body")).to_have_css("color", _airflow_colour(page, "fg"))
        page.screenshot(path=str(SCREENSHOTS / f"{name}-{mode}.png"))
    page.evaluate("localStorage.setItem('theme', 'light')")


def _airflow_colour(page: Page, token: str) -> str:
    """The computed colour of one of Airflow's UI colour tokens, in the mode it is in now."""
    return str(
        page.evaluate(
            """token => {
                const probe = document.createElement('div');
                probe.style.color = `var(--chakra-colors-${token})`;
                document.body.appendChild(probe);
                const colour = getComputedStyle(probe).color;
                probe.remove();
                return colour;
            }""",
            token,
        )
    )


def _audit(plane: Plane, action: str) -> list[dict[str, Any]]:
    http = plane.rest_client("admin", path="/tether/v1", timeout=10)
    return [e for e in http.get("/audit", params={"limit": 200}).json() if e["action"] == action]


def _job_state(plane: Plane, dag_id: str, run_id: str) -> str | None:
    rows = plane.query("SELECT state FROM tether_job WHERE dag_id = :d AND run_id = :r", d=dag_id, r=run_id)
    return rows[0][0] if rows else None


def _agent(plane: Plane) -> dict[str, Any]:
    http = plane.rest_client("admin", path="/tether/v1", timeout=10)
    answer: dict[str, Any] = http.get(f"/agents/{AGENT}").json()
    return answer


def _agent_status(plane: Plane) -> str:
    return str(_agent(plane)["status"])


# -- Navigation --------------------------------------------------------------------------------------


def test_the_remote_agents_menu_leads_to_each_page(admin: Page, plane: Plane) -> None:
    admin.goto(f"{plane.url}/")
    for title in ("Agents", "Agent Tokens", "Allowed IP Ranges", "Register a Remote Agent"):
        admin.get_by_role("button", name="Plugins").click()
        admin.get_by_role("menuitem", name="Remote Agents").click()
        entry = admin.get_by_role("menuitem", name=title, exact=True)
        if title == "Agents":
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            admin.screenshot(path=str(SCREENSHOTS / "menu-light.png"))
        entry.click()
        expect(admin.frame_locator(f"iframe[title='{title}']").get_by_role("heading", level=1)).to_have_text(title)


# -- Agents -------------------------------------------------------------------------------------


def test_agents_page_shows_the_live_agent_and_cordons_uncordons_and_deletes_it(admin: Page, plane: Plane) -> None:
    plane.wait_for_dag("ui_long")
    long_run = plane.trigger("ui_long")
    frame = _open(admin, plane, "/plugin/tether-agents", "Agents")
    row = frame.locator(f"tr[data-agent='{AGENT}']")
    expect(row).to_contain_text("healthy")
    expect(row).to_contain_text("worker")
    expect(row).to_contain_text("uiq")
    expect(row.locator("[data-heartbeat]")).to_have_text(_seconds_ago())
    # The list refreshes itself: the running task appears with a link to its task instance.
    link = row.locator(f"a[href$='/dags/ui_long/runs/{long_run}/tasks/nap']")
    expect(link).to_be_visible(timeout=60_000)
    expect(row.locator("[data-slots]")).to_have_text("1 / 2")
    _shoot(admin, frame, "agents")

    # Cordon, with a reason, confirmed in a dialog.
    row.get_by_role("button", name="Cordon").click()
    dialog = frame.locator("#confirm")
    expect(dialog).to_be_visible()
    dialog.locator("#confirm-reason").fill("kernel upgrade")
    dialog.get_by_role("button", name="Cordon").click()
    expect(row.locator("[data-cordon]")).to_contain_text("kernel upgrade")
    expect(row.locator("[data-cordon]")).to_contain_text("by admin")
    assert _audit(plane, "agent.cordon")[0]["actor"] == "admin"
    # Cordoned, it lets the running task finish and takes nothing new, while healthy.
    quick_run = plane.trigger("ui_quick")
    assert plane.wait_for_run("ui_long", long_run, timeout=60) == "success"
    wait_until(lambda: _job_state(plane, "ui_quick", quick_run) == "QUEUED", 30, "the quick job queued")
    time.sleep(3)
    assert _job_state(plane, "ui_quick", quick_run) == "QUEUED"
    assert _agent_status(plane) == "HEALTHY"

    # Uncordon, confirmed: it takes the waiting job within seconds (the control for the wait above).
    row.get_by_role("button", name="Uncordon").click()
    dialog.get_by_role("button", name="Uncordon").click()
    expect(row.locator("[data-cordon]")).to_have_text("no")
    wait_until(lambda: _job_state(plane, "ui_quick", quick_run) != "QUEUED", 5, "the job taken once uncordoned")
    assert plane.wait_for_run("ui_quick", quick_run, timeout=60) == "success"
    assert _audit(plane, "agent.uncordon")[0]["actor"] == "admin"

    # Delete: cancelling changes nothing; confirmed, the record goes and the live agent registers again.
    row.get_by_role("button", name="Delete").click()
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    row.get_by_role("button", name="Delete").click()
    dialog.get_by_role("button", name="Delete").click()
    expect(frame.locator("#flash")).to_have_text(f"{AGENT} is deleted.")
    # One delete: the one confirmed, not the one cancelled.
    assert [e["actor"] for e in _audit(plane, "agent.delete")] == ["admin"]
    expect(row).to_contain_text("healthy", timeout=20_000)


def _seconds_ago() -> re.Pattern[str]:
    return re.compile(r"^last heartbeat [0-4] s ago$")


# -- Tokens ---------------------------------------------------------------------------------------


def test_tokens_page_creates_a_token_shown_once_and_revokes_it(admin: Page, plane: Plane) -> None:
    frame = _open(admin, plane, "/plugin/tether-tokens", "Agent Tokens")
    expect(frame.locator("tr[data-token='ui']")).to_contain_text("active")
    frame.get_by_role("button", name="+ Agent Token").click()
    form = frame.locator("#token-form")
    form.get_by_label("Name").fill("edge-eu")
    form.get_by_label("Expires in (days)").fill("30")
    form.get_by_label("Description").fill("EU edge agents")
    form.locator("input[value=triggerer]").check()
    form.get_by_role("button", name="Create token").click()
    secret_box = frame.get_by_test_id("secret")
    expect(secret_box).to_have_value(_token_pattern())
    secret = secret_box.input_value()
    expect(frame.locator("#token-created")).to_contain_text("only time the token is shown")
    # The value works: an agent with it is let in.
    preflight = httpx.get(
        f"{plane.url}/tether/v1/preflight", headers={"Authorization": f"Bearer {secret}", "X-Tether-Protocol": "2"}
    )
    assert preflight.status_code == 200, preflight.text
    _shoot(admin, frame, "tokens-created")
    frame.locator("#token-created").get_by_role("button", name="Done").click()
    row = frame.locator("tr[data-token='edge-eu']")
    expect(row).to_contain_text("active")
    expect(row).to_contain_text("worker")
    expect(row).to_contain_text("triggerer")
    expect(row).to_contain_text("by admin")
    assert secret not in frame.locator("body").inner_html()
    # Never shown again: not after closing, not after reloading.
    frame = _open(admin, plane, "/plugin/tether-tokens", "Agent Tokens")
    assert secret not in frame.locator("html").inner_html()
    _shoot(admin, frame, "tokens")

    row = frame.locator("tr[data-token='edge-eu']")
    row.get_by_role("button", name="Revoke").click()
    frame.locator("#confirm").get_by_role("button", name="Revoke").click()
    expect(row.locator("[data-state]")).to_have_text("revoked")
    refused = httpx.get(
        f"{plane.url}/tether/v1/preflight", headers={"Authorization": f"Bearer {secret}", "X-Tether-Protocol": "2"}
    )
    assert refused.status_code == 401
    assert _audit(plane, "token.revoke")[0]["actor"] == "admin"


def _token_pattern() -> re.Pattern[str]:
    return re.compile(r"^tether_[0-9a-f]+_\S{20,}$")


# -- Allowed IP ranges -------------------------------------------------------------------------------


def test_ip_ranges_page_checks_adds_and_removes_ranges(admin: Page, plane: Plane) -> None:
    frame = _open(admin, plane, "/plugin/tether-ip-ranges", "Allowed IP Ranges")
    expect(frame.get_by_test_id("enforced")).to_contain_text("any address")
    cidr = frame.get_by_label("CIDR range or address")
    error = frame.locator("#cidr-error")
    for bad, says in (("10.0.0.300/8", "not an IPv4 or IPv6 address"), ("2001:db8::/129", "from 0 to 128")):
        cidr.fill(bad)
        frame.get_by_role("button", name="Add range").click()
        expect(error).to_contain_text(says)
    assert frame.locator("tr[data-range]").count() == 0
    # The server refuses it too, with its own sentence, whatever a page lets through.
    refused = frame.locator("body").evaluate(
        """async () => {
            const r = await fetch('/tether/v1/allowed-ip-ranges', {method: 'POST', credentials: 'same-origin',
                headers: {'Content-Type': 'application/json'}, body: JSON.stringify({ranges: ['10.0.0.300/8']})});
            return [r.status, (await r.json()).detail];
        }"""
    )
    assert refused[0] == 422 and "is not an IPv4 or IPv6 address or CIDR range" in refused[1]

    for good in ("127.0.0.0/8", "2001:db8::/32"):
        cidr.fill(good)
        expect(error).to_be_hidden()
        frame.get_by_role("button", name="Add range").click()
        expect(frame.locator(f"tr[data-range='{good}']")).to_contain_text("admin")
    expect(frame.get_by_test_id("enforced")).to_contain_text("only from the ranges below")
    _shoot(admin, frame, "ip-ranges")

    # The agent calls from 127.0.0.1, inside the ranges: its heartbeats go on being taken.
    def last_beat() -> datetime:
        return datetime.fromisoformat(_agent(plane)["last_heartbeat"])

    enforced_at = last_beat()
    wait_until(lambda: last_beat() > enforced_at, 10, "a heartbeat accepted under the ranges")
    assert _agent(plane)["status"] == "HEALTHY"
    for good in ("2001:db8::/32", "127.0.0.0/8"):
        frame.locator(f"tr[data-range='{good}']").get_by_role("button", name="Remove").click()
        frame.locator("#confirm").get_by_role("button", name="Remove").click()
        expect(frame.locator(f"tr[data-range='{good}']")).to_have_count(0)
    expect(frame.get_by_test_id("enforced")).to_contain_text("any address")
    assert [e["actor"] for e in _audit(plane, "allowed_ip_ranges.add")] == ["admin", "admin"]


# -- Task instance tab ---------------------------------------------------------------------------------


def test_the_agent_tab_of_a_task_instance_shows_each_try(admin: Page, plane: Plane) -> None:
    run_id = plane.trigger("ui_quick")
    assert plane.wait_for_run("ui_quick", run_id, timeout=60) == "success"
    wait_until(lambda: _job_state(plane, "ui_quick", run_id) == "SUCCESS", 15, "the job settled")
    # The tab is one of the task instance's own tabs.
    admin.goto(f"{plane.url}/dags/ui_quick/runs/{run_id}/tasks/nap")
    admin.get_by_role("link", name="Agent", exact=True).click()
    expect(admin).to_have_url(re.compile(rf"/dags/ui_quick/runs/{run_id}/tasks/nap/plugin/tether-agent"))
    frame = admin.frame_locator("iframe[title='Agent']")
    row = frame.locator("tr[data-try='1']")
    expect(row).to_contain_text(AGENT)
    expect(row).to_contain_text("success")
    cells = row.locator("td")
    # Queued, leased, started and reported times are all there; the lease ended with the start.
    for index in (4, 5, 7, 8):
        expect(cells.nth(index)).not_to_have_text(NOTHING)
    expect(cells.nth(6)).to_have_text(NOTHING)
    _shoot(admin, frame, "task-instance")


# -- Register --------------------------------------------------------------------------------------------


def test_register_page_writes_the_cli_values_file_which_the_chart_installs(admin: Page, plane: Plane) -> None:
    frame = _open(admin, plane, "/plugin/tether-register", "Register a Remote Agent")
    form = frame.locator("#register-form")
    # The active tokens load into the choice; the one the agent uses is picked.
    option = form.locator("#token-select option").filter(has_text=re.compile(r"^ui \("))
    expect(option).to_have_count(1)
    form.locator("#token-select").select_option(label=option.inner_text())
    form.get_by_label("Queues").fill("etl, gpu")
    form.get_by_label("Slots per agent").fill("3")
    form.get_by_label("Namespace").fill("data-eu")
    form.get_by_label("Resource name prefix").fill("eu")
    secret_backend = "airflow.providers.hashicorp.secrets.vault.VaultBackend"
    xcom_backend = "airflow.providers.common.io.xcom.backend.XComObjectStorageBackend"
    form.get_by_label("Secrets backend").fill(secret_backend)
    form.get_by_label("XCom backend").fill(xcom_backend)
    form.get_by_role("button", name="Make values.yaml").click()
    commands = frame.get_by_test_id("commands")
    expect(commands).to_contain_text("helm install tether-agent <chart> -n data-eu -f values.yaml")
    expect(commands).to_contain_text("kubectl -n data-eu create secret generic tether-agent-token")
    with admin.expect_download() as download_info:
        frame.get_by_role("button", name="Download values.yaml").click()
    download = download_info.value
    assert download.suggested_filename == "values.yaml"
    text = Path(download.path()).read_text()
    # The very file `airflow tether agents values` prints for the same choices.
    assert text == (
        agent_values(
            plane_url=plane.url,
            namespace="data-eu",
            queues=["etl", "gpu"],
            slots=3,
            resource_name_prefix="eu",
            secret_backend=secret_backend,
            xcom_backend=xcom_backend,
        ).text
    )
    cli = plane.airflow(
        "tether", "agents", "values", "--namespace", "data-eu", "--queues", "etl,gpu", "--slots", "3",
        "--resource-name-prefix", "eu", "--secret-backend", secret_backend, "--xcom-backend", xcom_backend,
    )  # fmt: skip
    assert cli.stdout == text
    # This plane's base_url is a loopback address: the page says so, and the user sets the URL agents reach.
    expect(frame.locator("#value-notes")).to_contain_text("a loopback address agents in another network cannot reach")
    values = yaml.safe_load(text)
    values["planeURL"] = "https://airflow.corp.internal"
    objects = render(values, namespace="data-eu")
    for obj in objects:
        validate(obj)
    [spec] = pod_specs(objects)
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert env["TETHER_QUEUES"] == "etl,gpu" and env["TETHER_SLOTS"] == "3"
    _shoot(admin, frame, "register")

    # A file the chart would refuse is refused with the plane's sentence, and no token is made for it.
    form.locator("input[name=token_mode][value=new]").check()
    form.locator("#new-token-fields").get_by_label("Name").fill("data-eu")
    form.get_by_label("Namespace").fill("Data_EU")
    form.get_by_role("button", name="Make values.yaml").click()
    expect(frame.locator("#register-error")).to_contain_text("'Data_EU' is not a Kubernetes namespace name")
    http = plane.rest_client("admin", path="/tether/v1", timeout=10)
    assert "data-eu" not in [t["name"] for t in http.get("/tokens").json()]
    # A token made here is shown once, in the Secret's command.
    form.get_by_label("Namespace").fill("data-eu")
    form.get_by_role("button", name="Make values.yaml").click()
    expect(frame.get_by_test_id("secret")).to_have_value(_token_pattern())
    secret = frame.get_by_test_id("secret").input_value()
    expect(commands).to_contain_text(f"--from-literal=token={secret}")
    assert [e["actor"] for e in _audit(plane, "token.create") if e["after"]["name"] == "data-eu"] == ["admin"]


# -- Who may act ---------------------------------------------------------------------------------------------


def test_a_viewer_sees_the_pages_read_only_and_cannot_act(browser: Browser, plane: Plane, agent: AgentProcess) -> None:
    viewer = _log_in(browser, plane, "viewer")
    try:
        frame = _open(viewer, plane, "/plugin/tether-agents", "Agents")
        expect(frame.get_by_test_id("read-only")).to_be_visible()
        expect(frame.locator(f"tr[data-agent='{AGENT}']")).to_contain_text("healthy")
        expect(frame.get_by_role("button", name="Cordon")).to_have_count(0)
        frame = _open(viewer, plane, "/plugin/tether-tokens", "Agent Tokens")
        expect(frame.get_by_role("button", name="+ Agent Token")).to_have_count(0)
        expect(frame.get_by_role("button", name="Revoke")).to_have_count(0)
        frame = _open(viewer, plane, "/plugin/tether-ip-ranges", "Allowed IP Ranges")
        expect(frame.locator("#range-form")).to_have_count(0)
        _shoot(viewer, frame, "ip-ranges-viewer")
        # The API the page calls refuses the viewer's change, from the page itself too.
        status = frame.locator("body").evaluate(
            """async () => (await fetch('/tether/v1/agents/ui-agent/action', {method: 'POST',
                credentials: 'same-origin', headers: {'Content-Type': 'application/json'},
                body: JSON.stringify({action: 'CORDON', reason: 'viewer'})})).status"""
        )
        assert status == 403
        assert _agent(plane)["cordon_reason"] != "viewer"
        assert "viewer" not in [e["after"]["cordon_reason"] for e in _audit(plane, "agent.cordon")]
        assert "viewer" not in [e["actor"] for e in _audit(plane, "agent.cordon")]
    finally:
        viewer.context.close()


def test_a_change_with_the_session_cookie_from_another_origin_is_refused(admin: Page, plane: Plane) -> None:
    cookies = {c["name"]: c["value"] for c in admin.context.cookies(plane.url)}
    assert "_token" in cookies
    body = json.dumps({"name": "from-elsewhere"})
    foreign = httpx.post(
        f"{plane.url}/tether/v1/tokens",
        content=body,
        cookies=cookies,
        headers={
            "Origin": "https://attacker.example",
            "Sec-Fetch-Site": "cross-site",
            "Content-Type": "application/json",
        },
    )
    assert foreign.status_code == 403 and foreign.json()["reason"] == "cross_origin"
    form_post = httpx.post(
        f"{plane.url}/tether/v1/tokens", content=body, cookies=cookies, headers={"Content-Type": "text/plain"}
    )
    assert form_post.status_code == 422 and form_post.json()["reason"] == "cross_origin"
    http = plane.rest_client("admin", path="/tether/v1", timeout=10)
    assert "from-elsewhere" not in [t["name"] for t in http.get("/tokens").json()]
    # The same cookie from this origin is the page's own call, and goes through.
    own = httpx.post(
        f"{plane.url}/tether/v1/tokens",
        content=body,
        cookies=cookies,
        headers={"Origin": plane.url, "Sec-Fetch-Site": "same-origin", "Content-Type": "application/json"},
    )
    assert own.status_code == 201, own.text
