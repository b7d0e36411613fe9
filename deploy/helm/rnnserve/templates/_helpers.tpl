{{/* The chart's name, and the name of every object (the release's, unless overridden). */}}
{{- define "rnnserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rnnserve.fullname" -}}
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

{{- define "rnnserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rnnserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rnnserve.labels" -}}
{{ include "rnnserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- if .Values.chartLabels }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
{{- end }}

{{- define "rnnserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rnnserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "rnnserve.gpu" -}}
{{- if eq .Values.profile "gpu" }}true{{ end }}
{{- end }}

{{/* repository:tag of the profile's image. */}}
{{- define "rnnserve.image" -}}
{{- $repository := .Values.image.repository }}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if include "rnnserve.gpu" . }}
{{- $repository = default $repository .Values.gpu.image.repository }}
{{- $tag = default (printf "%s%s" $tag .Values.gpu.tagSuffix) .Values.gpu.image.tag }}
{{- end }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{/* The server drains for shutdownGraceSeconds after SIGTERM (and after the preStop sleep);
     the kubelet must not kill it before: rounded up, plus a margin for the exit itself. */}}
{{- define "rnnserve.terminationGracePeriodSeconds" -}}
{{- $grace := .Values.shutdownGraceSeconds | float64 }}
{{- add .Values.preStopSleepSeconds (ceil $grace | int) .Values.terminationMarginSeconds }}
{{- end }}

{{/* The probes' action, from a dict of the chart's Values and the KServe v2 health path to GET:
     that path on the HTTP port (over HTTPS with TLS: the kubelet does not verify the
     certificate); with http off, the gRPC health service. The kubelet cannot present a client
     certificate: with TLS and clientCA (or TLS and http off), a TCP connect to the gRPC port. */}}
{{- define "rnnserve.probeAction" -}}
{{- $tls := .Values.tls }}
{{- if and .Values.http.enabled (not (and $tls.enabled $tls.clientCA)) -}}
httpGet:
  path: {{ .path }}
  port: http
  scheme: {{ ternary "HTTPS" "HTTP" $tls.enabled }}
{{- else if $tls.enabled -}}
tcpSocket:
  port: grpc
{{- else -}}
grpc:
  port: 8001
{{- end -}}
{{- end }}
