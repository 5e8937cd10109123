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

{{/* A pool's consumer group: the release's full name and the pool's, so two releases on
     one Kafka never join each other's groups. */}}
{{- define "embedstream.poolGroupId" -}}
{{- .pool.groupId | default (include "embedstream.poolFullname" .) -}}
{{- end -}}

{{- define "embedstream.poolTopic" -}}
{{- .pool.topic | default (printf "embedstream.%s" .pool.modality) -}}
{{- end -}}

{{/* image: (dict "root" $ "image" $override) -> repository@digest, or repository:tag
     (tag default: the chart's appVersion). */}}
{{- define "embedstream.image" -}}
{{- $img := mergeOverwrite (deepCopy .root.Values.image) (.image | default dict) -}}
{{- include "embedstream.imageRef" (dict "root" .root "image" $img) -}}
{{- end -}}

{{/* (dict "root" $ "image" <string or {repository, tag, digest}>) -> an image reference. */}}
{{- define "embedstream.imageRef" -}}
{{- $img := .image -}}
{{- if kindIs "string" $img -}}{{ $img }}
{{- else if $img.digest -}}{{ printf "%s@%s" $img.repository $img.digest }}
{{- else -}}{{ printf "%s:%s" $img.repository ($img.tag | default .root.Chart.AppVersion) }}
{{- end -}}
{{- end -}}

{{- define "embedstream.imagePullPolicy" -}}
{{- $img := mergeOverwrite (deepCopy .root.Values.image) (.image | default dict) -}}
{{- $img.pullPolicy | default "IfNotPresent" -}}
{{- end -}}

{{/* Whole cores (min 1) of a resources block's CPU limit, or of its CPU request when it
     has no limit; 0 (every core the container sees) when it has neither. */}}
{{- define "embedstream.cpuCores" -}}
{{- $res := . | default dict -}}
{{- $cpu := toString (dig "limits" "cpu" "" $res) -}}
{{- if not $cpu -}}{{- $cpu = toString (dig "requests" "cpu" "" $res) -}}{{- end -}}
{{- if not $cpu -}}0
{{- else if hasSuffix "m" $cpu -}}{{ max 1 (div (atoi (trimSuffix "m" $cpu)) 1000) }}
{{- else -}}{{ max 1 (int (floor (float64 $cpu))) }}
{{- end -}}
{{- end -}}

{{/* True when a resources block asks for a GPU. */}}
{{- define "embedstream.wantsGpu" -}}
{{- $res := . | default dict -}}
{{- if or (hasKey ($res.limits | default dict) "nvidia.com/gpu") (hasKey ($res.requests | default dict) "nvidia.com/gpu") -}}true{{- end -}}
{{- end -}}

{{/* Model delivery of a pool or the gateway: the global modelDelivery with the override
     merged in, checked. (dict "root" $ "override" $o "owner" "name") -> YAML. */}}
{{- define "embedstream.delivery" -}}
{{- $d := mergeOverwrite (deepCopy .root.Values.modelDelivery) (.override | default dict) -}}
{{- if eq $d.mode "pvc" -}}
{{- if not $d.pvc.claimName -}}
{{- fail (printf "%s: modelDelivery.pvc.claimName is required with mode pvc" .owner) -}}
{{- end -}}
{{- else if eq $d.mode "init" -}}
{{- $src := trimSuffix "/" $d.init.sourcePath -}}
{{- $dst := trimSuffix "/" $d.init.targetPath -}}
{{- if or (eq $src $dst) (hasPrefix (printf "%s/" $dst) $src) (hasPrefix (printf "%s/" $src) $dst) -}}
{{- fail (printf "%s: modelDelivery.init.targetPath (%s) must not be, hold or sit inside sourcePath (%s): the volume mounted there would hide the image's models" .owner $dst $src) -}}
{{- end -}}
{{- else if and (eq $d.mode "image") (not (or .image.tag .image.digest)) -}}
{{- fail (printf "%s: modelDelivery.mode image needs an image with the models baked in (deploy/Dockerfile --target runtime-baked, tagged <version>-models): set image.tag or image.digest, or use mode init or pvc" .owner) -}}
{{- end -}}
{{- toYaml $d -}}
{{- end -}}

{{/* The init container that copies models into the models volume.
     (dict "root" $ "delivery" $d "models" $list) */}}
{{- define "embedstream.modelInitContainer" -}}
{{- $d := .delivery -}}
- name: fetch-models
  image: {{ include "embedstream.imageRef" (dict "root" .root "image" $d.init.image) }}
  imagePullPolicy: {{ $d.init.pullPolicy }}
  command:
    {{- toYaml $d.init.command | nindent 4 }}
  env:
    - name: MODEL_SOURCE
      value: {{ $d.init.sourcePath | quote }}
    - name: MODEL_TARGET
      value: {{ $d.init.targetPath | quote }}
    - name: MODELS
      value: {{ join " " .models | quote }}
  securityContext:
    {{- toYaml .root.Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml $d.init.resources | nindent 4 }}
  volumeMounts:
    # Not at sourcePath: a volume there would hide the files the command copies.
    - name: models
      mountPath: {{ $d.init.targetPath }}
{{- end -}}

{{/* The main container's mount of the models volume (none in mode image). */}}
{{- define "embedstream.modelMount" -}}
{{- $d := . -}}
{{- if ne $d.mode "image" }}
- name: models
  mountPath: {{ $d.path }}
  readOnly: true
  {{- if and (eq $d.mode "pvc") $d.pvc.subPath }}
  subPath: {{ $d.pvc.subPath }}
  {{- end }}
{{- end }}
{{- end -}}

{{- define "embedstream.modelVolume" -}}
{{- $d := . -}}
{{- if eq $d.mode "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ $d.pvc.claimName }}
    readOnly: true
{{- else if eq $d.mode "init" }}
- name: models
  emptyDir:
    sizeLimit: {{ $d.init.sizeLimit }}
{{- end }}
{{- end -}}

{{/* The Secrets of the Kafka CA and client certificate: each may come from its own
     Secret (Strimzi keeps the cluster CA and the KafkaUser apart). */}}
{{- define "embedstream.kafkaCaSecret" -}}
{{- .Values.kafka.tls.caSecret | default .Values.kafka.tls.existingSecret -}}
{{- end -}}
{{- define "embedstream.kafkaCertSecret" -}}
{{- if and .Values.kafka.tls.certKey .Values.kafka.tls.keyKey -}}
{{- .Values.kafka.tls.certSecret | default .Values.kafka.tls.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* Mounts and volumes of the TLS material (Kafka CA + client certificate in one
     projected volume, the Redis CA in another). */}}
{{- define "embedstream.tlsMounts" -}}
{{- if or (include "embedstream.kafkaCaSecret" .) (include "embedstream.kafkaCertSecret" .) }}
- name: kafka-tls
  mountPath: /etc/embedstream/kafka-tls
  readOnly: true
{{- end }}
{{- if .Values.redis.tls.caSecret }}
- name: redis-tls
  mountPath: /etc/embedstream/redis-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "embedstream.tlsVolumes" -}}
{{- $k := .Values.kafka.tls -}}
{{- $ca := include "embedstream.kafkaCaSecret" . -}}
{{- $cert := include "embedstream.kafkaCertSecret" . -}}
{{- if or $ca $cert }}
- name: kafka-tls
  projected:
    defaultMode: 0440
    sources:
      {{- if $ca }}
      - secret:
          name: {{ $ca }}
          items:
            - {key: {{ $k.caKey | quote }}, path: ca.crt}
      {{- end }}
      {{- if $cert }}
      - secret:
          name: {{ $cert }}
          items:
            - {key: {{ $k.certKey | quote }}, path: client.crt}
            - {key: {{ $k.keyKey | quote }}, path: client.key}
      {{- end }}
{{- end }}
{{- if .Values.redis.tls.caSecret }}
- name: redis-tls
  secret:
    secretName: {{ .Values.redis.tls.caSecret }}
    defaultMode: 0440
    items:
      - {key: {{ .Values.redis.tls.caKey | quote }}, path: ca.crt}
{{- end }}
{{- end -}}

{{/* Spread over nodes and zones; counted per ReplicaSet (pod-template-hash) so a rollout's
     new pods spread too. (dict "root" $ "labels" <selector labels YAML>) */}}
{{- define "embedstream.defaultSpread" -}}
{{- range $key := list "kubernetes.io/hostname" "topology.kubernetes.io/zone" }}
- maxSkew: 1
  topologyKey: {{ $key }}
  whenUnsatisfiable: ScheduleAnyway
  matchLabelKeys: [pod-template-hash]
  labelSelector:
    matchLabels:
      {{- $.labels | nindent 6 }}
{{- end }}
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
{{- if $k.sasl.username }}
- name: EMBEDSTREAM_KAFKA_SASL_USERNAME
  value: {{ $k.sasl.username | quote }}
{{- else }}
- name: EMBEDSTREAM_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $k.sasl.existingSecret }}
      key: {{ $k.sasl.usernameKey }}
{{- end }}
- name: EMBEDSTREAM_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $k.sasl.existingSecret }}
      key: {{ $k.sasl.passwordKey }}
{{- end }}
{{- if include "embedstream.kafkaCaSecret" . }}
- name: EMBEDSTREAM_KAFKA_SSL_CAFILE
  value: /etc/embedstream/kafka-tls/ca.crt
{{- end }}
{{- if include "embedstream.kafkaCertSecret" . }}
- name: EMBEDSTREAM_KAFKA_SSL_CERTFILE
  value: /etc/embedstream/kafka-tls/client.crt
- name: EMBEDSTREAM_KAFKA_SSL_KEYFILE
  value: /etc/embedstream/kafka-tls/client.key
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
{{- if .Values.redis.tls.caSecret }}
- name: EMBEDSTREAM_REDIS_SSL_CA_FILE
  value: /etc/embedstream/redis-tls/ca.crt
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
