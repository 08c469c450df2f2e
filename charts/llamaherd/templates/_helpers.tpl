{{/* Chart name, cut to 63 characters. */}}
{{- define "llamaherd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the operator's objects: <release>-<chart>, or the release name alone when it
already contains the chart name. */}}
{{- define "llamaherd.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "llamaherd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "llamaherd.labels" -}}
helm.sh/chart: {{ include "llamaherd.chart" . }}
{{ include "llamaherd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llamaherd
{{- end }}

{{/* Labels that pick the operator's pod (never change them: Deployment selectors are immutable). */}}
{{- define "llamaherd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llamaherd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llamaherd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llamaherd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "llamaherd.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The rules of the ClusterRole named .role in operator/rbac.yaml (copied byte for byte to
   files/rbac.yaml): llamaherd-operator (namespaced resources) or llamaherd-operator-cluster. */}}
{{- define "llamaherd.rbacRules" -}}
{{- $rules := list }}
{{- range $doc := regexSplit "(?m)^---\\s*$" ($.ctx.Files.Get "files/rbac.yaml") -1 }}
{{- $object := fromYaml $doc }}
{{- if and (eq (get $object "kind") "ClusterRole") (eq (dig "metadata" "name" "" $object) $.role) }}
{{- $rules = get $object "rules" }}
{{- end }}
{{- end }}
{{- if not $rules }}
{{- fail (printf "files/rbac.yaml holds no ClusterRole %s with rules: run `make chart`" $.role) }}
{{- end }}
{{- toYaml $rules }}
{{- end }}

{{/* Labels of the monitoring objects. */}}
{{- define "llamaherd.monitoringLabels" -}}
{{ include "llamaherd.labels" . }}
{{- with .Values.monitoring.labels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The in-cluster Prometheus (prometheus.enabled): its object names, labels and URL. */}}
{{- define "llamaherd.prometheus.fullname" -}}
{{- printf "%s-prometheus" (include "llamaherd.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Its own app.kubernetes.io/name, so that the operator's Service selector never picks it. */}}
{{- define "llamaherd.prometheus.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-prometheus" (include "llamaherd.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: prometheus
{{- end }}

{{- define "llamaherd.prometheus.labels" -}}
helm.sh/chart: {{ include "llamaherd.chart" . }}
{{ include "llamaherd.prometheus.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llamaherd
{{- end }}

{{- define "llamaherd.prometheus.url" -}}
{{- printf "http://%s.%s.svc.cluster.local:%v" (include "llamaherd.prometheus.fullname" .) .Release.Namespace .Values.prometheus.service.port }}
{{- end }}

{{/* The operator's default Prometheus: operator.prometheusUrl, else the in-cluster one. */}}
{{- define "llamaherd.operatorPrometheusUrl" -}}
{{- if .Values.operator.prometheusUrl }}
{{- .Values.operator.prometheusUrl }}
{{- else if .Values.prometheus.enabled }}
{{- include "llamaherd.prometheus.url" . }}
{{- end }}
{{- end }}

{{/* Namespaces the in-cluster Prometheus reads pods in (the release namespace for the operator);
empty when it reads the whole cluster. */}}
{{- define "llamaherd.prometheus.roleNamespaces" -}}
{{- with .Values.prometheus.namespaces }}
{{- toYaml (uniq (append . $.Release.Namespace)) }}
{{- end }}
{{- end }}

{{/* The gateway (gateway.enabled): its object names and labels. */}}
{{- define "llamaherd.gateway.fullname" -}}
{{- printf "%s-gateway" (include "llamaherd.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Its own app.kubernetes.io/name, so that the operator's selectors never pick its pods. */}}
{{- define "llamaherd.gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-gateway" (include "llamaherd.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "llamaherd.gateway.labels" -}}
helm.sh/chart: {{ include "llamaherd.chart" . }}
{{ include "llamaherd.gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llamaherd
{{- end }}

{{/* Namespaces the gateway routes to: gateway.watchNamespaces, else operator.watchNamespaces
(empty: the whole cluster). */}}
{{- define "llamaherd.gateway.namespaces" -}}
{{- toYaml (default .Values.operator.watchNamespaces .Values.gateway.watchNamespaces) }}
{{- end }}
