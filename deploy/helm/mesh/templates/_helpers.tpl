{{/* Image references: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "mesh.control.image" -}}
{{ .Values.control.image.repository }}:{{ .Values.control.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "mesh.node.image" -}}
{{ .Values.node.image.repository }}:{{ .Values.node.image.tag | default .Chart.AppVersion }}
{{- end }}
