{{/*
The Deployment of one kind of agent, the same pod for every role. Takes:
  root        the chart's context
  agent       the values of the pods: a workers[] item, dagProcessor or triggerer
  role        worker, dag-processor or triggerer: the agent command and the settings that go with it
  name        the Deployment's name
  roleLabels  the labels that tell these pods from the release's other agents
  replicas    the number of pods
  autoscaled  true when KEDA sets the number of pods (the Deployment then names none)
  grace       terminationGracePeriodSeconds
*/}}
{{- define "tether-agent.deployment" -}}
{{- $root := .root -}}
{{- $a := .agent -}}
{{- $image := printf "%s:%s" $root.Values.image.repository (default $root.Chart.AppVersion $root.Values.image.tag) -}}
{{- $labels := merge (dict "app.kubernetes.io/component" "agent") .roleLabels -}}
{{- $podSecurityContext := merge (deepCopy (default dict $a.podSecurityContext)) $root.Values.podSecurityContext -}}
{{- $containerSecurityContext := merge (deepCopy (default dict $a.containerSecurityContext)) $root.Values.containerSecurityContext -}}
{{- $liveness := merge (deepCopy (default dict (dig "probes" "liveness" dict $a))) (dict "initialDelaySeconds" 10 "periodSeconds" 15 "timeoutSeconds" 5 "failureThreshold" 4) -}}
{{- $readiness := merge (deepCopy (default dict (dig "probes" "readiness" dict $a))) (dict "initialDelaySeconds" 5 "periodSeconds" 10 "timeoutSeconds" 5 "failureThreshold" 3) -}}
{{- $ctx := dict "root" $root "agent" $a "role" .role -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .name }}
  {{- include "tether-agent.metadata" (dict "root" $root "extraLabels" $labels) | nindent 2 }}
spec:
  {{- if not .autoscaled }}
  replicas: {{ .replicas | int }}
  {{- end }}
  revisionHistoryLimit: 5
  # A new agent is up before an old one stops, so its work never waits for a rollout.
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 1
      maxUnavailable: 0
  selector:
    matchLabels:
      {{- include "tether-agent.selectorLabels" $root | nindent 6 }}
      {{- toYaml .roleLabels | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "tether-agent.labels" $root | nindent 8 }}
        {{- toYaml $labels | nindent 8 }}
      annotations:
        checksum/backends: {{ include (print $root.Template.BasePath "/secret-backends.yaml") $root | sha256sum }}
        {{- if $root.Values.agentToken }}
        checksum/token: {{ $root.Values.agentToken | sha256sum }}
        {{- end }}
        {{- with $root.Values.annotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "tether-agent.serviceAccountName" $root }}
      # Agents call no Kubernetes API.
      automountServiceAccountToken: false
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ .grace | int }}
      securityContext:
        {{- toYaml $podSecurityContext | nindent 8 }}
      {{- with (include "tether-agent.pullSecretName" $root) }}
      imagePullSecrets:
        - name: {{ . }}
      {{- end }}
      {{- if $root.Values.preflight.enabled }}
      initContainers:
        - name: preflight
          image: {{ $image }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["tether-agent"]
          args: ["check"]
          env:
            {{- include "tether-agent.env" $ctx | nindent 12 }}
          volumeMounts:
            {{- include "tether-agent.volumeMounts" $ctx | nindent 12 }}
          securityContext:
            {{- toYaml $containerSecurityContext | nindent 12 }}
          {{- with $a.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
      {{- end }}
      containers:
        - name: agent
          image: {{ $image }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["tether-agent"]
          args: [{{ eq .role "worker" | ternary "run" .role | quote }}]
          env:
            {{- include "tether-agent.env" $ctx | nindent 12 }}
          ports:
            - name: health
              containerPort: {{ $root.Values.healthPort }}
              protocol: TCP
          livenessProbe:
            httpGet:
              path: /healthz
              port: health
            {{- toYaml $liveness | nindent 12 }}
          readinessProbe:
            httpGet:
              path: /readyz
              port: health
            {{- toYaml $readiness | nindent 12 }}
          volumeMounts:
            {{- include "tether-agent.volumeMounts" $ctx | nindent 12 }}
          securityContext:
            {{- toYaml $containerSecurityContext | nindent 12 }}
          {{- with $a.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
      volumes:
        {{- include "tether-agent.volumes" $ctx | nindent 8 }}
      {{- with $a.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $a.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $a.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}

{{/* The PodDisruptionBudget of one kind of agent: takes root, name and roleLabels, as above. */}}
{{- define "tether-agent.podDisruptionBudget" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ .name }}
  {{- include "tether-agent.metadata" (dict "root" .root "extraLabels" .roleLabels) | nindent 2 }}
spec:
  maxUnavailable: {{ .root.Values.podDisruptionBudget.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "tether-agent.selectorLabels" .root | nindent 6 }}
      {{- toYaml .roleLabels | nindent 6 }}
{{- end -}}
