"""Unchanged DAG files cost nothing: parsed again and again on the agent, written once on the plane.

200 DAG files in an agent's bundle, parsed every two seconds: once all are on the
plane, ten more parse loops send nothing and write no serialized DAG or DAG version.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from tests.conftest import create_pg_database, drop_pg_database
from tether.embedded import AgentProcess, Plane, start_agent, wait_until

FILES = 200
LOOPS = 10
DAG_FILE = """
from airflow.sdk import dag, task


@dag(dag_id="many_{i:03d}", schedule=None, catchup=False)
def many():
    @task
    def noop() -> None:
        pass

    noop()


many()
"""


def _metric(agent: AgentProcess, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", agent.metrics(), re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_unchanged_files_are_written_once_and_not_sent_again(tmp_path: Path, pg_admin_url: str) -> None:
    dags = tmp_path / "many"
    dags.mkdir()
    for i in range(FILES):
        (dags / f"many_{i:03d}.py").write_text(DAG_FILE.format(i=i))
    (tmp_path / "nothing").mkdir()
    url = create_pg_database(pg_admin_url)
    plane = Plane(home=tmp_path / "plane", dags_folder=tmp_path / "nothing", sql_alchemy_conn=url)
    try:
        plane.migrate()
        token = plane.create_token("many", scopes=("dag-processor",))
        plane.start(("api-server", "scheduler"))
        parser = start_agent(
            plane,
            "parser",
            token,
            command="dag-processor",
            env={
                "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
                "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "2",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "0",
            },
        )

        def serialized() -> list[tuple[str, object]]:
            return [tuple(r) for r in plane.query("SELECT dag_id, last_updated FROM serialized_dag ORDER BY dag_id")]

        wait_until(lambda: len(serialized()) == FILES, 300, f"{FILES} DAGs on the plane")
        first = serialized()
        versions = plane.query("SELECT count(*) FROM dag_version")[0][0]
        sent = _metric(parser, 'tether_agent_dag_files_total{result="sent"}')
        uploaded = _metric(parser, "tether_agent_dag_upload_bytes_total")
        unchanged = _metric(parser, 'tether_agent_dag_files_total{result="unchanged"}')
        started = time.monotonic()
        # The positive control: parsing goes on, and each file's result is found unchanged.
        wait_until(
            lambda: _metric(parser, 'tether_agent_dag_files_total{result="unchanged"}') >= unchanged + FILES * LOOPS,
            600,
            f"{LOOPS} more parse loops",
        )
        elapsed = time.monotonic() - started
        assert serialized() == first
        assert plane.query("SELECT count(*) FROM dag_version")[0][0] == versions
        assert _metric(parser, 'tether_agent_dag_files_total{result="sent"}') == sent
        assert _metric(parser, "tether_agent_dag_upload_bytes_total") == uploaded
        print(
            f"\n{FILES} files: first loop sent {uploaded / 1024:.0f} KiB; {LOOPS} more loops in {elapsed:.0f}s "
            "sent 0 bytes of results and wrote no serialized DAG"
        )
    finally:
        plane.stop()
        drop_pg_database(pg_admin_url, url)
