{{/* Names, labels and the image reference shared by every template. */}}

{{- define "dreambooth-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name: <release>-<chart>, or just <release> when it already contains the chart name. */}}
{{- define "dreambooth-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "dreambooth-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dreambooth-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dreambooth-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dreambooth-operator.labels" -}}
helm.sh/chart: {{ include "dreambooth-operator.chart" . }}
{{ include "dreambooth-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: dreambooth-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "dreambooth-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dreambooth-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository@digest when a digest is pinned, else repository:tag (tag defaults to appVersion). */}}
{{- define "dreambooth-operator.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
Rules the operator needs inside every namespace it manages, derived from its API calls
(operator/dreambooth_operator/kube.py and the kopf handlers in handlers.py). Nothing on Secrets: a job's S3
credentials Secret reaches the trainer pods by secretKeyRef, which the kubelet resolves, never the operator.
*/}}
{{- define "dreambooth-operator.namespacedRules" -}}
# The jobs: kopf lists+watches them; the reconciler reads each one live and deletes it after
# runPolicy.ttlSecondsAfterFinished.
- apiGroups: ["dreambooth.dev"]
  resources: ["dreamboothjobs"]
  verbs: ["get", "list", "watch", "delete"]
# Status is written only through the status subresource (merge patch of the changed keys).
- apiGroups: ["dreambooth.dev"]
  resources: ["dreamboothjobs/status"]
  verbs: ["get", "patch"]
# Owned objects carry ownerReferences with blockOwnerDeletion: clusters with the
# OwnerReferencesPermissionEnforcement admission plugin (OpenShift, hardened clusters) require this.
- apiGroups: ["dreambooth.dev"]
  resources: ["dreamboothjobs/finalizers"]
  verbs: ["update"]
# The gang: kopf watches pods (by label) to wake the reconciler; the reconciler lists a job's pods, creates an
# attempt's pods, annotates them with the newest checkpoint's time and deletes them to tear an attempt down.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# The headless Service that gives each pod its DNS name for the torchrun rendezvous.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create"]
# The immutable ConfigMap holding the trainer config; read back to compare with the accepted spec.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create"]
# What `kubectl describe dbj` shows.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/* The webhook's Service and the name its serving certificate is for. */}}
{{- define "dreambooth-operator.webhookService" -}}
{{- printf "%s-webhook" (include "dreambooth-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dreambooth-operator.webhookSecret" -}}
{{- printf "%s-webhook-tls" (include "dreambooth-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
