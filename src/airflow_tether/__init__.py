"""The import name Airflow expects for the ``airflow-tether`` distribution; Tether's code is in ``tether``.

With ``[core] load_examples`` on (Airflow's default), every component that
loads DAG bundles imports each installed provider under its distribution name
with dashes made underscores, to look for an ``example_dags`` folder beside it.
Without this package that import failed, and the API server, scheduler, DAG
processor, agents and every task logged it as an error with a traceback. It
holds no example DAGs: Tether's examples run on agents, and a deployment that
shows Airflow's examples should not get Tether's as well.
"""
