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

{{/*
"true" when a Prometheus Operator object may be rendered: the cluster serves
monitoring.coreos.com/v1 (helm install/upgrade ask it; `helm template --api-versions` tells it),
or the object's own `force` is set. Call with (dict "root" $ "values" .Values.serviceMonitor).
*/}}
{{- define "evidence-keeper.monitoringApi" -}}
{{- if or .values.force (.root.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") -}}
true
{{- end -}}
{{- end }}

{{/*
The TCP ports the agent connects to, derived from its configuration: the API server ports,
the store (config.s3_endpoint_url's port, else 443 for AWS S3 and STS) and every
config.sink_probes target (host:port, http(s)://url, dns:host needs DNS only), parsed as
evidence_keeper/settings.py parses them. One port per line.
*/}}
{{- define "evidence-keeper.egressTcpPorts" -}}
{{- $ports := dict -}}
{{- range .Values.networkPolicy.egress.apiServerPorts }}
{{- $_ := set $ports (toString (int .)) true -}}
{{- end }}
{{- $_ := set $ports "443" true -}}
{{- with .Values.config.s3_endpoint_url }}
{{- $_ := set $ports (include "evidence-keeper.urlPort" .) true -}}
{{- end }}
{{- range splitList "," (toString (default "" .Values.config.sink_probes)) }}
{{- $target := trim (regexReplaceAll "^[^=]*=" (trim .) "") }}
{{- if or (not $target) (hasPrefix "dns:" (lower $target)) }}
{{- else if regexMatch "^(?i)https?://" $target }}
{{- $_ := set $ports (include "evidence-keeper.urlPort" $target) true -}}
{{- else if regexMatch ":[0-9]+$" $target }}
{{- $_ := set $ports (regexFind "[0-9]+$" $target) true -}}
{{- end }}
{{- end }}
{{- range $port, $_ := $ports }}
{{ $port }}
{{- end }}
{{- end }}

{{/* The port of an http(s) URL: explicit, else 443 for https and 80 for http. */}}
{{- define "evidence-keeper.urlPort" -}}
{{- $url := urlParse . -}}
{{- if regexMatch ":[0-9]+$" $url.host -}}
{{- regexFind "[0-9]+$" $url.host -}}
{{- else if eq (lower $url.scheme) "http" -}}
80
{{- else -}}
443
{{- end -}}
{{- end }}

{{/* The agent pod's securityContext from security.* (podSecurityContext is merged over it). */}}
{{- define "evidence-keeper.podSecurityContext" -}}
{{- if .Values.security.rootWithDacReadSearch }}
runAsNonRoot: false
runAsUser: 0
runAsGroup: 0
{{- else }}
runAsNonRoot: true
runAsUser: {{ .Values.security.runAsUser }}
runAsGroup: {{ .Values.security.runAsGroup }}
{{- with .Values.security.supplementalGroups }}
supplementalGroups:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
fsGroup: {{ .Values.security.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The agent container's securityContext (securityContext is merged over it). */}}
{{- define "evidence-keeper.containerSecurityContext" -}}
runAsNonRoot: {{ not .Values.security.rootWithDacReadSearch }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
  {{- if .Values.security.rootWithDacReadSearch }}
  add: ["DAC_READ_SEARCH"]
  {{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}
