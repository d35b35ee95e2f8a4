{{/*
Names that other things depend on are fixed: the CSI driver name is what
StorageClasses and PVs name, the Secret is what cairnd reads and what
`cairn-controller init-secret` creates, and the sockets are what the
sidecars and kubelet dial.
*/}}
{{- define "cairn.driverName" -}}csi.cairn.io{{- end }}
{{- define "cairn.clusterSecretName" -}}cairn-cluster-secret{{- end }}

{{/* kubelet's root, without a trailing slash. */}}
{{- define "cairn.kubeletDir" -}}{{ trimSuffix "/" .Values.kubeletDir }}{{- end }}
{{/* The node plugin's socket directory on the host. */}}
{{- define "cairn.pluginDir" -}}{{ include "cairn.kubeletDir" . }}/plugins/{{ include "cairn.driverName" . }}{{- end }}

{{/* Common labels; call with (dict "ctx" $ "component" "node"). */}}
{{- define "cairn.labels" -}}
{{ include "cairn.selectorLabels" . }}
app.kubernetes.io/part-of: cairn
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
{{- end }}

{{/* Selector labels (immutable in DaemonSets and Deployments). */}}
{{- define "cairn.selectorLabels" -}}
app.kubernetes.io/name: cairn
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{/* The Cairn image: repository:tag, the tag defaulting to appVersion. */}}
{{- define "cairn.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* A sidecar image; call with (dict "ctx" $ "image" .Values.csi.images.X). */}}
{{- define "cairn.sidecarImage" -}}
{{ .image.repository }}:{{ .image.tag }}
{{- end }}

{{/* imagePullSecrets of every pod (names or {name: ...} objects), on a new
line indented by 6; nothing when there are none. */}}
{{- define "cairn.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
{{- $out := list }}
{{- range . }}
{{- if kindIs "string" . }}
{{- $out = append $out (dict "name" .) }}
{{- else }}
{{- $out = append $out (dict "name" .name) }}
{{- end }}
{{- end }}
{{- dict "imagePullSecrets" $out | toYaml | nindent 6 }}
{{- end }}
{{- end }}

{{/* nodeSelector and tolerations shared by the node and controller pods. */}}
{{- define "cairn.placement" -}}
nodeSelector:
  kubernetes.io/os: linux
{{- with .Values.nodeSelector }}
{{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Container resources on a new line indented by 10; nothing when empty.
Call with (dict "r" .Values.resources.X). */}}
{{- define "cairn.resources" -}}
{{- with .r }}
{{- dict "resources" . | toYaml | nindent 10 }}
{{- end }}
{{- end }}

{{/* A restricted container: no privilege escalation, read-only root, no capabilities. */}}
{{- define "cairn.restrictedSecurityContext" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
{{- end }}

{{/* The downward-API environment the commands refer to as $(NAME). */}}
{{- define "cairn.env.nodeName" -}}
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
{{- end }}
{{- define "cairn.env.nodeIP" -}}
- name: NODE_IP
  valueFrom:
    fieldRef:
      fieldPath: status.hostIP
{{- end }}
{{- define "cairn.env.podNamespace" -}}
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end }}
