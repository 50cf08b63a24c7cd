"""DAG processing on agents, end to end: a plane with no DAG files and no DAG processor runs every DAG.

Real processes: Airflow's API server and scheduler (no ``airflow dag-processor``,
an empty DAG folder), a ``tether-agent dag-processor`` with a local bundle, a
second local bundle and a git bundle (a bare repository on disk), and a worker.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import create_pg_database, drop_pg_database
from tether.embedded import AgentProcess, Plane, start_agent, wait_until

HERE = Path(__file__).parent
GIT_DAG = """
from airflow.sdk import dag, task


@dag(dag_id="git_dag", schedule=None, catchup=False)
def git_dag():
    @task
    def {task}() -> str:
        return "{task}"

    {task}()


git_dag()
"""


@dataclass
class Remote:
    plane: Plane
    token: str
    local: Path
    other: Path
    repo: Path
    evidence: Path
    worker: AgentProcess
    processor: AgentProcess

    def api(self) -> httpx.Client:
        """Airflow's REST API as its admin."""
        return self.plane.rest_client()

    def dag(self, dag_id: str) -> dict[str, Any] | None:
        rows = self.plane.query(
            "SELECT dag_id, bundle_name, is_stale, description, relative_fileloc FROM dag WHERE dag_id = :d",
            d=dag_id,
        )
        return dict(rows[0]._mapping) if rows else None

    def versions(self, dag_id: str) -> int:
        return int(self.plane.query("SELECT count(*) FROM dag_version WHERE dag_id = :d", d=dag_id)[0][0])

    def import_errors(self) -> dict[str, str]:
        with self.api() as api:
            listed = api.get("/importErrors").json()["import_errors"]
        return {f"{e['bundle_name']}:{e['filename']}": e["stack_trace"] for e in listed}

    def commit(self, task: str) -> None:
        work = self.repo.parent / "work"
        (work / "git_dag.py").write_text(GIT_DAG.format(task=task))
        _git(work, "add", "git_dag.py")
        _git(work, "commit", "-q", "-m", f"git_dag: {task}")
        _git(work, "push", "-q", "origin", "main")


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=Tests", "-c", "user.email=tests@example.invalid", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def _bare_repo(root: Path) -> Path:
    bare = root / "dags.git"
    work = root / "work"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
    work.mkdir()
    _git(work, "init", "-q", "-b", "main")
    _git(work, "remote", "add", "origin", str(bare))
    (work / "git_dag.py").write_text(GIT_DAG.format(task="first"))
    _git(work, "add", "git_dag.py")
    _git(work, "commit", "-q", "-m", "git_dag: first")
    _git(work, "push", "-q", "origin", "main")
    return bare


def bundles_env(local: Path, other: Path, repo: Path) -> dict[str, str]:
    """What agents of both roles are given: the same bundles, fast to notice changes."""
    bundles = [
        {"name": "dags-folder", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
         "kwargs": {"path": str(local), "refresh_interval": 1}},
        {"name": "other-dags", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
         "kwargs": {"path": str(other), "refresh_interval": 1}},
        {"name": "git-dags", "classpath": "airflow.providers.git.bundles.git.GitDagBundle",
         "kwargs": {"repo_url": f"file://{repo}", "tracking_ref": "main", "refresh_interval": 1}},
    ]  # fmt: skip
    return {
        "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(bundles),
        # The connection git bundles look up; the repository needs no credentials.
        "AIRFLOW_CONN_GIT_DEFAULT": json.dumps({"conn_type": "git"}),
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "2",
        "AIRFLOW__DAG_PROCESSOR__BUNDLE_REFRESH_CHECK_INTERVAL": "1",
        "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "0",
    }


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def remote(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    root = tmp_path_factory.mktemp(f"remote-{request.param}")
    pg_url = None
    admin_url = request.getfixturevalue("pg_admin_url") if request.param == "postgres" else None
    if admin_url is not None:
        pg_url = conn = create_pg_database(admin_url)
    else:
        conn = f"sqlite:///{root / 'airflow.db'}"
    nothing = root / "plane-dags"
    nothing.mkdir()
    plane = Plane(
        home=root / "plane",
        dags_folder=nothing,
        sql_alchemy_conn=conn,
        extra_env={
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__TETHER__MAX_PARSE_RESULT_BYTES": str(2 * 1024 * 1024),
        },
    )
    local = shutil.copytree(HERE / "dags_remote", root / "agent-dags")
    other = root / "other-dags"  # empty until a test puts a file there
    other.mkdir()
    repo = _bare_repo(root / "git")
    evidence = root / "evidence"
    evidence.mkdir()
    env = bundles_env(local, other, repo)
    try:
        plane.migrate()
        token = plane.create_token("remote", scopes=("worker", "dag-processor"))
        plane.start(("api-server", "scheduler"))
        worker = start_agent(plane, "worker", token, env=env, queues="default", slots="4")
        processor = start_agent(
            plane,
            "parser",
            token,
            command="dag-processor",
            env={**env, "TETHER_TEST_EVIDENCE": str(evidence), "AIRFLOW_VAR_REMOTE_ONLY_VAR": "from-the-agent"},
        )
        for agent in (worker, processor):
            wait_until(lambda a=agent: a.health("/readyz") == 200, 120, f"agent {agent.name} ready")
        yield Remote(plane, token, local, other, repo, evidence, worker, processor)
    finally:
        plane.stop()
        if pg_url is not None and admin_url is not None:
            drop_pg_database(admin_url, pg_url)


def _dag(remote: Remote, dag_id: str, timeout: float = 120) -> dict[str, Any]:
    return wait_until(lambda: remote.dag(dag_id), timeout, f"DAG {dag_id} on the plane")  # type: ignore[no-any-return]


def test_a_dag_only_the_agent_has_runs_on_a_plane_without_dag_files(remote: Remote) -> None:
    assert list(remote.plane.dags_folder.iterdir()) == []
    assert "dag-processor" not in remote.plane.processes
    _dag(remote, "remote_hello")
    # The last line: Airflow may log a warning before the JSON.
    listed = json.loads(remote.plane.airflow("dags", "list", "-o", "json").stdout.strip().splitlines()[-1])
    assert "remote_hello" in {dag["dag_id"] for dag in listed}
    run_id = remote.plane.trigger("remote_hello")
    assert remote.plane.wait_for_run("remote_hello", run_id) == "success"
    ran_on = remote.plane.query("SELECT agent_name FROM tether_job WHERE run_id = :r", r=run_id)
    assert [row[0] for row in ran_on] == ["worker"]
    roles = json.loads(remote.plane.airflow("tether", "agents", "list", "-o", "json").stdout)
    assert {agent["name"]: agent["roles"] for agent in roles} == {"parser": ["dag-processor"], "worker": ["worker"]}


def test_variables_at_parse_time_come_from_the_agent(remote: Remote) -> None:
    assert _dag(remote, "remote_variable")["description"] == "parsed with remote_only_var=from-the-agent"


def test_the_code_tab_says_the_source_stays_with_the_agents(remote: Remote) -> None:
    _dag(remote, "remote_hello")
    with remote.api() as api:
        source = api.get("/dagSources/remote_hello").json()["content"]
    assert "The source of this DAG stays with the Tether agents" in source
    assert "hello from an agent" not in source


def test_a_commit_to_a_git_bundle_reaches_the_plane_as_a_new_version(remote: Remote) -> None:
    _dag(remote, "git_dag")
    assert remote.versions("git_dag") == 1
    first = remote.plane.trigger("git_dag")
    assert remote.plane.wait_for_run("git_dag", first) == "success"
    remote.commit("second")
    wait_until(lambda: remote.versions("git_dag") == 2, 120, "the second version of git_dag on the plane")
    run_id = remote.plane.trigger("git_dag")
    assert remote.plane.wait_for_run("git_dag", run_id) == "success"
    assert remote.plane.task_states("git_dag", run_id) == {"second": "success"}


def test_an_import_error_shows_on_the_plane_and_clears_when_fixed(remote: Remote) -> None:
    broken = remote.local / "broken.py"
    broken.write_text("from airflow.sdk import dag\n\ndef oops(:\n")
    errors = wait_until(lambda: remote.import_errors().get("dags-folder:broken.py"), 120, "the import error")
    assert "SyntaxError" in errors
    broken.write_text((HERE / "dags_remote" / "remote_hello.py").read_text().replace("remote_hello", "was_broken"))
    wait_until(lambda: "dags-folder:broken.py" not in remote.import_errors(), 120, "the import error cleared")
    assert not _dag(remote, "was_broken")["is_stale"]


def test_a_deleted_files_dag_goes_stale(remote: Remote) -> None:
    assert not _dag(remote, "remote_gone")["is_stale"]
    (remote.local / "remote_gone.py").unlink()
    wait_until(lambda: (remote.dag("remote_gone") or {}).get("is_stale"), 120, "remote_gone stale")


def test_a_dag_failure_callback_runs_on_the_agent(remote: Remote) -> None:
    _dag(remote, "remote_callback")
    run_id = remote.plane.trigger("remote_callback")
    assert remote.plane.wait_for_run("remote_callback", run_id) == "failed"
    evidence = remote.evidence / "dag_failure_callback.json"
    wait_until(evidence.exists, 120, "the failure callback's evidence")
    left = json.loads(evidence.read_text())
    assert left["run_id"] == run_id
    # A parsing process of the agent's DAG processor ran it; the plane has no DAG processor to run it.
    assert left["parent"] == remote.processor.process.pid
    assert "dag-processor" not in remote.plane.processes


def test_a_dag_id_another_bundle_owns_is_refused_and_stays_with_its_owner(remote: Remote) -> None:
    assert _dag(remote, "remote_hello")["bundle_name"] == "dags-folder"
    shutil.copy(HERE / "dags_remote_other" / "claim.py", remote.other / "claim.py")
    error = wait_until(lambda: remote.import_errors().get("other-dags:claim.py"), 120, "the refusal as import error")
    assert "'remote_hello' belongs to bundle 'dags-folder'" in error
    assert remote.dag("remote_hello")["bundle_name"] == "dags-folder"  # type: ignore[index]


def test_the_uis_reparse_request_reaches_the_agent(remote: Remote) -> None:
    _dag(remote, "remote_hello")
    with remote.api() as api:
        token = api.get("/dags/remote_hello/details").json()["file_token"]
        assert api.put(f"/parseDagFile/{token}").status_code == 201
    log = remote.processor.process.log_path
    wait_until(lambda: "Reparse requested: remote_hello.py" in log.read_text(), 60, "the reparse on the agent")


class FakeProcessor:
    """The test speaking the dag-processor protocol with a token of its own, as a hostile agent might."""

    def __init__(self, remote: Remote, name: str, roles: list[str]) -> None:
        self.token = remote.plane.create_token(name, scopes=roles)
        self.http = httpx.Client(
            base_url=f"{remote.plane.url}/tether/v1",
            headers={"Authorization": f"Bearer {self.token}", "X-Tether-Protocol": "2"},
            timeout=30,
        )
        self.incarnation = str(uuid.uuid4())
        registered = self.http.post(
            "/agents/register",
            json={
                "name": name,
                "incarnation": self.incarnation,
                "tether_version": "0.2.0",
                "airflow_version": "3",
                "python_version": "3.11",
                "hostname": "h",
                "roles": roles,
                "queues": ["nowhere"] if "worker" in roles else [],
                "slots": 1,
            },
        )
        assert registered.status_code == 200, registered.text
        self.base = f"/agents/{registered.json()['agent_id']}/dag-processing"

    def post(self, tail: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        if body is not None:
            kwargs["json"] = {"incarnation": self.incarnation, **body}
        return self.http.post(f"{self.base}/{tail}", **kwargs)


def _result(serialized: dict[str, Any], *, seq: int = 1, **extra: Any) -> dict[str, Any]:
    from airflow.serialization.serialized_objects import LazyDeserializedDAG

    dag_hash = LazyDeserializedDAG(data=serialized).hash if "__version" in serialized else "ab" * 16
    return {
        "bundle_name": "fake-bundle",
        "relative_fileloc": "fake.py",
        "seq": seq,
        "run_duration": 0.1,
        "dags": [{"dag_id": "fake_dag", "hash": dag_hash, "data": serialized}],
        "digest": "cd" * 32,
        **extra,
    }


def _counts(remote: Remote) -> tuple[int, ...]:
    tables = ("dag", "serialized_dag", "dag_version", "import_error", "tether_dag_file")
    return tuple(int(remote.plane.query(f"SELECT count(*) FROM {table}")[0][0]) for table in tables)


def test_bad_parse_results_get_a_4xx_and_change_nothing(remote: Remote) -> None:
    _dag(remote, "remote_hello")
    data = remote.plane.query("SELECT data FROM serialized_dag WHERE dag_id = 'remote_hello'")[0][0]
    serialized = json.loads(data) if isinstance(data, str) else data
    serialized["dag"]["dag_id"], serialized["dag"]["relative_fileloc"] = "fake_dag", "fake.py"

    worker = FakeProcessor(remote, "fake-worker", ["worker"])
    refused = worker.post("bundles", {"bundles": [{"name": "fake-bundle"}]})
    assert (refused.status_code, refused.json()["reason"]) == (403, "scope_missing")
    assert "not dag-processor: use a token created with --scope dag-processor" in refused.json()["detail"]

    fake = FakeProcessor(remote, "fake-parser", ["dag-processor"])
    taken = fake.post("bundles", {"bundles": [{"name": "dags-folder"}]})
    assert (taken.status_code, taken.json()["reason"]) == (403, "bundle_not_allowed")
    assert fake.post("bundles", {"bundles": [{"name": "fake-bundle"}]}).status_code == 200
    before = _counts(remote)

    too_big = fake.post("results", _result(serialized, padding="x" * (3 * 1024 * 1024)))
    bomb = fake.post(
        "results",
        content=gzip.compress(b'{"a": "' + b"0" * (8 * 1024 * 1024) + b'"}'),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    not_json = fake.post("results", content=b"{not json", headers={"Content-Type": "application/json"})
    unknown = fake.post("results", _result(serialized, surprise=1))
    not_a_dag = fake.post("results", _result({"__version": 3, "dag": {"dag_id": "fake_dag"}}))
    mislabelled = fake.post("results", _result(serialized | {"dag": {**serialized["dag"], "dag_id": "other"}}))
    other_bundle = fake.post("results", _result(serialized, bundle_name="dags-folder"))
    answers = [
        (r.status_code, r.json().get("reason"))
        for r in (too_big, bomb, not_json, unknown, not_a_dag, mislabelled, other_bundle)
    ]
    assert answers == [
        (413, "body_too_large"),
        (413, "body_too_large"),
        (422, "invalid_request"),
        (422, "invalid_request"),
        (422, "invalid_dag"),
        (422, "invalid_dag"),
        (403, "bundle_not_allowed"),
    ]
    assert _counts(remote) == before

    # The same result twice: written once; the second is older than what is written, and dropped.
    assert fake.post("results", _result(serialized)).json() == {"resend": [], "stale": False, "deferred": []}
    written = _counts(remote)
    assert written != before
    assert fake.post("results", _result(serialized)).json() == {"resend": [], "stale": True, "deferred": []}
    assert _counts(remote) == written
