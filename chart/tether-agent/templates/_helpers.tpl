{{/* Prefix of every object's name. */}}
{{- define "tether-agent.prefix" -}}
{{- default .Release.Name .Values.resourceNamePrefix | trunc 20 | trimSuffix "-" -}}
{{- end -}}

{{/* Namespace of every object. */}}
{{- define "tether-agent.namespace" -}}
{{- default .Release.Namespace .Values.namespace -}}
{{- end -}}

{{/* Name of an object of one part of the release: root and suffix, e.g. a worker's name. */}}
{{- define "tether-agent.objectName" -}}
{{- printf "%s-%s" (include "tether-agent.prefix" .root) .suffix | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tether-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-agent" (include "tether-agent.prefix" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels that select the agents of the release; each Deployment adds its own. */}}
{{- define "tether-agent.selectorLabels" -}}
app.kubernetes.io/name: tether-agent
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tether-agent.labels" -}}
{{ include "tether-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The metadata block shared by every object: name given by the caller. */}}
{{- define "tether-agent.metadata" -}}
namespace: {{ include "tether-agent.namespace" .root }}
labels:
  {{- include "tether-agent.labels" .root | nindent 2 }}
  {{- with .extraLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .root.Values.annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "tether-agent.tokenSecretName" -}}
{{- if .Values.agentToken -}}
{{- printf "%s-token" (include "tether-agent.prefix" .) -}}
{{- else -}}
{{- .Values.agentTokenSecretName -}}
{{- end -}}
{{- end -}}

{{- define "tether-agent.pullSecretName" -}}
{{- if .Values.imagePullSecretData -}}
{{- printf "%s-pull" (include "tether-agent.prefix" .) -}}
{{- else -}}
{{- .Values.imagePullSecretName -}}
{{- end -}}
{{- end -}}

{{- define "tether-agent.configSecretName" -}}
{{- printf "%s-backends" (include "tether-agent.prefix" .) -}}
{{- end -}}

{{/* Where the chart mounts what the agent reads from files. */}}
{{- define "tether-agent.tokenDir" -}}/var/run/secrets/tether/token{{- end -}}
{{- define "tether-agent.caDir" -}}/etc/tether/ca{{- end -}}
{{- define "tether-agent.clientCertDir" -}}/var/run/secrets/tether/client{{- end -}}

{{/*
Every rule values.schema.json cannot say in a sentence. Each problem is one sentence naming
the value and the fix, and all of them are refused together, one a line, so a values file with
several values still to fill in needs one round, not one per value.
*/}}
{{- define "tether-agent.validate" -}}
{{- $v := .Values -}}
{{- $problems := list -}}
{{- $dottedPath := "^[A-Za-z_][A-Za-z0-9_]*([.][A-Za-z_][A-Za-z0-9_]*)+$" -}}
{{- if not $v.planeURL -}}
{{- $problems = append $problems "planeURL is required: set it to the URL of the Airflow API server the agents connect to, e.g. https://airflow.example.com." -}}
{{- else if not (regexMatch "^https?://[^/]+" $v.planeURL) -}}
{{- $problems = append $problems (printf "planeURL %q is not an http(s) URL: set it to the URL of the Airflow API server, starting with https://." $v.planeURL) -}}
{{- else if hasPrefix "http://" (lower $v.planeURL) -}}
{{- $problems = append $problems (printf "planeURL %q is plain HTTP, which would send the agent token across the network in the clear: serve the Airflow API server over HTTPS and set planeURL to its https:// URL." $v.planeURL) -}}
{{- else -}}
{{- $host := regexReplaceAll "^https?://([^/?#]*@)?([^/:?#]+).*$" $v.planeURL "${2}" | lower | trimSuffix "." -}}
{{- /* The reserved example domains (RFC 2606): a file that still has one was never finished. */ -}}
{{- if regexMatch "(^|[.])example([.](com|net|org))?$" $host -}}
{{- $problems = append $problems (printf "planeURL %q is an example address, not your plane: set it to the URL at which the agents reach your Airflow API server (its [api] base_url)." $v.planeURL) -}}
{{- end -}}
{{- end -}}
{{- $tokenSources := list -}}
{{- range $key := list "agentToken" "agentTokenSecretName" "agentTokenFile" -}}
{{- if index $v $key -}}{{- $tokenSources = append $tokenSources $key -}}{{- end -}}
{{- end -}}
{{- if eq (len $tokenSources) 0 -}}
{{- $problems = append $problems "No agent token is set: set exactly one of agentToken, agentTokenSecretName or agentTokenFile." -}}
{{- else if gt (len $tokenSources) 1 -}}
{{- $problems = append $problems (printf "%s are set together, but the agents take one token: keep exactly one of agentToken, agentTokenSecretName or agentTokenFile." (join ", " $tokenSources)) -}}
{{- end -}}
{{- if and $v.agentTokenFile (not (isAbs $v.agentTokenFile)) -}}
{{- $problems = append $problems (printf "agentTokenFile %q is not an absolute path: set it to where the token file is mounted in the container, e.g. /var/run/secrets/tether/token/token." $v.agentTokenFile) -}}
{{- end -}}
{{- if and $v.imagePullSecretName $v.imagePullSecretData -}}
{{- $problems = append $problems "imagePullSecretName and imagePullSecretData are both set: keep the name of an existing Secret or the data for the chart to store, not both." -}}
{{- end -}}
{{- if not $v.secretBackend -}}
{{- $problems = append $problems "secretBackend is required because secrets stay on the agent side: set it to a secrets backend class, e.g. airflow.providers.hashicorp.secrets.vault.VaultBackend." -}}
{{- else if not (regexMatch $dottedPath $v.secretBackend) -}}
{{- $problems = append $problems (printf "secretBackend %q is not a dotted Python path: set it to the module and class of a secrets backend, e.g. airflow.providers.hashicorp.secrets.vault.VaultBackend." $v.secretBackend) -}}
{{- end -}}
{{- if not $v.xcomBackend -}}
{{- $problems = append $problems "xcomBackend is required because XCom values stay on the agent side: set it to an XCom backend class, e.g. airflow.providers.common.io.xcom.backend.XComObjectStorageBackend." -}}
{{- else if not (regexMatch $dottedPath $v.xcomBackend) -}}
{{- $problems = append $problems (printf "xcomBackend %q is not a dotted Python path: set it to the module and class of an XCom backend, e.g. airflow.providers.common.io.xcom.backend.XComObjectStorageBackend." $v.xcomBackend) -}}
{{- end -}}
{{- if and $v.caBundle.configMapName $v.caBundle.secretName -}}
{{- $problems = append $problems "caBundle.configMapName and caBundle.secretName are both set: take the CA bundle from one of them." -}}
{{- end -}}
{{- $forbidden := list "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD" "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_SECRET" "AIRFLOW__CORE__SQL_ALCHEMY_CONN" -}}
{{- $envLists := list (list "commonEnv" $v.commonEnv) -}}
{{- range $i, $w := $v.workers -}}
{{- $envLists = append $envLists (list (printf "workers[%d].env" $i) $w.env) -}}
{{- end -}}
{{- $envLists = append $envLists (list "dagProcessor.env" $v.dagProcessor.env) -}}
{{- $envLists = append $envLists (list "triggerer.env" $v.triggerer.env) -}}
{{- $envLists = append $envLists (list "sentinel.env" $v.sentinel.env) -}}
{{- range $pair := $envLists -}}
{{- range $e := index $pair 1 -}}
{{- if has $e.name $forbidden -}}
{{- $problems = append $problems (printf "%s sets %s, but agents never connect to the metadata database: remove it." (index $pair 0) $e.name) -}}
{{- end -}}
{{- if eq $e.name "TETHER_ALLOW_INSECURE_HTTP" -}}
{{- $problems = append $problems (printf "%s sets TETHER_ALLOW_INSECURE_HTTP, but the chart's agents reach the plane over HTTPS only: remove it." (index $pair 0)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $names := dict -}}
{{- range $i, $w := $v.workers -}}
{{- if hasKey $names $w.name -}}
{{- $problems = append $problems (printf "workers[%d].name %q is already the name of workers[%d]: give every worker a unique name." $i $w.name (get $names $w.name)) -}}
{{- else -}}
{{- $_ := set $names $w.name $i -}}
{{- end -}}
{{- if and (hasKey $w "slots") (lt (int $w.slots) 1) -}}
{{- $problems = append $problems (printf "workers[%d].slots is %d: set it to 1 or more, the number of tasks an agent runs at once." $i (int $w.slots)) -}}
{{- end -}}
{{- $grace := include "tether-agent.grace" $w | int -}}
{{- if and (hasKey $w "drainTimeoutSeconds") (not (kindIs "invalid" $w.drainTimeoutSeconds)) -}}
{{- if lt (int $w.drainTimeoutSeconds) 1 -}}
{{- $problems = append $problems (printf "workers[%d].drainTimeoutSeconds is %d: set it to 1 or more so running tasks get time to finish." $i (int $w.drainTimeoutSeconds)) -}}
{{- else if ge (int $w.drainTimeoutSeconds) $grace -}}
{{- $problems = append $problems (printf "workers[%d].terminationGracePeriodSeconds (%d) is not longer than its drainTimeoutSeconds (%d): raise terminationGracePeriodSeconds or lower drainTimeoutSeconds so Kubernetes waits for the drain." $i $grace (int $w.drainTimeoutSeconds)) -}}
{{- end -}}
{{- else if lt $grace 31 -}}
{{- $problems = append $problems (printf "workers[%d].terminationGracePeriodSeconds (%d) leaves no time to drain running tasks: set it above 30 or set a drainTimeoutSeconds below it." $i $grace) -}}
{{- end -}}
{{- with $w.autoscaling -}}
{{- if .enabled -}}
{{- if $v.agentTokenFile -}}
{{- $problems = append $problems (printf "workers[%d].autoscaling needs the agent token in a Secret that KEDA can read, but it comes from agentTokenFile: set agentTokenSecretName (or agentToken) instead." $i) -}}
{{- end -}}
{{- $min := hasKey . "minReplicas" | ternary .minReplicas 0 | int -}}
{{- $max := hasKey . "maxReplicas" | ternary .maxReplicas 10 | int -}}
{{- if gt $min $max -}}
{{- $problems = append $problems (printf "workers[%d].autoscaling.minReplicas (%d) is above its maxReplicas (%d): lower minReplicas or raise maxReplicas." $i $min $max) -}}
{{- end -}}
{{- $slots := include "tether-agent.slots" $w | int -}}
{{- if and (hasKey . "slotsPerReplica") (not (kindIs "invalid" .slotsPerReplica)) (gt (int .slotsPerReplica) $slots) -}}
{{- $problems = append $problems (printf "workers[%d].autoscaling.slotsPerReplica (%d) is more than the %d slots of one agent, so the group would get too few agents to run its work: set it to %d or less, or leave it null." $i (int .slotsPerReplica) $slots $slots) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and $v.dagProcessor.enabled (eq $w.name "dag-processor") -}}
{{- $problems = append $problems (printf "workers[%d].name \"dag-processor\" is the name of the DAG processor's Deployment while dagProcessor.enabled is true: give the worker another name." $i) -}}
{{- end -}}
{{- if and $v.sentinel.enabled (eq $w.name "sentinel") -}}
{{- $problems = append $problems (printf "workers[%d].name \"sentinel\" is the name of the sentinel's Deployment while sentinel.enabled is true: give the worker another name." $i) -}}
{{- end -}}
{{- if and $v.triggerer.enabled (eq $w.name "triggerer") -}}
{{- $problems = append $problems (printf "workers[%d].name \"triggerer\" is the name of the triggerer's Deployment while triggerer.enabled is true: give the worker another name." $i) -}}
{{- end -}}
{{- end -}}
{{- if and $v.sentinel.enabled (not $v.sentinel.tokenSecretName) -}}
{{- $problems = append $problems "sentinel.enabled is true but sentinel.tokenSecretName is empty: create a token with airflow tether tokens create --scope sentinel, store it in a Secret under the key token and name that Secret." -}}
{{- end -}}
{{- if $problems -}}
{{- fail (join "\n" $problems) -}}
{{- end -}}
{{- end -}}

{{/* A worker's grace period, with the chart default. */}}
{{- define "tether-agent.grace" -}}
{{- if and (hasKey . "terminationGracePeriodSeconds") (not (kindIs "invalid" .terminationGracePeriodSeconds)) -}}
{{- .terminationGracePeriodSeconds | int -}}
{{- else -}}
600
{{- end -}}
{{- end -}}

{{/* A worker's drain timeout: its own, or 30 s under its grace period. */}}
{{- define "tether-agent.drainTimeout" -}}
{{- if and (hasKey . "drainTimeoutSeconds") (not (kindIs "invalid" .drainTimeoutSeconds)) -}}
{{- .drainTimeoutSeconds | int -}}
{{- else -}}
{{- sub (include "tether-agent.grace" . | int) 30 -}}
{{- end -}}
{{- end -}}

{{/* A worker's task slots, with the chart default. */}}
{{- define "tether-agent.slots" -}}
{{- if and (hasKey . "slots") (not (kindIs "invalid" .slots)) -}}
{{- .slots | int -}}
{{- else -}}
4
{{- end -}}
{{- end -}}
