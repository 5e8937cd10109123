{{/* Names and labels. */}}
{{- define "embedstream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "embedstream.fullname" -}}
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

{{- define "embedstream.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "embedstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "embedstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "embedstream.labels" -}}
helm.sh/chart: {{ include "embedstream.chart" . }}
{{ include "embedstream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: embedstream
{{- end -}}

{{- define "embedstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "embedstream.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Name of a pool's resources. Call with (dict "root" $ "pool" $pool). */}}
{{- define "embedstream.poolFullname" -}}
{{- printf "%s-%s" (include "embedstream.fullname" .root) .pool.name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "embedstream.poolSelectorLabels" -}}
{{ include "embedstream.selectorLabels" .root }}
app.kubernetes.io/component: worker
embedstream.io/pool: {{ .pool.name }}
{{- end -}}

{{- define "embedstream.poolGroupId" -}}
{{- .pool.groupId | default (printf "embedstream-%s" .pool.name) -}}
{{- end -}}

{{- define "embedstream.poolTopic" -}}
{{- .pool.topic | default (printf "embedstream.%s" .pool.modality) -}}
{{- end -}}

{{/* image: (dict "root" $ "image" $override) -> repository:tag */}}
{{- define "embedstream.image" -}}
{{- $img := mergeOverwrite (deepCopy .root.Values.image) (.image | default dict) -}}
{{- printf "%s:%s" $img.repository ($img.tag | default .root.Chart.AppVersion) -}}
{{- end -}}

{{- define "embedstream.imagePullPolicy" -}}
{{- $img := mergeOverwrite (deepCopy .root.Values.image) (.image | default dict) -}}
{{- $img.pullPolicy | default "IfNotPresent" -}}
{{- end -}}

{{/* Whole cores in a resources block's CPU limit (min 1), 0 when there is none. */}}
{{- define "embedstream.cpuLimitCores" -}}
{{- $cpu := toString (dig "limits" "cpu" "" (. | default dict)) -}}
{{- if not $cpu -}}0
{{- else if hasSuffix "m" $cpu -}}{{ max 1 (div (atoi (trimSuffix "m" $cpu)) 1000) }}
{{- else -}}{{ max 1 (int (floor (float64 $cpu))) }}
{{- end -}}
{{- end -}}

{{/* Kafka and Redis connection env, shared by workers and the gateway. */}}
{{- define "embedstream.connectionEnv" -}}
{{- $k := .Values.kafka -}}
- name: EMBEDSTREAM_KAFKA_BOOTSTRAP
  value: {{ $k.bootstrap | quote }}
- name: EMBEDSTREAM_KAFKA_SECURITY_PROTOCOL
  value: {{ $k.securityProtocol | quote }}
{{- if hasPrefix "SASL_" $k.securityProtocol }}
{{- if not $k.sasl.existingSecret }}
{{- fail "kafka.sasl.existingSecret is required when kafka.securityProtocol is SASL_PLAINTEXT or SASL_SSL" }}
{{- end }}
- name: EMBEDSTREAM_KAFKA_SASL_MECHANISM
  value: {{ $k.sasl.mechanism | quote }}
- name: EMBEDSTREAM_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $k.sasl.existingSecret }}
      key: {{ $k.sasl.usernameKey }}
- name: EMBEDSTREAM_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $k.sasl.existingSecret }}
      key: {{ $k.sasl.passwordKey }}
{{- end }}
{{- if $k.tls.existingSecret }}
- name: EMBEDSTREAM_KAFKA_SSL_CAFILE
  value: {{ printf "/etc/embedstream/kafka-tls/%s" $k.tls.caKey | quote }}
{{- if and $k.tls.certKey $k.tls.keyKey }}
- name: EMBEDSTREAM_KAFKA_SSL_CERTFILE
  value: {{ printf "/etc/embedstream/kafka-tls/%s" $k.tls.certKey | quote }}
- name: EMBEDSTREAM_KAFKA_SSL_KEYFILE
  value: {{ printf "/etc/embedstream/kafka-tls/%s" $k.tls.keyKey | quote }}
{{- end }}
{{- end }}
- name: EMBEDSTREAM_REDIS_URL
  value: {{ .Values.redis.url | quote }}
{{- if and .Values.redis.existingSecret .Values.redis.usernameKey }}
- name: EMBEDSTREAM_REDIS_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.usernameKey }}
{{- else if .Values.redis.username }}
- name: EMBEDSTREAM_REDIS_USERNAME
  value: {{ .Values.redis.username | quote }}
{{- end }}
{{- if .Values.redis.existingSecret }}
- name: EMBEDSTREAM_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.passwordKey }}
{{- end }}
{{- end -}}

{{/* KEDA's names for SASL mechanisms. */}}
{{- define "embedstream.kedaSasl" -}}
{{- $m := . -}}
{{- if eq $m "PLAIN" -}}plaintext
{{- else if eq $m "SCRAM-SHA-256" -}}scram_sha256
{{- else -}}scram_sha512
{{- end -}}
{{- end -}}
