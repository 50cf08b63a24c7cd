"""Airflow's logging configuration with Tether reading the logs of tries its agents ran.

On the plane's API servers (and harmlessly on its other processes)::

    [logging]
    logging_config_class = tether.plane.log_config.LOGGING_CONFIG

Airflow's own configuration is kept as it is, handlers and all; the remote task
log Airflow would use (S3, GCS, ... or none) is wrapped, so that the tries that
did not run on agents are read from it as before. A deployment with a logging
configuration of its own sets ``REMOTE_TASK_LOG = TetherRemoteLogIO(wrapped=...)``
in its module the same way.
"""

from __future__ import annotations

from airflow.config_templates import airflow_local_settings

from tether.plane.task_logs import TetherRemoteLogIO

LOGGING_CONFIG = airflow_local_settings.DEFAULT_LOGGING_CONFIG
REMOTE_TASK_LOG = TetherRemoteLogIO(wrapped=airflow_local_settings.REMOTE_TASK_LOG)
DEFAULT_REMOTE_CONN_ID = airflow_local_settings.DEFAULT_REMOTE_CONN_ID
