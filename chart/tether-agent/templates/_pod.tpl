{{/*
Environment of the agent and preflight containers of one Deployment. Takes root (the chart's
context), agent (a workers[] item, dagProcessor, triggerer or sentinel), role (worker, dag-processor,
triggerer or sentinel) and, optionally, tokenFile (where the token is instead of the agents' own).
*/}}
{{- define "tether-agent.env" -}}
{{- $v := .root.Values -}}
{{- $a := .agent -}}
- name: TETHER_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: TETHER_PLANE_URL
  value: {{ $v.planeURL | quote }}
- name: TETHER_TOKEN_FILE
  value: {{ .tokenFile | default $v.agentTokenFile | default (printf "%s/token" (include "tether-agent.tokenDir" .root)) | quote }}
{{- if eq .role "worker" }}
- name: TETHER_QUEUES
  value: {{ join "," $a.queues | quote }}
- name: TETHER_SLOTS
  value: {{ include "tether-agent.slots" $a | quote }}
- name: TETHER_DRAIN_TIMEOUT
  value: {{ include "tether-agent.drainTimeout" $a | quote }}
- name: TETHER_TASK_LOGS
  value: {{ $a.taskLogs | default "ship" | quote }}
{{- else if eq .role "dag-processor" }}
- name: TETHER_SHARE_DAG_SOURCE
  value: {{ eq $a.shareDagSource true | quote }}
{{- else if eq .role "triggerer" }}
- name: TETHER_QUEUES
  value: {{ join "," ($a.queues | default (list "default")) | quote }}
- name: TETHER_TRIGGER_CAPACITY
  value: {{ hasKey $a "capacity" | ternary $a.capacity 1000 | int | quote }}
- name: TETHER_TASK_LOGS
  value: {{ $a.taskLogs | default "ship" | quote }}
{{- end }}
- name: TETHER_HEALTH_PORT
  value: {{ $v.healthPort | quote }}
- name: TETHER_LOG_LEVEL
  value: {{ $v.logLevel | quote }}
{{- if or $v.caBundle.configMapName $v.caBundle.secretName }}
- name: TETHER_CA_BUNDLE
  value: {{ printf "%s/ca.crt" (include "tether-agent.caDir" .root) | quote }}
{{- end }}
{{- if $v.clientCertSecretName }}
- name: TETHER_CLIENT_CERT
  value: {{ printf "%s/tls.crt" (include "tether-agent.clientCertDir" .root) | quote }}
- name: TETHER_CLIENT_KEY
  value: {{ printf "%s/tls.key" (include "tether-agent.clientCertDir" .root) | quote }}
{{- end }}
{{- range $pair := list (list "HTTP_PROXY" $v.proxy.httpProxy) (list "HTTPS_PROXY" $v.proxy.httpsProxy) (list "NO_PROXY" $v.proxy.noProxy) }}
{{- if index $pair 1 }}
{{- /* Lower-case copies for tools (git, curl) that read only those. */}}
- name: {{ index $pair 0 }}
  value: {{ index $pair 1 | quote }}
- name: {{ index $pair 0 | lower }}
  value: {{ index $pair 1 | quote }}
{{- end }}
{{- end }}
- name: AIRFLOW__WORKERS__SECRETS_BACKEND
  value: {{ $v.secretBackend | quote }}
- name: AIRFLOW__WORKERS__SECRETS_BACKEND_KWARGS
  valueFrom:
    secretKeyRef:
      name: {{ include "tether-agent.configSecretName" .root }}
      key: secretBackendKwargs
- name: AIRFLOW__SECRETS__BACKEND
  value: {{ $v.secretBackend | quote }}
- name: AIRFLOW__SECRETS__BACKEND_KWARGS
  valueFrom:
    secretKeyRef:
      name: {{ include "tether-agent.configSecretName" .root }}
      key: secretBackendKwargs
- name: AIRFLOW__CORE__XCOM_BACKEND
  value: {{ $v.xcomBackend | quote }}
{{- range $section, $options := $v.xcomBackendSettings }}
{{- range $option, $value := $options }}
- name: {{ printf "AIRFLOW__%s__%s" ($section | replace "." "_" | upper) ($option | upper) }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}
{{- with $v.dagBundleConfigList }}
- name: AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST
  value: {{ toJson . | quote }}
{{- end }}
{{- with $v.commonEnv }}
{{ toYaml . }}
{{- end }}
{{- with $a.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Writable paths on a read-only root filesystem, and the files the agent reads. */}}
{{- define "tether-agent.volumeMounts" -}}
{{- $v := .root.Values -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/tether
{{- if or $v.agentToken $v.agentTokenSecretName }}
- name: token
  mountPath: {{ include "tether-agent.tokenDir" .root }}
  readOnly: true
{{- end }}
{{- if or $v.caBundle.configMapName $v.caBundle.secretName }}
- name: ca-bundle
  mountPath: {{ include "tether-agent.caDir" .root }}
  readOnly: true
{{- end }}
{{- if $v.clientCertSecretName }}
- name: client-cert
  mountPath: {{ include "tether-agent.clientCertDir" .root }}
  readOnly: true
{{- end }}
{{- with .agent.volumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "tether-agent.volumes" -}}
{{- $v := .root.Values -}}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- if or $v.agentToken $v.agentTokenSecretName }}
- name: token
  secret:
    secretName: {{ include "tether-agent.tokenSecretName" .root }}
    defaultMode: 0440
    items:
      - key: token
        path: token
{{- end }}
{{- if $v.caBundle.configMapName }}
- name: ca-bundle
  configMap:
    name: {{ $v.caBundle.configMapName }}
    items:
      - key: {{ $v.caBundle.key }}
        path: ca.crt
{{- else if $v.caBundle.secretName }}
- name: ca-bundle
  secret:
    secretName: {{ $v.caBundle.secretName }}
    items:
      - key: {{ $v.caBundle.key }}
        path: ca.crt
{{- end }}
{{- if $v.clientCertSecretName }}
- name: client-cert
  secret:
    secretName: {{ $v.clientCertSecretName }}
    defaultMode: 0440
{{- end }}
{{- with .agent.volumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}
