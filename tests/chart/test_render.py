"""What the chart renders, across the values users give it."""

from __future__ import annotations

import base64
import json
from typing import Any

import helm_python as helm
import pytest

from tests.chart.rendering import (
    CHART_DIR,
    KUBERNETES_VERSION,
    NAMESPACE,
    RELEASE,
    SCHEMA,
    TOKEN,
    by_kind,
    env_of,
    pod_specs,
    render,
    render_files,
    schema_entry,
    validate,
    values,
)

THREE_WORKERS = [
    {"name": "default", "queues": ["default"]},
    {"name": "etl", "queues": ["etl", "etl-heavy"], "replicas": 3, "slots": 8, "terminationGracePeriodSeconds": 3600},
    {
        "name": "gpu",
        "queues": ["gpu"],
        "slots": 1,
        "drainTimeoutSeconds": 100,
        "terminationGracePeriodSeconds": 120,
        "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "8Gi"}, "requests": {"cpu": "2", "memory": "8Gi"}},
        "nodeSelector": {"accelerator": "gpu"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]
                }
            }
        },
        "env": [{"name": "CUDA_VISIBLE_DEVICES", "value": "0"}],
        "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
        "probes": {"liveness": {"periodSeconds": 30}},
    },
]

BUNDLES = [
    {
        "name": "dags",
        "classpath": "airflow.providers.git.bundles.git.GitDagBundle",
        "kwargs": {"git_conn_id": "dags_repo", "tracking_ref": "main"},
    }
]

DAG_PROCESSOR = {
    "enabled": True,
    "replicas": 2,
    "shareDagSource": True,
    "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
    "env": [{"name": "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL", "value": "60"}],
    "probes": {"readiness": {"periodSeconds": 20}},
    "volumes": [{"name": "ssh", "secret": {"secretName": "git-ssh-key", "defaultMode": 0o400}}],
    "volumeMounts": [{"name": "ssh", "mountPath": "/home/tether/.ssh", "readOnly": True}],
    "nodeSelector": {"pool": "parsing"},
    "tolerations": [{"key": "parsing", "operator": "Exists", "effect": "NoSchedule"}],
    "podSecurityContext": {"supplementalGroups": [50010]},
    "containerSecurityContext": {"seLinuxOptions": {"level": "s0:c123,c456"}},
}

TRIGGERER = {
    "enabled": True,
    "replicas": 3,
    "capacity": 250,
    "queues": ["default", "sensors"],
    "taskLogs": "local",
    "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
    "terminationGracePeriodSeconds": 45,
    "env": [{"name": "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC", "value": "10"}],
    "probes": {"liveness": {"failureThreshold": 6}},
    "volumes": [{"name": "plugins", "configMap": {"name": "trigger-plugins"}}],
    "volumeMounts": [{"name": "plugins", "mountPath": "/opt/plugins", "readOnly": True}],
    "nodeSelector": {"pool": "triggers"},
    "tolerations": [{"key": "triggers", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"tether-agent/role": "triggerer"}},
                    },
                }
            ]
        }
    },
    "podSecurityContext": {"supplementalGroups": [50020]},
    "containerSecurityContext": {"seLinuxOptions": {"level": "s0:c7,c8"}},
}

MATRIX: dict[str, dict[str, Any]] = {
    "minimal": values(),
    "three-workers": values(workers=THREE_WORKERS),
    "token-secret-name": values(agentToken=None, agentTokenSecretName="agent-token"),
    "token-file": values(
        agentToken=None,
        agentTokenFile="/mnt/secrets-store/token",
        workers=[
            {
                "name": "default",
                "queues": ["default"],
                "volumes": [
                    {
                        "name": "secrets-store",
                        "csi": {"driver": "secrets-store.csi.k8s.io", "readOnly": True},
                    }
                ],
                "volumeMounts": [{"name": "secrets-store", "mountPath": "/mnt/secrets-store", "readOnly": True}],
            }
        ],
    ),
    "pull-secret-data": values(imagePullSecretData=json.dumps({"auths": {"registry.example.com": {"auth": "dTpw"}}})),
    "pull-secret-name": values(imagePullSecretName="registry-credentials"),
    "proxy-and-ca-configmap": values(
        proxy={"httpProxy": "http://proxy:3128", "httpsProxy": "http://proxy:3128", "noProxy": "10.0.0.0/8,.svc"},
        caBundle={"configMapName": "corp-ca", "key": "bundle.pem"},
    ),
    "ca-secret-and-client-cert": values(caBundle={"secretName": "corp-ca"}, clientCertSecretName="agent-client-tls"),
    "preflight": values(preflight={"enabled": True}),
    "dag-processor": values(
        dagProcessor=DAG_PROCESSOR,
        dagBundleConfigList=BUNDLES,
        workers=THREE_WORKERS,
        preflight={"enabled": True},
        proxy={"httpsProxy": "http://proxy:3128"},
        caBundle={"secretName": "corp-ca"},
        commonEnv=[{"name": "AIRFLOW__CORE__DEFAULT_TIMEZONE", "value": "Europe/Paris"}],
    ),
    "triggerer": values(
        triggerer=TRIGGERER,
        dagProcessor={"enabled": True},
        dagBundleConfigList=BUNDLES,
        workers=THREE_WORKERS,
        preflight={"enabled": True},
        proxy={"httpsProxy": "http://proxy:3128"},
        caBundle={"secretName": "corp-ca"},
        clientCertSecretName="agent-client-tls",
        secretBackendKwargs={"url": "https://vault:8200"},
        xcomBackendSettings={"common.io": {"xcom_objectstorage_path": "s3://bucket/xcom"}},
        commonEnv=[{"name": "AIRFLOW__CORE__DEFAULT_TIMEZONE", "value": "Europe/Paris"}],
    ),
    "create-namespace": values(createNamespace=True, namespace="data-eu"),
    "sentinel": values(
        sentinel={"enabled": True, "tokenSecretName": "sentinel-token", "resources": {"limits": {"memory": "256Mi"}}},
        caBundle={"secretName": "corp-ca"},
        clientCertSecretName="agent-client-tls",
    ),
    "autoscaling": values(
        workers=[
            {"name": "etl", "queues": ["etl"], "slots": 8, "autoscaling": {"enabled": True, "maxReplicas": 20}},
            {"name": "default", "queues": ["default"]},
        ]
    ),
    "no-pdb-no-metrics-existing-sa": values(
        podDisruptionBudget={"enabled": False},
        metricsService={"enabled": False},
        serviceAccount={"create": False, "name": "agents"},
    ),
    "everything-else": values(
        resourceNamePrefix="eu",
        image={"repository": "registry.example.com/data/tether-agent", "tag": "0.1.0-dags3", "pullPolicy": "Always"},
        secretBackendKwargs={"url": "https://vault:8200", "mount_point": "airflow"},
        xcomBackendSettings={
            "common.io": {"xcom_objectstorage_path": "s3://bucket/xcom", "xcom_objectstorage_threshold": 1024}
        },
        dagBundleConfigList=[
            {
                "name": "dags",
                "classpath": "airflow.providers.git.bundles.git.GitDagBundle",
                "kwargs": {"tracking_ref": "main"},
            }
        ],
        commonEnv=[{"name": "AIRFLOW__CORE__DEFAULT_TIMEZONE", "value": "Europe/Paris"}],
        labels={"team": "data"},
        annotations={"owner": "data-platform"},
        logLevel="DEBUG",
        healthPort=9100,
        serviceAccount={"annotations": {"iam.gke.io/gcp-service-account": "agents@p.iam.gserviceaccount.com"}},
        metricsService={"port": 9100, "annotations": {"prometheus.io/scrape": "true"}},
        podDisruptionBudget={"maxUnavailable": "50%"},
    ),
}


@pytest.fixture(params=sorted(MATRIX), scope="module")
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(MATRIX[request.param])


def test_every_object_is_valid_for_kubernetes(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    assert objects
    for obj in objects:
        validate(obj)


def test_every_object_is_in_the_agents_namespace(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    case, objects = rendered
    expected = MATRIX[case].get("namespace") or NAMESPACE
    for obj in objects:
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] == expected
        else:
            assert obj["metadata"]["namespace"] == expected, obj["metadata"]["name"]


def test_pods_meet_the_restricted_pod_security_standard(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    for spec in pod_specs(objects):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True
        assert pod["runAsUser"] == 50000
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        # Only the sentinel reads the Kubernetes API (pods and events of its namespace).
        assert spec["automountServiceAccountToken"] is (spec["containers"][0]["name"] == "sentinel")
        for container in spec["containers"] + spec.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["runAsNonRoot"] is True
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert not sc.get("privileged")
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/tmp", "/home/tether"} <= mounts
        volume_kinds = {key for volume in spec["volumes"] for key in volume if key != "name"}
        assert "hostPath" not in volume_kinds


def test_agents_have_no_inbound_service_but_metrics(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    services = by_kind(objects, "Service")
    assert len(services) <= 1
    for service in services:
        assert service["spec"]["type"] == "ClusterIP"
        assert [p["name"] for p in service["spec"]["ports"]] == ["metrics"]
    assert not by_kind(objects, "Ingress")


def test_agents_never_get_a_metadata_database_connection(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    for spec in pod_specs(objects):
        for container in spec["containers"] + spec.get("initContainers", []):
            names = set(env_of(container))
            assert not any("SQL_ALCHEMY_CONN" in name for name in names), names


def test_default_install_objects() -> None:
    objects = render(values())
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert kinds == [
        ("Deployment", f"{RELEASE}-default"),
        ("PodDisruptionBudget", f"{RELEASE}-default"),
        ("Secret", f"{RELEASE}-backends"),
        ("Secret", f"{RELEASE}-token"),
        ("Service", f"{RELEASE}-metrics"),
        ("ServiceAccount", f"{RELEASE}-agent"),
    ]


def test_a_worker_gets_the_schema_defaults_it_leaves_out() -> None:
    defaults = {
        k: schema_entry(v)["default"] for k, v in SCHEMA["properties"]["workers"]["items"]["properties"].items()
    }
    objects = render(values(workers=[{"name": "etl", "queues": ["etl"]}]))
    [deployment] = by_kind(objects, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    [agent] = spec["containers"]
    env = env_of(agent)
    assert deployment["spec"]["replicas"] == defaults["replicas"]
    assert spec["terminationGracePeriodSeconds"] == defaults["terminationGracePeriodSeconds"]
    assert env["TETHER_SLOTS"] == str(defaults["slots"])
    assert defaults["drainTimeoutSeconds"] is None
    assert env["TETHER_DRAIN_TIMEOUT"] == str(defaults["terminationGracePeriodSeconds"] - 30)
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    for probe in ("liveness", "readiness"):
        rendered = {k: v for k, v in agent[f"{probe}Probe"].items() if k != "httpGet"}
        assert rendered == defaults["probes"][probe]
    assert "resources" not in agent and "nodeSelector" not in spec


def test_each_worker_has_its_own_deployment_queues_and_drain() -> None:
    objects = render(values(workers=THREE_WORKERS))
    deployments = {d["metadata"]["name"]: d for d in by_kind(objects, "Deployment")}
    assert sorted(deployments) == [f"{RELEASE}-default", f"{RELEASE}-etl", f"{RELEASE}-gpu"]
    expected = {
        "etl": ("etl,etl-heavy", "8", "3570", 3600, 3),
        "gpu": ("gpu", "1", "100", 120, 1),
        "default": ("default", "4", "570", 600, 1),
    }
    for worker, (queues, slots, drain, grace, replicas) in expected.items():
        deployment = deployments[f"{RELEASE}-{worker}"]
        spec = deployment["spec"]["template"]["spec"]
        env = env_of(spec["containers"][0])
        assert (env["TETHER_QUEUES"], env["TETHER_SLOTS"], env["TETHER_DRAIN_TIMEOUT"]) == (queues, slots, drain)
        assert spec["terminationGracePeriodSeconds"] == grace
        assert float(drain) < grace
        assert deployment["spec"]["replicas"] == replicas
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector["tether-agent/worker"] == worker
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    gpu = deployments[f"{RELEASE}-gpu"]["spec"]["template"]["spec"]
    assert gpu["nodeSelector"] == {"accelerator": "gpu"}
    assert gpu["containers"][0]["livenessProbe"]["periodSeconds"] == 30
    assert gpu["containers"][0]["livenessProbe"]["failureThreshold"] == 4
    assert env_of(gpu["containers"][0])["CUDA_VISIBLE_DEVICES"] == "0"
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in gpu["containers"][0]["volumeMounts"]
    pdbs = {p["metadata"]["name"]: p for p in by_kind(objects, "PodDisruptionBudget")}
    assert sorted(pdbs) == sorted(deployments)
    for name, pdb in pdbs.items():
        assert pdb["spec"]["selector"]["matchLabels"] == deployments[name]["spec"]["selector"]["matchLabels"]


def test_metrics_service_selects_the_agents_health_port() -> None:
    objects = render(values(workers=THREE_WORKERS))
    [service] = by_kind(objects, "Service")
    for deployment in by_kind(objects, "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        [agent] = deployment["spec"]["template"]["spec"]["containers"]
        assert agent["ports"] == [{"name": "health", "containerPort": 8790, "protocol": "TCP"}]
    assert service["spec"]["ports"][0]["targetPort"] == "health"


def _deployments(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in by_kind(objects, "Deployment")}


DAG_PROCESSOR_NAME = f"{RELEASE}-dag-processor"
WORKER_ONLY_ENV = {"TETHER_QUEUES", "TETHER_SLOTS", "TETHER_DRAIN_TIMEOUT", "TETHER_TASK_LOGS"}


def test_a_worker_group_keeps_its_task_logs_when_told() -> None:
    workers = [{"name": "ship", "queues": ["a"]}, {"name": "keep", "queues": ["b"], "taskLogs": "local"}]
    deployments = _deployments(render(values(workers=workers)))
    logs = {
        name: env_of(d["spec"]["template"]["spec"]["containers"][0])["TETHER_TASK_LOGS"]
        for name, d in deployments.items()
    }
    assert logs == {f"{RELEASE}-ship": "ship", f"{RELEASE}-keep": "local"}


def test_the_dag_processor_is_absent_unless_enabled() -> None:
    for vals in (values(), values(dagProcessor={"enabled": False, "shareDagSource": True})):
        objects = render(vals)
        assert all("dag-processor" not in o["metadata"]["name"] for o in objects)
        assert "DAG processor" not in render_files(vals)["tether-agent/templates/NOTES.txt"]
    # Its name is free for a worker while it is off.
    worker = render(values(workers=[{"name": "dag-processor", "queues": ["parse"]}]))
    assert [d["metadata"]["name"] for d in by_kind(worker, "Deployment")] == [DAG_PROCESSOR_NAME]


def test_the_dag_processor_runs_its_command_with_the_agents_settings() -> None:
    objects = render(MATRIX["dag-processor"])
    deployments = _deployments(objects)
    processor = deployments.pop(DAG_PROCESSOR_NAME)
    spec = processor["spec"]["template"]["spec"]
    [agent] = spec["containers"]
    assert (agent["command"], agent["args"]) == (["tether-agent"], ["dag-processor"])
    assert processor["spec"]["replicas"] == 2
    assert spec["terminationGracePeriodSeconds"] == 60
    env = env_of(agent)
    assert env["TETHER_SHARE_DAG_SOURCE"] == "true"
    assert json.loads(env["AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST"]) == BUNDLES
    assert env["AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL"] == "60"
    # Queues, slots and the drain are a worker's: the DAG processor takes no tasks.
    assert WORKER_ONLY_ENV.isdisjoint(env)

    # Everything else is what a worker gets: token, plane, backends, bundles, proxy, CA, common env.
    worker = deployments[f"{RELEASE}-default"]["spec"]["template"]["spec"]
    [worker_agent] = worker["containers"]
    worker_env = {k: v for k, v in env_of(worker_agent).items() if k not in WORKER_ONLY_ENV}
    own_env = {"TETHER_SHARE_DAG_SOURCE", "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL"}
    assert {k: v for k, v in env.items() if k not in own_env} == worker_env
    assert worker["volumes"] == [v for v in spec["volumes"] if v["name"] != "ssh"]
    assert {"name": "ssh", "mountPath": "/home/tether/.ssh", "readOnly": True} in agent["volumeMounts"]
    assert agent["livenessProbe"] == worker_agent["livenessProbe"]
    assert agent["readinessProbe"]["periodSeconds"] == 20
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert agent["resources"] == DAG_PROCESSOR["resources"]
    assert spec["nodeSelector"] == {"pool": "parsing"}
    assert spec["tolerations"] == DAG_PROCESSOR["tolerations"]

    # The same security contexts, with the DAG processor's own additions merged over them.
    assert spec["securityContext"] == {**worker["securityContext"], "supplementalGroups": [50010]}
    assert agent["securityContext"] == {
        **worker_agent["securityContext"],
        "seLinuxOptions": {"level": "s0:c123,c456"},
    }
    assert agent["securityContext"]["readOnlyRootFilesystem"] is True

    [preflight] = spec["initContainers"]
    assert preflight["args"] == ["check"]
    assert preflight["env"] == agent["env"]


def test_the_dag_processor_gets_the_schema_defaults() -> None:
    defaults = SCHEMA["properties"]["dagProcessor"]["default"]
    assert defaults["enabled"] is False
    processor = _deployments(render(values(dagProcessor={"enabled": True})))[DAG_PROCESSOR_NAME]
    spec = processor["spec"]["template"]["spec"]
    [agent] = spec["containers"]
    assert processor["spec"]["replicas"] == defaults["replicas"]
    assert spec["terminationGracePeriodSeconds"] == defaults["terminationGracePeriodSeconds"]
    assert env_of(agent)["TETHER_SHARE_DAG_SOURCE"] == "false"
    # Empty: Airflow's default bundle, as for the workers.
    assert "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST" not in env_of(agent)
    for probe in ("liveness", "readiness"):
        rendered = {k: v for k, v in agent[f"{probe}Probe"].items() if k != "httpGet"}
        assert rendered == defaults["probes"][probe]
    assert "resources" not in agent and "nodeSelector" not in spec


def test_the_dag_processor_is_selected_apart_from_workers_and_by_the_metrics_service() -> None:
    objects = render(MATRIX["dag-processor"])
    [service] = by_kind(objects, "Service")
    pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in _deployments(objects).items()}
    pdbs = {
        p["metadata"]["name"]: p["spec"]["selector"]["matchLabels"] for p in by_kind(objects, "PodDisruptionBudget")
    }
    assert DAG_PROCESSOR_NAME in pdbs
    for name, selector in pdbs.items():
        assert selector == _deployments(objects)[name]["spec"]["selector"]["matchLabels"]
        # Each Deployment's selector matches its own pods and no other Deployment's.
        assert [pod for pod, labels in pods.items() if selector.items() <= labels.items()] == [name]
    for labels in pods.values():
        assert service["spec"]["selector"].items() <= labels.items()
    notes = render_files(MATRIX["dag-processor"])["tether-agent/templates/NOTES.txt"]
    assert "DAG processor: 2 agent(s) parsing the DAG bundles dags" in notes


TRIGGERER_NAME = f"{RELEASE}-triggerer"
TRIGGERER_ENV = {"TETHER_QUEUES", "TETHER_TRIGGER_CAPACITY", "TETHER_TASK_LOGS"}


def test_the_triggerer_is_absent_unless_enabled() -> None:
    for vals in (values(), values(triggerer={"enabled": False, "capacity": 10})):
        objects = render(vals)
        assert all("triggerer" not in o["metadata"]["name"] for o in objects)
        assert "triggerer" not in render_files(vals)["tether-agent/templates/NOTES.txt"]
        for spec in pod_specs(objects):
            assert spec["containers"][0]["args"] != ["triggerer"]
            assert "TETHER_TRIGGER_CAPACITY" not in env_of(spec["containers"][0])
    # Its name is free for a worker while it is off.
    worker = render(values(workers=[{"name": "triggerer", "queues": ["sensors"]}]))
    [deployment] = by_kind(worker, "Deployment")
    assert deployment["metadata"]["name"] == TRIGGERER_NAME
    assert deployment["spec"]["template"]["spec"]["containers"][0]["args"] == ["run"]


def test_the_triggerer_runs_its_command_with_the_agents_settings() -> None:
    objects = render(MATRIX["triggerer"])
    deployments = _deployments(objects)
    triggerer = deployments.pop(TRIGGERER_NAME)
    spec = triggerer["spec"]["template"]["spec"]
    [agent] = spec["containers"]
    assert (agent["command"], agent["args"]) == (["tether-agent"], ["triggerer"])
    assert triggerer["spec"]["replicas"] == 3
    assert spec["terminationGracePeriodSeconds"] == 45
    env = env_of(agent)
    assert env["TETHER_TRIGGER_CAPACITY"] == "250"
    assert env["TETHER_QUEUES"] == "default,sensors"
    assert env["TETHER_TASK_LOGS"] == "local"
    assert env["AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC"] == "10"
    # Slots and the drain are a worker's, sharing DAG source the DAG processor's.
    assert {"TETHER_SLOTS", "TETHER_DRAIN_TIMEOUT", "TETHER_SHARE_DAG_SOURCE"}.isdisjoint(env)

    # Trigger code lives with the DAG code: everything else is what a worker gets, the token, plane,
    # both backends and their kwargs Secret, the DAG bundles, proxy, CA, client certificate, common env.
    worker = deployments[f"{RELEASE}-default"]["spec"]["template"]["spec"]
    [worker_agent] = worker["containers"]
    shared = {k: v for k, v in env_of(worker_agent).items() if k not in WORKER_ONLY_ENV}
    own_env = TRIGGERER_ENV | {"AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC"}
    assert {k: v for k, v in env.items() if k not in own_env} == shared
    assert json.loads(env["AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST"]) == BUNDLES
    assert env["AIRFLOW__SECRETS__BACKEND"] == MATRIX["triggerer"]["secretBackend"]
    assert env["AIRFLOW__SECRETS__BACKEND_KWARGS"] == {
        "secretKeyRef": {"name": f"{RELEASE}-backends", "key": "secretBackendKwargs"}
    }
    assert env["AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_PATH"] == "s3://bucket/xcom"
    assert env["AIRFLOW__CORE__DEFAULT_TIMEZONE"] == "Europe/Paris"
    assert env["HTTPS_PROXY"] == "http://proxy:3128"
    assert env["TETHER_CA_BUNDLE"] == "/etc/tether/ca/ca.crt"
    assert env["TETHER_CLIENT_CERT"].endswith("/tls.crt")
    assert worker["volumes"] == [v for v in spec["volumes"] if v["name"] != "plugins"]
    assert {"name": "plugins", "mountPath": "/opt/plugins", "readOnly": True} in agent["volumeMounts"]
    assert agent["readinessProbe"] == worker_agent["readinessProbe"]
    assert agent["livenessProbe"]["failureThreshold"] == 6
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert agent["resources"] == TRIGGERER["resources"]
    assert agent["image"] == worker_agent["image"]
    assert spec["nodeSelector"] == {"pool": "triggers"}
    assert spec["tolerations"] == TRIGGERER["tolerations"]
    assert spec["affinity"] == TRIGGERER["affinity"]
    assert spec["serviceAccountName"] == worker["serviceAccountName"]

    # The same security contexts, with the triggerer's own additions merged over them.
    assert spec["securityContext"] == {**worker["securityContext"], "supplementalGroups": [50020]}
    assert agent["securityContext"] == {**worker_agent["securityContext"], "seLinuxOptions": {"level": "s0:c7,c8"}}
    assert agent["securityContext"]["readOnlyRootFilesystem"] is True

    [preflight] = spec["initContainers"]
    assert preflight["args"] == ["check"]
    assert preflight["env"] == agent["env"]
    assert preflight["resources"] == agent["resources"]


def test_the_triggerer_gets_the_schema_defaults() -> None:
    defaults = SCHEMA["properties"]["triggerer"]["default"]
    assert defaults["enabled"] is False
    # Two by default, so one can take the other's triggers; each runs Airflow's default capacity.
    assert (defaults["replicas"], defaults["capacity"]) == (2, 1000)
    triggerer = _deployments(render(values(triggerer={"enabled": True})))[TRIGGERER_NAME]
    spec = triggerer["spec"]["template"]["spec"]
    [agent] = spec["containers"]
    env = env_of(agent)
    assert triggerer["spec"]["replicas"] == defaults["replicas"]
    assert spec["terminationGracePeriodSeconds"] == defaults["terminationGracePeriodSeconds"] == 60
    assert env["TETHER_TRIGGER_CAPACITY"] == str(defaults["capacity"])
    assert env["TETHER_QUEUES"] == ",".join(defaults["queues"]) == "default"
    assert env["TETHER_TASK_LOGS"] == defaults["taskLogs"] == "ship"
    assert "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST" not in env
    for probe in ("liveness", "readiness"):
        rendered = {k: v for k, v in agent[f"{probe}Probe"].items() if k != "httpGet"}
        assert rendered == defaults["probes"][probe]
    assert "resources" not in agent and "nodeSelector" not in spec and "affinity" not in spec
    assert "initContainers" not in spec


def test_the_triggerer_capacity_is_rendered_as_a_whole_number() -> None:
    for capacity in (1, 1000, 2_000_000):
        triggerer = _deployments(render(values(triggerer={"enabled": True, "capacity": capacity})))[TRIGGERER_NAME]
        env = env_of(triggerer["spec"]["template"]["spec"]["containers"][0])
        assert env["TETHER_TRIGGER_CAPACITY"] == str(capacity)


def test_each_role_is_selected_apart_and_has_its_disruption_budget() -> None:
    objects = render(MATRIX["triggerer"])
    deployments = _deployments(objects)
    assert {TRIGGERER_NAME, DAG_PROCESSOR_NAME} <= set(deployments)
    [service] = by_kind(objects, "Service")
    pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()}
    assert pods[TRIGGERER_NAME]["tether-agent/role"] == "triggerer"
    pdbs = {
        p["metadata"]["name"]: p["spec"]["selector"]["matchLabels"] for p in by_kind(objects, "PodDisruptionBudget")
    }
    assert sorted(pdbs) == sorted(deployments)
    for name, selector in pdbs.items():
        assert selector == deployments[name]["spec"]["selector"]["matchLabels"]
        # Each Deployment's selector matches its own pods and no other Deployment's.
        assert [pod for pod, labels in pods.items() if selector.items() <= labels.items()] == [name]
    # The metrics Service scrapes the triggerers with the other agents.
    for labels in pods.values():
        assert service["spec"]["selector"].items() <= labels.items()
    # With podDisruptionBudget off, the triggerer has none either.
    off = render({**MATRIX["triggerer"], "podDisruptionBudget": {"enabled": False}})
    assert not by_kind(off, "PodDisruptionBudget")
    assert TRIGGERER_NAME in _deployments(off)


def test_notes_list_the_triggerer() -> None:
    notes = render_files(MATRIX["triggerer"])["tether-agent/templates/NOTES.txt"]
    assert "triggerer: 3 agent(s) running up to 250 triggers each" in notes
    defaults = render_files(values(triggerer={"enabled": True}))["tether-agent/templates/NOTES.txt"]
    assert "triggerer: 2 agent(s) running up to 1000 triggers each" in defaults


def test_token_sources_end_up_as_a_token_file() -> None:
    created = render(values())
    [secret] = [s for s in by_kind(created, "Secret") if s["metadata"]["name"] == f"{RELEASE}-token"]
    assert base64.b64decode(secret["data"]["token"]).decode() == TOKEN
    [spec] = pod_specs(created)
    assert env_of(spec["containers"][0])["TETHER_TOKEN_FILE"] == "/var/run/secrets/tether/token/token"
    assert {"TETHER_TOKEN"}.isdisjoint(env_of(spec["containers"][0]))
    [token_volume] = [v for v in spec["volumes"] if v["name"] == "token"]
    assert token_volume["secret"]["secretName"] == f"{RELEASE}-token"

    existing = render(MATRIX["token-secret-name"])
    assert not [s for s in by_kind(existing, "Secret") if s["metadata"]["name"] == f"{RELEASE}-token"]
    [spec] = pod_specs(existing)
    [token_volume] = [v for v in spec["volumes"] if v["name"] == "token"]
    assert token_volume["secret"]["secretName"] == "agent-token"

    from_file = render(MATRIX["token-file"])
    [spec] = pod_specs(from_file)
    assert env_of(spec["containers"][0])["TETHER_TOKEN_FILE"] == "/mnt/secrets-store/token"
    assert "token" not in {v["name"] for v in spec["volumes"]}


def test_pull_secret_is_created_from_data_or_named() -> None:
    objects = render(MATRIX["pull-secret-data"])
    [pull] = [s for s in by_kind(objects, "Secret") if s["type"] == "kubernetes.io/dockerconfigjson"]
    data = json.loads(base64.b64decode(pull["data"][".dockerconfigjson"]))
    assert "registry.example.com" in data["auths"]
    [spec] = pod_specs(objects)
    assert spec["imagePullSecrets"] == [{"name": pull["metadata"]["name"]}]
    [spec] = pod_specs(render(MATRIX["pull-secret-name"]))
    assert spec["imagePullSecrets"] == [{"name": "registry-credentials"}]
    [spec] = pod_specs(render(values()))
    assert "imagePullSecrets" not in spec


def test_proxy_and_ca_bundle_reach_the_agent() -> None:
    [spec] = pod_specs(render(MATRIX["proxy-and-ca-configmap"]))
    env = env_of(spec["containers"][0])
    assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://proxy:3128"
    assert env["NO_PROXY"] == "10.0.0.0/8,.svc"
    assert env["TETHER_CA_BUNDLE"] == "/etc/tether/ca/ca.crt"
    [ca] = [v for v in spec["volumes"] if v["name"] == "ca-bundle"]
    assert ca["configMap"] == {"name": "corp-ca", "items": [{"key": "bundle.pem", "path": "ca.crt"}]}

    [spec] = pod_specs(render(MATRIX["ca-secret-and-client-cert"]))
    env = env_of(spec["containers"][0])
    assert "HTTPS_PROXY" not in env
    [ca] = [v for v in spec["volumes"] if v["name"] == "ca-bundle"]
    assert ca["secret"]["secretName"] == "corp-ca"
    assert env["TETHER_CLIENT_CERT"].endswith("/tls.crt") and env["TETHER_CLIENT_KEY"].endswith("/tls.key")


def test_backends_and_bundles_become_airflow_settings() -> None:
    objects = render(MATRIX["everything-else"])
    [spec] = pod_specs(objects)
    [agent] = spec["containers"]
    env = env_of(agent)
    assert env["AIRFLOW__WORKERS__SECRETS_BACKEND"] == MATRIX["minimal"]["secretBackend"]
    assert env["AIRFLOW__CORE__XCOM_BACKEND"] == MATRIX["minimal"]["xcomBackend"]
    assert env["AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_PATH"] == "s3://bucket/xcom"
    assert env["AIRFLOW__COMMON_IO__XCOM_OBJECTSTORAGE_THRESHOLD"] == "1024"
    bundles = json.loads(env["AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST"])
    assert bundles[0]["classpath"] == "airflow.providers.git.bundles.git.GitDagBundle"
    assert env["AIRFLOW__CORE__DEFAULT_TIMEZONE"] == "Europe/Paris"
    assert env["TETHER_LOG_LEVEL"] == "DEBUG"
    assert env["TETHER_HEALTH_PORT"] == "9100"
    # The kwargs may hold credentials: they come from a Secret, never inline.
    kwargs_ref = env["AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS"]["secretKeyRef"]
    [backends] = [s for s in by_kind(objects, "Secret") if s["metadata"]["name"] == kwargs_ref["name"]]
    assert json.loads(base64.b64decode(backends["data"][kwargs_ref["key"]])) == {
        "url": "https://vault:8200",
        "mount_point": "airflow",
    }
    assert agent["image"] == "registry.example.com/data/tether-agent:0.1.0-dags3"
    assert agent["imagePullPolicy"] == "Always"
    for obj in objects:
        assert obj["metadata"]["name"].startswith("eu-")
        assert obj["metadata"]["labels"]["team"] == "data"
        assert obj["metadata"]["annotations"]["owner"] == "data-platform"


def test_preflight_runs_check_with_the_agents_settings() -> None:
    [spec] = pod_specs(render(MATRIX["preflight"]))
    [preflight] = spec["initContainers"]
    [agent] = spec["containers"]
    assert preflight["args"] == ["check"]
    assert preflight["command"] == agent["command"]
    assert preflight["env"] == agent["env"]
    assert preflight["volumeMounts"] == agent["volumeMounts"]
    assert "initContainers" not in pod_specs(render(values()))[0]


def test_created_namespace_enforces_the_restricted_standard() -> None:
    [namespace] = by_kind(render(MATRIX["create-namespace"]), "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert not by_kind(render(values()), "Namespace")


def test_optional_objects_can_be_left_out() -> None:
    objects = render(MATRIX["no-pdb-no-metrics-existing-sa"])
    assert {o["kind"] for o in objects} == {"Deployment", "Secret"}
    [spec] = pod_specs(objects)
    assert spec["serviceAccountName"] == "agents"


def test_notes_tell_how_to_check_the_agents() -> None:
    notes = render_files(values(workers=THREE_WORKERS))["tether-agent/templates/NOTES.txt"]
    assert f"kubectl get pods -n {NAMESPACE} -l app.kubernetes.io/instance={RELEASE}" in notes
    assert "airflow tether agents list" in notes
    assert "worker etl: 3 agent(s) serving etl, etl-heavy" in notes


def test_helm_lint_finds_no_warning_or_error() -> None:
    report = helm.lint(
        CHART_DIR, values=values(), strict=True, kube_version=f"v{KUBERNETES_VERSION}", namespace=NAMESPACE
    )
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
