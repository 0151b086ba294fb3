{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "evidence-keeper.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name when it already contains the chart name. */}}
{{- define "evidence-keeper.fullname" -}}
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

{{- define "evidence-keeper.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "evidence-keeper.selectorLabels" -}}
app.kubernetes.io/name: {{ include "evidence-keeper.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "evidence-keeper.labels" -}}
{{ include "evidence-keeper.selectorLabels" . }}
app.kubernetes.io/component: agent
app.kubernetes.io/part-of: evidence-keeper
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "evidence-keeper.chart" . }}
{{- end }}

{{- define "evidence-keeper.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "evidence-keeper.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is given. */}}
{{- define "evidence-keeper.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
An environment value as the agent's settings parser reads it. Helm holds every number as a
float64, which would print 10737418240 as 1.073741824e+10: whole numbers print as integers.
*/}}
{{- define "evidence-keeper.envValue" -}}
{{- if kindIs "float64" . }}
{{- if eq (floor .) . }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else if kindIs "invalid" . }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/* The settings the chart derives from other values (mounts, ports, secrets). */}}
{{- define "evidence-keeper.managedSettings" -}}
node_name log_root spool_dir listen archive_token_file
{{- end }}

{{- define "evidence-keeper.archiveTokenDir" -}}
/etc/evidence-keeper/archive-token
{{- end }}
