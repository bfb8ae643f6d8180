{{/* Names, labels and small decisions shared by the templates. */}}

{{- define "kubeforge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubeforge.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "kubeforge.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "kubeforge.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubeforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubeforge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubeforge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubeforge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubeforge.labels" -}}
{{ include "kubeforge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubeforge
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* repository:tag or repository@digest; the tag defaults to the appVersion. */}}
{{- define "kubeforge.imageRef" -}}
{{- $img := index . 0 -}}{{- $ctx := index . 1 -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default $ctx.Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{/* "true" when the namespaced RBAC mode is selected (and validated). */}}
{{- define "kubeforge.namespaced" -}}
{{- if eq .Values.rbac.scope "namespaces" -}}
{{- if not .Values.watchNamespaces -}}
{{- fail "rbac.scope=namespaces needs at least one namespace in watchNamespaces" -}}
{{- end -}}
true
{{- else if .Values.watchNamespaces -}}
{{- fail "watchNamespaces is set but rbac.scope is cluster (a ClusterRole: every namespace): set rbac.scope=namespaces to give the operator Roles in those namespaces only, or empty watchNamespaces" -}}
{{- end -}}
{{- end -}}

{{- define "kubeforge.peering" -}}
{{- if or .Values.peering.enabled (gt (int .Values.replicaCount) 1) -}}true{{- end -}}
{{- end -}}

{{- define "kubeforge.webhookServiceName" -}}
{{- printf "%s-webhook" (include "kubeforge.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubeforge.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "kubeforge.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* NetworkPolicyPeers (a JSON list) allowed to scrape metrics: networkPolicy.prometheus's
selectors; an empty list when neither selector is set. */}}
{{- define "kubeforge.prometheusPeers" -}}
{{- $p := .Values.networkPolicy.prometheus | default dict -}}
{{- $peer := dict -}}
{{- with $p.namespaceSelector }}{{- $_ := set $peer "namespaceSelector" . -}}{{- end -}}
{{- with $p.podSelector }}{{- $_ := set $peer "podSelector" . -}}{{- end -}}
{{- if $peer }}{{ list $peer | toJson }}{{ else }}[]{{ end -}}
{{- end -}}

{{/* The operator's own pods as a NetworkPolicyPeer list (JSON): they read training progress
from the trainers' metrics endpoints. */}}
{{- define "kubeforge.operatorPeers" -}}
{{- $pods := include "kubeforge.selectorLabels" . | fromYaml -}}
{{- list (dict "namespaceSelector" (dict "matchLabels" (dict "kubernetes.io/metadata.name" .Release.Namespace)) "podSelector" (dict "matchLabels" $pods)) | toJson -}}
{{- end -}}
