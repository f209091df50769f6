#!/bin/bash
# training-infra instance agent: runs one training job on this box, saves everything to S3 and
# powers the box off. Deployed as EC2 user data (training_infra/compute/user_data.py); settings
# arrive as TI_* variables. Read docs/agent.md first. Order matters and follows DESIGN.md:
# logging, traps, OS deadline (before any network call), metadata and tags, image, data,
# checkpoints, trainer + watchers, then upload, status.json, _SUCCESS, notice, power-off.
# A managed run has many attempts (one instance each): the instance tags say which attempt this
# is, the run's one deadline and whether the supervisor asks it to stop.
# shellcheck disable=SC2317  # functions below are reached through traps and background jobs
set -Eeuo pipefail
umask 022

ROOT=${TI_ROOT:-}
AGENT_DIR=$ROOT/opt/training-infra
AGENT_TOOLS=$(dirname "${BASH_SOURCE[0]}")/agent_tools.py  # unpacked beside this script
STATE=$AGENT_DIR/state
LOG_DIR=$ROOT/var/log
SETUP_LOG=$LOG_DIR/training-setup.log
TRAIN_LOG=$LOG_DIR/training.log
DATA_DIR=$ROOT/data
OUT_DIR=$ROOT/outputs
CKPT_DIR=$ROOT/checkpoints
POWEROFF_CMD=${TI_POWEROFF_CMD:-shutdown -h now}
SHUTDOWN_BIN=${TI_SHUTDOWN_BIN:-shutdown}
NVIDIA_SMI=${TI_NVIDIA_SMI:-nvidia-smi}
DOCKER=${TI_DOCKER:-docker}
IMDS=${AWS_EC2_METADATA_SERVICE_ENDPOINT:-http://169.254.169.254}
IMDS=${IMDS%/}
SPOT_GRACE_CAP=80  # a spot notice gives 120 s: leave room to flush after the grace period
# The AWS CLI retries throttling and 5xx itself with backoff; our loops only cover the rest.
export AWS_RETRY_MODE=${AWS_RETRY_MODE:-standard} AWS_MAX_ATTEMPTS=${AWS_MAX_ATTEMPTS:-5}
export AWS_PAGER=""
[[ -z ${TI_REGION:-} ]] || export AWS_DEFAULT_REGION=$TI_REGION AWS_REGION=$TI_REGION

: "${TI_DATA_BUCKET:=}" "${TI_OUTPUTS_BUCKET:=}" "${TI_IMAGE_URI:=}" "${TI_IMAGE_TAG:=latest}"
: "${TI_TRAINING_COMMAND:=}" "${TI_RUN_ID:=}" "${TI_REGION:=}" "${TI_LOG_GROUP:=}"
: "${TI_ALERTS_TOPIC_ARN:=}" "${TI_METRIC_NAMESPACE:=TrainingInfra}" "${TI_MAX_RUNTIME_SECONDS:=43200}"
: "${TI_AUTO_SHUTDOWN:=true}" "${TI_IDLE_SECONDS:=1800}" "${TI_IDLE_GPU_PERCENT:=5}"
: "${TI_CHECKPOINT_SYNC_SECONDS:=300}" "${TI_SPOT_POLL_SECONDS:=5}" "${TI_STOP_GRACE_SECONDS:=60}"
: "${TI_MARKET:=spot}" "${TI_HOURLY_PRICE_USD:=0}" "${TI_EXTRA_ENV:=}" "${TI_STOP_ON_REBALANCE:=true}"
: "${TI_HEARTBEAT_FILE:=/run/training-infra/progress/heartbeat.json}" "${TI_STALL_SECONDS:=1200}" "${TI_RUNTIME:=docker}"
: "${TI_RETRY_ATTEMPTS:=4}" "${TI_RETRY_BASE_SECONDS:=5}" "${TI_LOG_SHIP_SECONDS:=10}" "${TI_FINALIZE_TIMEOUT_SECONDS:=900}"
: "${TI_PULL_TIMEOUT_SECONDS:=1800}" "${TI_DEADLINE_AT:=}"
: "${TI_SECRETS:=}" "${TI_TRAINER_ROLE_ARN:=}" "${TI_CREDENTIALS_REFRESH_SECONDS:=1800}" "${TI_TRAINER_SESSION_SECONDS:=3600}"
: "${TI_SECRETS_READER_ROLE_ARN:=}" "${TI_PROGRESS_METRIC_SECONDS:=60}"
RUNTIME=$TI_RUNTIME RETRIES=$TI_RETRY_ATTEMPTS
PROGRESS_DIR=$STATE/progress  # the container's /run/training-infra/progress: where the trainer beats
HEARTBEAT_HOST=$TI_HEARTBEAT_FILE  # the container's view of /outputs, /checkpoints and the progress folder
case $TI_HEARTBEAT_FILE in
  /outputs/* | /checkpoints/*) HEARTBEAT_HOST=$ROOT$TI_HEARTBEAT_FILE ;;
  /run/training-infra/progress/*) HEARTBEAT_HOST=$PROGRESS_DIR/${TI_HEARTBEAT_FILE#/run/training-infra/progress/} ;;
esac
HEARTBEAT_IN_CKPT=""  # its name in /checkpoints when it lives there: never synced, so never restored as an old beat
[[ $TI_HEARTBEAT_FILE != /checkpoints/* ]] || HEARTBEAT_IN_CKPT=${TI_HEARTBEAT_FILE#/checkpoints/}

OUTCOME="" MESSAGE="" EXIT_CODE="" RUN_ID="" TRAINER_PID="" TRAINER_STARTED=0 FINALIZING=""
KEPT_IN_A_ROW=0  # syncs in a row whose files moved under the upload (the manifest was kept)
COMPLETE_AS_OF=""  # when the last complete sync took its snapshot (this process's syncs; empty: none yet)
INSTANCE_ID=unknown INSTANCE_TYPE=unknown AZ=unknown MARKET=$TI_MARKET IMDS_TOKEN="" LOGS_OK=""
IMAGE="${TI_IMAGE_URI}:${TI_IMAGE_TAG}" CONTAINER=training-infra-trainer WATCHERS=()
# ATTEMPT 0: not known (no answer from IMDS), so this record never overwrites a real attempt's.
ATTEMPT=0 DEADLINE_EPOCH="" DEADLINE_WHY="" TAG=training-infra
START_EPOCH=$(date +%s)
STARTED_AT=$(date -u -d "@$START_EPOCH" +%Y-%m-%dT%H:%M:%SZ)

log() { printf '%s [agent] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }
# Milestones also go to the training log, so the CloudWatch stream tells the whole story.
# globals: reads TRAIN_LOG
note() { log "$*"; printf '%s [training-infra] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >>"$TRAIN_LOG"; }
# globals: sets OUTCOME MESSAGE
fail() { OUTCOME=failed MESSAGE=$*; log "FAILED: $*"; exit 1; }
awsc() { aws --cli-connect-timeout 10 "$@"; }

# Start a background job in its own process group, so it can be stopped with everything it runs.
# globals: sets LAST_PID
spawn() { set -m; "$@" & LAST_PID=$!; set +m; }
kill_group() { kill "-${2:-TERM}" -- "-$1" 2>/dev/null || true; }
alive() { kill -0 -- "-$1" 2>/dev/null; }

# globals: reads RETRIES TI_RETRY_BASE_SECONDS
retry() {  # retry DESCRIPTION COMMAND...: bounded attempts with exponential backoff
  local what=$1 n=1 pause
  shift
  until "$@"; do
    if ((n >= RETRIES)); then log "$what failed after $n attempts"; return 1; fi
    pause=$((TI_RETRY_BASE_SECONDS * 2 ** (n - 1)))
    log "$what failed (attempt $n of $RETRIES); retrying in ${pause}s"
    sleep "$pause"
    n=$((n + 1))
  done
}

# ---------------------------------------------------------------- settings (no network yet)
# globals: reads the setting named by $1
need_int() { [[ ${!1} =~ ^[0-9]+$ ]] || fail "$1='${!1}' is not allowed: use a whole number (seconds or a count)"; }
# globals: reads the setting named by $1
need_num() { [[ ${!1} =~ ^[0-9]+([.][0-9]+)?$ ]] || fail "$1='${!1}' is not allowed: use a number such as 5 or 0.5"; }
# globals: reads the setting named by $1
need_one() {
  local name=$1 value=${!1} allowed
  shift
  for allowed in "$@"; do [[ $value == "$allowed" ]] && return 0; done
  fail "$name='$value' is not allowed: use one of $*"
}
# globals: reads the TI_* settings, POWEROFF_CMD, STATE (writes $STATE/trainer.env)
validate() {
  local v line
  for v in TI_MAX_RUNTIME_SECONDS TI_IDLE_SECONDS TI_CHECKPOINT_SYNC_SECONDS TI_SPOT_POLL_SECONDS \
    TI_STOP_GRACE_SECONDS TI_STALL_SECONDS TI_RETRY_ATTEMPTS TI_RETRY_BASE_SECONDS \
    TI_LOG_SHIP_SECONDS TI_FINALIZE_TIMEOUT_SECONDS TI_PULL_TIMEOUT_SECONDS TI_CREDENTIALS_REFRESH_SECONDS TI_TRAINER_SESSION_SECONDS TI_PROGRESS_METRIC_SECONDS; do
    need_int "$v"
  done
  for v in TI_IDLE_GPU_PERCENT TI_HOURLY_PRICE_USD; do need_num "$v"; done
  need_one TI_AUTO_SHUTDOWN true false
  need_one TI_STOP_ON_REBALANCE true false
  need_one TI_MARKET spot on-demand
  need_one TI_RUNTIME docker process
  for v in TI_MAX_RUNTIME_SECONDS TI_SPOT_POLL_SECONDS TI_CHECKPOINT_SYNC_SECONDS TI_LOG_SHIP_SECONDS TI_RETRY_ATTEMPTS \
    TI_PULL_TIMEOUT_SECONDS; do
    ((${!v} > 0)) || fail "$v=0 is not allowed: use at least 1"
  done
  [[ -n $TI_DATA_BUCKET && -n $TI_OUTPUTS_BUCKET && -n $TI_IMAGE_URI ]] ||
    fail "TI_DATA_BUCKET, TI_OUTPUTS_BUCKET and TI_IMAGE_URI must all be set"
  [[ $TI_RUNTIME == docker || -n $TI_TRAINING_COMMAND ]] ||
    fail "TI_TRAINING_COMMAND is empty: the process runtime has no image CMD to fall back on"
  [[ -z $TI_RUN_ID || $TI_RUN_ID =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] ||
    fail "TI_RUN_ID='$TI_RUN_ID' is not allowed: use letters, digits, '.', '_' and '-'"
  # References only: a literal value here would be logged by the AWS error that names it.
  while read -r line; do
    [[ -z $line || $line =~ ^[A-Za-z_][A-Za-z0-9_]*=(ssm:/|arn:aws[a-z-]*:secretsmanager:). ]] ||
      fail "TI_SECRETS line '$line' is not allowed: use NAME=ssm:/PATH or NAME=arn:aws:secretsmanager:..."
  done <<<"$TI_SECRETS"
  [[ -z $TI_SECRETS || -n $TI_SECRETS_READER_ROLE_ARN ]] || fail "TI_SECRETS is set but TI_SECRETS_READER_ROLE_ARN is empty: nothing may read them"
  [[ $POWEROFF_CMD != *halt* ]] || fail "TI_POWEROFF_CMD='$POWEROFF_CMD' is not allowed: halt leaves the instance billing"
  if [[ -n $TI_DEADLINE_AT ]]; then
    set_deadline "$TI_DEADLINE_AT" ||
      fail "TI_DEADLINE_AT='$TI_DEADLINE_AT' is not allowed: use an ISO 8601 UTC time such as 2026-11-29T18:00:00Z"
  else
    DEADLINE_EPOCH=$((START_EPOCH + TI_MAX_RUNTIME_SECONDS)) DEADLINE_WHY="max runtime of ${TI_MAX_RUNTIME_SECONDS}s"
  fi
  # --env values are not secrets, but they are the trainer's business only.
  (umask 077 && : >"$STATE/trainer.env")
  while IFS= read -r line; do
    [[ -z $line ]] && continue
    [[ $line =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || fail "TI_EXTRA_ENV line '$line' is not allowed: use KEY=VALUE"
    printf '%s\n' "$line" >>"$STATE/trainer.env"
  done <<<"$TI_EXTRA_ENV"
}

# ---------------------------------------------------------------- the run's deadline
# globals: sets DEADLINE_EPOCH DEADLINE_WHY
set_deadline() {  # set_deadline ISO-TIME: the run's one absolute deadline; fails on anything else
  local epoch
  [[ $1 =~ ^[0-9]{4}-[0-9-]{5}T[0-9:.]+(Z|[+-][0-9:]+)$ ]] &&
    epoch=$(date -u -d "$1" +%s 2>/dev/null) || return 1
  DEADLINE_EPOCH=$epoch DEADLINE_WHY="the run's deadline $1"
}
# globals: reads DEADLINE_EPOCH DEADLINE_WHY SHUTDOWN_BIN
arm_os_deadline() {  # shutdown -h +N at the deadline, rounded up to minutes; one minute when it has passed
  local left=$((DEADLINE_EPOCH - $(date +%s))) minutes=1
  ((left <= 0)) || minutes=$(((left + 59) / 60))
  if "$SHUTDOWN_BIN" -h "+$minutes" "training-infra: $DEADLINE_WHY reached"; then
    log "OS deadline set: power-off in $minutes min ($DEADLINE_WHY)"
  else
    log "WARNING: could not schedule the OS deadline; the agent deadline and the cloud reaper remain"
  fi
}

# ---------------------------------------------------------------- instance metadata (IMDSv2)
# globals: reads IMDS; sets IMDS_TOKEN
imds_token() {
  IMDS_TOKEN=$(curl -sf --max-time 2 --retry 3 --retry-connrefused -X PUT \
    -H 'X-aws-ec2-metadata-token-ttl-seconds: 21600' "$IMDS/latest/api/token")
}
# globals: reads IMDS; sets IMDS_TOKEN (renewed when expired)
imds_get() {  # imds_get PATH: prints the body; fails on 404 and other errors; renews an expired token
  local out code try
  for try in 1 2; do
    out=$(curl -s --max-time 2 -w '\n%{http_code}' -H "X-aws-ec2-metadata-token: $IMDS_TOKEN" "$IMDS/latest/$1") || return 1
    code=${out##*$'\n'}
    if [[ $code == 401 && $try == 1 ]]; then imds_token || return 1; continue; fi
    [[ $code == 200 ]] || return 1
    printf '%s' "${out%$'\n'*}"
    return 0
  done
  return 1
}
# globals: reads TI_MARKET TI_REGION; sets INSTANCE_ID INSTANCE_TYPE AZ MARKET REGION
read_metadata() {
  retry "instance metadata token" imds_token || fail "instance metadata (IMDSv2) at $IMDS did not answer"
  INSTANCE_ID=$(imds_get meta-data/instance-id) || fail "could not read instance-id from IMDS at $IMDS"
  INSTANCE_TYPE=$(imds_get meta-data/instance-type || echo unknown)
  AZ=$(imds_get meta-data/placement/availability-zone || echo unknown)
  MARKET=$(imds_get meta-data/instance-life-cycle || echo "$TI_MARKET")
  REGION=${TI_REGION:-$(imds_get meta-data/placement/region || true)}
  [[ -n $REGION ]] || REGION=${AZ%[a-z]}
  export AWS_DEFAULT_REGION=$REGION AWS_REGION=$REGION
  read_tags
}
# globals: reads TAG TI_DEADLINE_AT; sets ATTEMPT (and, through set_deadline, the deadline)
read_tags() {  # which attempt this is and the run's deadline, from the instance tags (404: tags off or none)
  local keys value=""
  keys=$(imds_get meta-data/tags/instance || true)
  ATTEMPT=1
  if grep -qxF "$TAG:attempt" <<<"$keys"; then
    value=$(tag attempt) && [[ $value =~ ^[1-9][0-9]{0,5}$ ]] ||
      { ATTEMPT=0; fail "tag $TAG:attempt='$value' is not allowed: use a whole number from 1"; }
    ATTEMPT=$value
  fi
  if [[ -z $TI_DEADLINE_AT ]] && grep -qxF "$TAG:deadline" <<<"$keys"; then
    { value=$(tag deadline) && set_deadline "$value"; } || fail "tag $TAG:deadline='$value' is not allowed: use an ISO 8601 UTC time"
    arm_os_deadline  # the tag's instant replaces the max-runtime deadline set before
  fi
}
tag() { imds_get "meta-data/tags/instance/$TAG:$1"; }  # tag NAME: its value; fails when absent
# globals: reads TAG IMDS_TOKEN; sets STOP_OUTCOME STOP_MESSAGE
stop_requested() {  # the supervisor tags the instance stop=user|budget|stall; fails while there is none
  local reason
  reason=$(tag stop) || return 1
  case $reason in budget) STOP_OUTCOME=budget ;; stall) STOP_OUTCOME=stalled ;; *) STOP_OUTCOME=stopped ;; esac
  STOP_MESSAGE="stop requested (tag $TAG:stop=${reason//[^A-Za-z0-9._-]/?})"
}
# globals: reads TI_RUN_ID START_EPOCH INSTANCE_ID TI_OUTPUTS_BUCKET ATTEMPT; sets RUN_ID RUN_PREFIX ATTEMPT_PREFIX CKPT_PREFIX
set_run_id() {
  local id=$TI_RUN_ID
  [[ -n $id ]] || id="$(date -u -d "@$START_EPOCH" +%Y%m%d-%H%M%S)-${INSTANCE_ID}"
  # A rejected TI_RUN_ID (the finalizer still names the run) must not reach an S3 key.
  [[ $id =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || id=invalid-$([[ $INSTANCE_ID != unknown ]] && echo "$INSTANCE_ID" ||
    { imds_token && imds_get meta-data/instance-id; } || date -u +unknown-%Y%m%d-%H%M%S)
  RUN_ID=${id,,}
  RUN_PREFIX=s3://$TI_OUTPUTS_BUCKET/runs/$RUN_ID
  ATTEMPT_PREFIX=$RUN_PREFIX/attempts/$ATTEMPT  # this attempt's own status.json and logs
  CKPT_KEY_PREFIX=checkpoints/$RUN_ID/ CKPT_PREFIX=s3://$TI_OUTPUTS_BUCKET/checkpoints/$RUN_ID
}

# ---------------------------------------------------------------- CloudWatch Logs (stream = run id)
# globals: reads TI_LOG_GROUP RUN_ID; sets LOGS_OK
open_log_stream() {
  [[ -n $TI_LOG_GROUP ]] || { log "no TI_LOG_GROUP: training output stays in S3 only"; return 0; }
  local err
  if err=$(awsc logs create-log-stream --log-group-name "$TI_LOG_GROUP" --log-stream-name "$RUN_ID" 2>&1) ||
    [[ $err == *ResourceAlreadyExists* ]]; then
    LOGS_OK=1
  else
    log "WARNING: cannot open log stream $TI_LOG_GROUP/$RUN_ID (training output stays in S3): $err"
  fi
}
# globals: reads LOGS_OK TRAIN_LOG STATE TI_LOG_GROUP RUN_ID
ship_logs() {  # ship_logs [--final]: send new lines of the training log to CloudWatch in batches
  [[ -n $LOGS_OK ]] || return 0
  local count
  while count=$(python3 "$AGENT_TOOLS" log-batch "$TRAIN_LOG" "$STATE/log.offset" "$STATE/log.batch.json" "$@"); do
    ((count >= 0)) || return 0
    if ((count > 0)); then
      awsc logs put-log-events --log-group-name "$TI_LOG_GROUP" --log-stream-name "$RUN_ID" \
        --log-events "file://$STATE/log.batch.json" >/dev/null || return 1
    fi
    mv "$STATE/log.offset.next" "$STATE/log.offset"
  done
}

# ---------------------------------------------------------------- image, data, checkpoints
# globals: reads TI_IMAGE_URI TI_IMAGE_TAG IMAGE RUNTIME DOCKER TI_PULL_TIMEOUT_SECONDS
fetch_image() {
  local registry=${TI_IMAGE_URI%%/*} repo=${TI_IMAGE_URI#*/} password digest registry_id=()
  if [[ $registry == *.dkr.ecr.*.amazonaws.com* ]]; then
    [[ ${registry%%.*} =~ ^[0-9]{12}$ ]] && registry_id=(--registry-id "${registry%%.*}")
    password=$(awsc ecr get-login-password) || return 1
    if [[ $RUNTIME == docker ]]; then
      # A registry that accepts the connection and never answers would hold a login for ever, too.
      timeout "$TI_PULL_TIMEOUT_SECONDS" "$DOCKER" login --username AWS --password-stdin "$registry" \
        <<<"$password" >/dev/null || return 1
    fi
  fi
  if [[ $RUNTIME == docker ]]; then
    # A stalled pull never ends by itself, and the deadline watcher only starts with the trainer.
    timeout "$TI_PULL_TIMEOUT_SECONDS" "$DOCKER" pull --quiet "$IMAGE" ||
      { local rc=$?; ((rc != 124)) || log "docker pull stalled: cut after ${TI_PULL_TIMEOUT_SECONDS}s"; return "$rc"; }
  elif [[ ${#registry_id[@]} -gt 0 || $registry == *.dkr.ecr.* ]]; then
    # No Docker engine here: prove the image exists, then run the same command directly.
    digest=$(awsc ecr describe-images --repository-name "$repo" "${registry_id[@]}" \
      --image-ids "imageTag=$TI_IMAGE_TAG" --query 'imageDetails[0].imageDigest' --output text) || return 1
    log "image $IMAGE is in ECR ($digest); the process runtime runs its command directly"
  fi
}
# S3 mirrors /checkpoints, so a resume downloads what the trainer kept, not every checkpoint
# it ever wrote. Files ending in .tmp are half-written (trainers write there, then rename).
# One sync at a time (a lock: the periodic, the rebalance and the final sync share the state files):
#   1. upload what changed, deleting nothing;
#   2. _manifest.json names the files the upload carried (present when it started, unchanged when it
#      ended) with the S3 version it made of each;
#   3. only then delete what the trainer no longer keeps (the outputs bucket is versioned, so even
#      that stays recoverable for its noncurrent-version days).
# A restore takes exactly the manifest's versions, so a box killed mid-upload (a shard rewritten
# under its old name, a rotated checkpoint half replaced) resumes from the last complete set.
# globals: reads CKPT_DIR CKPT_PREFIX STATE HEARTBEAT_IN_CKPT; sets LAST_SYNC_SECONDS
# --no-follow-symlinks: the trainer writes here, and a link to a host file must not upload that file.
sync_checkpoints() {
  { flock 9 && upload_checkpoints; } 9>"$STATE/ckpt.lock"
}
upload_checkpoints() {
  local began=$SECONDS batch skip=() manifest failed errors snapshot_at
  [[ -z $HEARTBEAT_IN_CKPT ]] || skip=(--exclude "$HEARTBEAT_IN_CKPT")
  snapshot_at=$(date +%s)
  python3 "$AGENT_TOOLS" manifest snapshot --folder "$CKPT_DIR" --skip "$HEARTBEAT_IN_CKPT" --snapshot "$STATE/ckpt.snapshot.json" ||
    return 1
  if ! errors=$(awsc s3 sync "$CKPT_DIR/" "$CKPT_PREFIX/" --exclude '*.tmp' --exclude _manifest.json "${skip[@]}" \
    --no-follow-symlinks --only-show-errors 2>&1); then
    # A checkpoint the trainer rotated away between the CLI's listing and its read is gone, not a failure.
    if grep -v -e 'No such file or directory' -e 'File does not exist' <<<"$errors" | grep -q .; then
      printf '%s\n' "$errors" >&2
      return 1
    fi
  fi
  checkpoint_versions "$STATE/ckpt.versions.json" &&
    manifest=$(python3 "$AGENT_TOOLS" manifest commit --folder "$CKPT_DIR" --skip "$HEARTBEAT_IN_CKPT" \
      --snapshot "$STATE/ckpt.snapshot.json" --versions "$STATE/ckpt.versions.json" --prefix "$CKPT_KEY_PREFIX" \
      --manifest "$STATE/_manifest.json" --sent "$STATE/_manifest.sent.json") || return 1
  LAST_SYNC_SECONDS=$((SECONDS - began))
  if [[ $manifest == kept* ]]; then
    KEPT_IN_A_ROW=$((KEPT_IN_A_ROW + 1))
    log "checkpoint files changed during the upload (${manifest#kept }): the manifest keeps the last complete set"
    ((KEPT_IN_A_ROW != 3)) || note "WARNING: for 3 syncs in a row the trainer rewrote checkpoint files while they" \
      "uploaded (${manifest#kept }), so S3's last complete checkpoint is getting old: save to a new name or *.tmp," \
      "then rename"
    return 0
  fi
  KEPT_IN_A_ROW=0
  if [[ $manifest == changed ]]; then
    awsc s3 cp "$STATE/_manifest.json" "$CKPT_PREFIX/_manifest.json" --only-show-errors || return 1
    cp "$STATE/_manifest.json" "$STATE/_manifest.sent.json"
  fi
  COMPLETE_AS_OF=$snapshot_at  # S3's manifest now names every checkpoint the trainer had then
  for batch in "$STATE"/ckpt.delete.*.json; do
    [[ -e $batch ]] || continue
    # Quiet: only the keys that failed come back (exit 0 even then).
    # shellcheck disable=SC2016  # a JMESPath literal
    failed=$(awsc s3api delete-objects --bucket "$TI_OUTPUTS_BUCKET" --delete "file://$batch" --output text \
      --query 'length(Errors || `[]`)') && [[ $failed == 0 ]] ||
      log "WARNING: checkpoints the trainer no longer keeps were not deleted from S3 ($failed); the next sync tries again"
  done
}
# checkpoint_versions OUT: the newest version of each object under checkpoints/<run-id>/ (JSON, null when none)
checkpoint_versions() {
  # shellcheck disable=SC2016  # a JMESPath expression
  awsc s3api list-object-versions --bucket "$TI_OUTPUTS_BUCKET" --prefix "$CKPT_KEY_PREFIX" --output json \
    --query 'Versions[?IsLatest].[Key,VersionId,ETag,Size]' >"$1"
}
# globals: reads CKPT_PREFIX CKPT_KEY_PREFIX CKPT_DIR STATE TI_OUTPUTS_BUCKET
restore_checkpoints() {  # the last complete sync's set; a run from before manifests: everything
  local filters=(--exclude '*' --include '*') name version error fetched=0 cut="" taken left
  if awsc s3 cp "$CKPT_PREFIX/_manifest.json" "$STATE/restored-manifest.json" --only-show-errors 2>/dev/null; then
    checkpoint_versions "$STATE/restore.versions.json" &&
      read -r taken left < <(python3 "$AGENT_TOOLS" manifest plan --manifest "$STATE/restored-manifest.json" \
        --versions "$STATE/restore.versions.json" --prefix "$CKPT_KEY_PREFIX" --filters "$STATE/restore.filters" \
        --by-version "$STATE/restore.by-version") || return 1
    ((taken > 0)) || note "WARNING: the checkpoint manifest names no files (the trainer kept none at the last" \
      "complete sync; $left other objects in $CKPT_PREFIX/): starting without a checkpoint"
    mapfile -t filters <"$STATE/restore.filters"
    while IFS=$'\t' read -r name version; do
      mkdir -p "$(dirname "$CKPT_DIR/$name")"
      if ! error=$(awsc s3api get-object --bucket "$TI_OUTPUTS_BUCKET" --key "$CKPT_KEY_PREFIX$name" --version-id "$version" \
        "$CKPT_DIR/$name" 2>&1 >/dev/null); then
        [[ $error != *NoSuchVersion* ]] || fail "checkpoint $name: the version the last complete sync recorded is gone" \
          "(replaced versions under checkpoints/ expire after 1 day), and the newer objects may mix two saves;" \
          "to resume from them anyway, delete $CKPT_PREFIX/_manifest.json and relaunch"
        log "$error"
        return 1
      fi
      fetched=$((fetched + 1))
    done <"$STATE/restore.by-version"
    ((fetched == 0)) || cut=" ($fetched by their recorded version: a later upload was cut short)"
    log "checkpoint manifest: restoring $(((${#filters[@]} - 2) / 2 + fetched)) files of the last complete sync$cut"
  fi
  [[ -e $STATE/restored-manifest.json ]] || log "no checkpoint manifest (none, or a run from before manifests): every object"
  awsc s3 sync "$CKPT_PREFIX/" "$CKPT_DIR/" --exclude _manifest.json "${filters[@]}" --only-show-errors
}
# When the last complete sync (a manifest naming every checkpoint the trainer had) is older than two
# sync intervals plus the last upload's time while the trainer keeps writing newer checkpoints
# (uploads failing silently, or files rewritten during every upload so no set is ever whole), each
# attempt says so once in its log and with a CheckpointStale metric; the alert topic hears it once per
# run (run_was_told). A heartbeat kept under /checkpoints is no checkpoint: never synced, always newer.
# globals: reads CKPT_DIR CKPT_PREFIX TI_CHECKPOINT_SYNC_SECONDS LAST_SYNC_SECONDS COMPLETE_AS_OF TRAINER_STARTED
# STATE RUN_ID TI_ALERTS_TOPIC_ARN TI_METRIC_NAMESPACE HEARTBEAT_IN_CKPT
check_checkpoint_freshness() {
  local newest_local now words skip=() complete=${COMPLETE_AS_OF:-$TRAINER_STARTED}
  [[ ! -e $STATE/checkpoint-stale-noticed ]] || return 0
  [[ -z $HEARTBEAT_IN_CKPT ]] || skip=(! -path "$CKPT_DIR/$HEARTBEAT_IN_CKPT")
  newest_local=$(find "$CKPT_DIR" -type f ! -name '*.tmp' "${skip[@]}" -printf '%T@\n' | sort -n | tail -n 1)
  [[ -n $newest_local ]] || return 0
  now=$(date +%s)
  ((${newest_local%.*} > complete && now - complete > 2 * TI_CHECKPOINT_SYNC_SECONDS + ${LAST_SYNC_SECONDS:-0})) ||
    return 0
  : >"$STATE/checkpoint-stale-noticed"
  words="the last complete checkpoint in $CKPT_PREFIX/ is $((now - complete))s old while the trainer wrote newer ones"
  words+=" locally (or rewrites its files during every upload): uploads are failing"
  awsc cloudwatch put-metric-data --namespace "$TI_METRIC_NAMESPACE" --metric-name CheckpointStale \
    --dimensions "RunId=$RUN_ID" --value 1 --unit Count || true
  if [[ -z $TI_ALERTS_TOPIC_ARN ]]; then
    note "WARNING: $words (said once; no alert topic)"
  elif run_was_told checkpoint-stale; then
    note "WARNING: $words (said once; an earlier attempt of this run sent the notice)"
  elif awsc sns publish --topic-arn "$TI_ALERTS_TOPIC_ARN" --subject "training-infra run $RUN_ID: checkpoints are not reaching S3" \
    --message "Run $RUN_ID: $words." >/dev/null; then
    run_told checkpoint-stale "$words"
    note "WARNING: $words (said once; notice sent)"
  else
    note "WARNING: $words (said once; the notice could not be sent, a later attempt of this run tries again)"
  fi
}
# A notice goes to the alert topic once per run: $STATE dies with the box, so the run remembers it in
# S3, runs/<id>/notices/<what>-<deadline epoch>. The deadline is the run's (every attempt of a launch
# shares it; `launch --resume` sets a new one, and so is told again), or this box's own outside a
# managed run, whose run id (`default`) many boxes share. The marker is written right after the notice
# went out: a notice that failed is tried again by the next attempt, never lost (a box lost between the
# two sends it twice). Listed, not read: the instance role may list runs/, but reading a key that is
# not there answers 403 without s3:ListBucket on the whole bucket, as if the S3 were unreadable.
# globals: reads TI_OUTPUTS_BUCKET RUN_ID DEADLINE_EPOCH
run_was_told() {  # run_was_told WHAT: succeeds when an earlier attempt sent it; unknown (S3 unreadable) is "no"
  local key=runs/$RUN_ID/notices/$1-$DEADLINE_EPOCH found
  # shellcheck disable=SC2016  # a JMESPath literal; KeyCount is None once the CLI has merged the pages
  if ! found=$(awsc s3api list-objects-v2 --bucket "$TI_OUTPUTS_BUCKET" --prefix "$key" \
    --query 'length(Contents || `[]`)' --output text 2>&1) || [[ ! $found =~ ^[0-9]+$ ]]; then
    log "WARNING: cannot tell whether the run was told of $1 (${found//$'\n'/ }): this attempt tells it"
    return 1
  fi
  ((found > 0))
}
# globals: reads RUN_PREFIX DEADLINE_EPOCH STATE
run_told() {  # run_told WHAT WORDS: remember that the run was told
  printf '%s\n' "$2" >"$STATE/notice-$1.txt"
  awsc s3 cp "$STATE/notice-$1.txt" "$RUN_PREFIX/notices/$1-$DEADLINE_EPOCH" --only-show-errors ||
    log "WARNING: the $1 notice is not recorded in S3: a later attempt may send it again"
}
# globals: reads STATE SETUP_LOG TRAIN_LOG ATTEMPT_PREFIX
upload_logs() {
  mkdir -p "$STATE/logs"
  cp "$SETUP_LOG" "$TRAIN_LOG" "$STATE/logs/"
  [[ ! -f $LOG_DIR/training-diagnostics.txt ]] || cp "$LOG_DIR/training-diagnostics.txt" "$STATE/logs/"
  awsc s3 sync "$STATE/logs/" "$ATTEMPT_PREFIX/logs/" --only-show-errors
}

# ---------------------------------------------------------------- secrets and AWS access for the trainer
# Secret values live only in a 0600 file under $STATE until the trainer has started, then in its
# environment: never in user data, a log or status.json. Errors name the reference, not the value.
# They are read with a short session of the secrets reader role whose session policy names only
# the references in TI_SECRETS (the instance role itself reads no secret); the session is dropped after.
# globals: reads TI_SECRETS TI_SECRETS_READER_ROLE_ARN REGION RUN_ID STATE
fetch_secrets() {
  local line ref value policy keys reader
  (umask 077 && : >"$STATE/secrets.env")
  [[ -n $TI_SECRETS ]] || return 0
  policy=$(python3 "$AGENT_TOOLS" secrets-policy "$TI_SECRETS_READER_ROLE_ARN" "$REGION" <<<"$TI_SECRETS") || return 1
  keys=$(awsc sts assume-role --role-arn "$TI_SECRETS_READER_ROLE_ARN" --role-session-name "ti-secrets-${RUN_ID:0:53}" \
    --duration-seconds 900 --policy "$policy" --query 'Credentials.[AccessKeyId,SecretAccessKey,SessionToken]' --output text) || return 1
  read -r -a reader <<<"$keys"
  while read -r line; do
    ref=${line#*=}
    case $ref in
      "") continue ;;
      ssm:*) value=$(as_reader ssm get-parameter --name "${ref#ssm:}" --with-decryption --query Parameter.Value --output text) ;;
      *) value=$(as_reader secretsmanager get-secret-value --secret-id "$ref" --query SecretString --output text) ;;
    esac || return 1
    # A second line would be read by `docker --env-file` as a variable to copy from the agent's environment.
    [[ $value != *$'\n'* ]] || fail "secret $ref has more than one line"
    printf '%s=%s\n' "${line%%=*}" "$value" >>"$STATE/secrets.env"
  done <<<"$TI_SECRETS"
}
# globals: reads reader (fetch_secrets' session): in the AWS CLI's environment only, never the agent's
as_reader() { AWS_ACCESS_KEY_ID=${reader[0]} AWS_SECRET_ACCESS_KEY=${reader[1]} AWS_SESSION_TOKEN=${reader[2]} awsc "$@"; }
# Without a trainer role the container gets no AWS credentials (IMDS is one hop away only for the host).
# The session is credential_process JSON behind an AWS config file: SDKs run `cat` again before its
# Expiration, so a renewed session reaches a trainer that runs for days (a credentials file is read once).
# globals: reads TI_TRAINER_ROLE_ARN TI_TRAINER_SESSION_SECONDS RUN_ID STATE
assume_trainer_role() {
  mkdir -p "$STATE/aws"
  # Written beside, then renamed: the container (which mounts the folder) never reads half a file.
  # shellcheck disable=SC2016  # `1` is a JMESPath literal
  (umask 077 && awsc sts assume-role --role-arn "$TI_TRAINER_ROLE_ARN" --role-session-name "ti-${RUN_ID:0:61}" \
    --duration-seconds "$TI_TRAINER_SESSION_SECONDS" --tags "Key=training-infra:run-id,Value=$RUN_ID" --output json \
    --query 'merge({Version: `1`}, Credentials)' >"$STATE/aws/session.new") && mv "$STATE/aws/session.new" "$STATE/aws/session.json" && log "trainer role session written"
}
# trainer_aws_config DIR: the config file the trainer's SDKs read, DIR being $STATE/aws as the trainer sees it.
# globals: reads STATE
trainer_aws_config() { printf "[default]\ncredential_process = cat '%s/session.json'\n" "$1" >"$STATE/aws/config"; }
# PyTorch data loaders pass batches through /dev/shm: half the memory, at least 1 GiB (Docker's default is 64 MiB).
shm_size() { awk '/^MemTotal:/ { k = int($2 / 2); print (k < 1048576 ? 1048576 : k) "k" }' /proc/meminfo; }

# ---------------------------------------------------------------- the trainer
# globals: reads RUN_ID DATA_DIR OUT_DIR CKPT_DIR HEARTBEAT_HOST STATE TI_TRAINING_COMMAND
run_process_trainer() {  # the `process` runtime: the container's command, run directly
  local line
  export RUN_ID DATA_DIR OUTPUT_DIR=$OUT_DIR CHECKPOINT_DIR=$CKPT_DIR HEARTBEAT_FILE=$HEARTBEAT_HOST
  trap - ERR
  while IFS= read -r line; do export "${line?}"; done <"$STATE/trainer.env"
  while IFS= read -r line; do export "${line?}"; done <"$STATE/secrets.env" && rm "$STATE/secrets.env"
  [[ -z $TI_TRAINER_ROLE_ARN ]] || { unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_PROFILE
    export AWS_CONFIG_FILE=$STATE/aws/config AWS_SHARED_CREDENTIALS_FILE=/dev/null; }
  exec bash -c "$TI_TRAINING_COMMAND"
}
# globals: reads RUNTIME IMAGE RUN_ID CONTAINER DOCKER STATE the paths and TI_*; sets TRAINER_STARTED TRAINER_PID
start_trainer() {
  local command=()
  TRAINER_STARTED=$(date +%s)
  note "starting trainer ($RUNTIME runtime, image $IMAGE, run $RUN_ID)"
  if [[ $RUNTIME == docker ]]; then
    [[ -z $TI_TRAINING_COMMAND ]] || command=(sh -c "$TI_TRAINING_COMMAND")
    # In a container the shell is the init's child: on SIGTERM it exits and the container ends with it.
    [[ $TI_TRAINING_COMMAND != *[\;\&\|]* || $TI_TRAINING_COMMAND == *exec\ * ]] ||
      note "WARNING: TI_TRAINING_COMMAND has no exec: on SIGTERM its shell exits and the trainer dies unsaved"
    "$DOCKER" rm -f "$CONTAINER" >/dev/null 2>&1 || true
    local aws=(-e "AWS_REGION=$REGION" -e "AWS_DEFAULT_REGION=$REGION" -e AWS_EC2_METADATA_DISABLED=true)
    [[ -z $TI_TRAINER_ROLE_ARN ]] ||
      aws+=(-v "$STATE/aws:/run/training-infra/aws:ro" -e AWS_CONFIG_FILE=/run/training-infra/aws/config)
    # --init + TINI_KILL_PROCESS_GROUP: SIGTERM reaches the trainer even behind `sh -c`.
    spawn "$DOCKER" run --rm --name "$CONTAINER" --gpus all --init -e TINI_KILL_PROCESS_GROUP=1 \
      --security-opt no-new-privileges --shm-size "$(shm_size)" \
      -v "$DATA_DIR:/data:ro" -v "$OUT_DIR:/outputs" -v "$CKPT_DIR:/checkpoints" -v "$PROGRESS_DIR:/run/training-infra/progress" \
      -e "RUN_ID=$RUN_ID" -e DATA_DIR=/data -e OUTPUT_DIR=/outputs -e CHECKPOINT_DIR=/checkpoints \
      -e "HEARTBEAT_FILE=$TI_HEARTBEAT_FILE" -e "STOP_GRACE_SECONDS=$TI_STOP_GRACE_SECONDS" "${aws[@]}" \
      --env-file "$STATE/trainer.env" --env-file "$STATE/secrets.env" "$IMAGE" "${command[@]}" >>"$TRAIN_LOG" 2>&1
    forget_secrets
  else
    spawn run_process_trainer >>"$TRAIN_LOG" 2>&1
  fi
  TRAINER_PID=$LAST_PID
}
# `docker run` reads its --env-file before it creates the container: once that exists, the file goes.
# globals: reads TI_SECRETS DOCKER CONTAINER LAST_PID STATE
forget_secrets() {
  local i=0
  [[ -n $TI_SECRETS ]] || return 0
  while ((i++ < 600)) && alive "$LAST_PID" && ! "$DOCKER" container inspect "$CONTAINER" &>/dev/null; do sleep 0.1; done
  rm -f "$STATE/secrets.env"
}
# globals: reads TRAINER_PID RUNTIME DOCKER CONTAINER
stop_trainer() {  # stop_trainer GRACE: SIGTERM, wait up to GRACE seconds, then SIGKILL
  local grace=$1 i
  [[ -n $TRAINER_PID ]] && alive "$TRAINER_PID" || return 0
  log "SIGTERM to the trainer; ${grace}s grace before SIGKILL"
  if [[ $RUNTIME == docker ]]; then
    "$DOCKER" stop -t "$grace" "$CONTAINER" >/dev/null 2>&1 || true
  else
    kill_group "$TRAINER_PID" TERM
    for ((i = 0; i < grace * 5; i++)); do alive "$TRAINER_PID" || return 0; sleep 0.2; done
    alive "$TRAINER_PID" || return 0
    note "trainer ignored SIGTERM for ${grace}s: SIGKILL"
    kill_group "$TRAINER_PID" KILL
  fi
}
# globals: reads STATE
request_stop() {  # request_stop OUTCOME MESSAGE GRACE: the first watcher to ask wins
  mkdir "$STATE/stop" 2>/dev/null || return 0
  printf '%s\n%s\n' "$1" "$2" >"$STATE/stop/reason"
  note "$2: stopping the trainer (outcome $1)"
  stop_trainer "$3"
}

# ---------------------------------------------------------------- watchers (background jobs)
# globals: reads TI_STOP_GRACE_SECONDS SPOT_GRACE_CAP TI_STOP_ON_REBALANCE TI_SPOT_POLL_SECONDS
watch_spot() {
  local body grace=$((TI_STOP_GRACE_SECONDS < SPOT_GRACE_CAP ? TI_STOP_GRACE_SECONDS : SPOT_GRACE_CAP)) rebalanced=""
  while true; do
    if body=$(imds_get meta-data/spot/instance-action); then
      request_stop interrupted "spot interruption notice $body" "$grace"
      return
    fi
    if [[ -z $rebalanced ]] && body=$(imds_get meta-data/events/recommendations/rebalance); then
      rebalanced=1
      if [[ $TI_STOP_ON_REBALANCE == true ]]; then
        request_stop interrupted "rebalance recommendation $body" "$grace"
        return
      fi
      note "rebalance recommendation $body: syncing checkpoints now, training continues"
      # In the background: a spot notice two minutes later must still be seen within one poll.
      { if sync_checkpoints; then note "checkpoints synced after the rebalance recommendation"; else
        log "WARNING: checkpoint sync after the rebalance recommendation failed"; fi; } &
    fi
    sleep "$TI_SPOT_POLL_SECONDS"
  done
}
# globals: reads START_EPOCH DEADLINE_EPOCH DEADLINE_WHY TI_STOP_GRACE_SECONDS
watch_deadline() {  # stop early enough to save outputs before the OS-level shutdown fires
  local margin=$((TI_STOP_GRACE_SECONDS + 60)) stop_at
  ((DEADLINE_EPOCH - START_EPOCH > 2 * margin)) || margin=0
  stop_at=$((DEADLINE_EPOCH - margin))
  sleep "$((stop_at > $(date +%s) ? stop_at - $(date +%s) : 0))"
  request_stop deadline "$DEADLINE_WHY reached" "$TI_STOP_GRACE_SECONDS"
}
# globals: reads TI_SPOT_POLL_SECONDS TI_STOP_GRACE_SECONDS
watch_stop() {  # a stop request from the supervisor: the same graceful stop as a spot notice
  until stop_requested; do sleep "$TI_SPOT_POLL_SECONDS"; done
  request_stop "$STOP_OUTCOME" "$STOP_MESSAGE" "$TI_STOP_GRACE_SECONDS"
}
# globals: reads NVIDIA_SMI
gpu_utilisation() {  # the busiest GPU, so one busy GPU of eight is not "idle"
  "$NVIDIA_SMI" --query-gpu=utilization.gpu --format=csv,noheader,nounits 2>/dev/null |
    awk 'BEGIN { m = -1 } /^ *[0-9.]+ *$/ { if ($1 + 0 > m) m = $1 + 0 } END { if (m < 0) exit 1; print m }'
}
# globals: reads INSTANCE_ID NVIDIA_SMI and the TI_IDLE/METRIC settings
watch_idle() {
  local poll=$((TI_IDLE_SECONDS / 4)) util now idle_since="" last_metric=0 warned=""
  ((poll <= 15)) || poll=15
  ((poll >= 1)) || poll=1
  while true; do
    now=$(date +%s)
    if ! util=$(gpu_utilisation); then
      [[ -n $warned ]] || log "WARNING: $NVIDIA_SMI gave no utilisation: GPU idle detection is off"
      warned=1 util=""
    elif ((now - last_metric >= 60)); then
      last_metric=$now
      awsc cloudwatch put-metric-data --namespace "$TI_METRIC_NAMESPACE" --metric-name GPUUtilization \
        --dimensions "InstanceId=$INSTANCE_ID" --value "$util" --unit Percent || log "WARNING: metric not sent"
    fi
    if [[ -n $util ]] && awk -v u="$util" -v t="$TI_IDLE_GPU_PERCENT" 'BEGIN { exit !(u < t) }'; then
      idle_since=${idle_since:-$now}
      if ((now - idle_since >= TI_IDLE_SECONDS)); then
        request_stop idle "GPU utilisation below ${TI_IDLE_GPU_PERCENT}% for ${TI_IDLE_SECONDS}s" "$TI_STOP_GRACE_SECONDS"
        return
      fi
    else
      idle_since=""
    fi
    sleep "$poll"
  done
}
# The trainer's beats (HEARTBEAT_FILE: JSON such as {"step": 1200}, or a touch). A JSON step counts
# as progress when it changes, a file without one when it is written again. Once a minute with
# progress (TI_PROGRESS_METRIC_SECONDS): metrics (Progress, which the supervisor's backstop watches,
# TrainingStep, StepsPerSecond; dimension RunId) and the attempt's progress.json. A trainer that never beats is never judged,
# and a file written before it started (restored with /checkpoints, left by an earlier attempt) is no beat.
# globals: reads HEARTBEAT_HOST TI_HEARTBEAT_FILE TI_STALL_SECONDS TI_STOP_GRACE_SECONDS TI_METRIC_NAMESPACE STATE RUN_ID
# ATTEMPT_PREFIX TRAINER_PID TRAINER_STARTED TI_PROGRESS_METRIC_SECONDS
watch_progress() {
  local poll=5 now changed step rate sent_at=0 sent_change="" metrics dims
  ((TI_STALL_SECONDS == 0 || TI_STALL_SECONDS >= 30)) || poll=1
  while sleep "$poll"; do
    now=$(date +%s)
    read -r changed step rate < <(python3 "$AGENT_TOOLS" progress "$HEARTBEAT_HOST" "$STATE/progress.state.json" "$now" \
      --since "$TRAINER_STARTED") ||
      continue
    [[ $changed != none ]] || continue
    if [[ $changed != "$sent_change" ]] && ((now - sent_at >= TI_PROGRESS_METRIC_SECONDS)); then
      sent_at=$now sent_change=$changed dims='"Dimensions": [{"Name": "RunId", "Value": "'$RUN_ID'"}]'
      metrics='{"MetricName": "Progress", "Value": 1, "Unit": "Count", '$dims'}'
      [[ $step == - ]] || metrics+=', {"MetricName": "TrainingStep", "Value": '$step', "Unit": "None", '$dims'}'
      [[ $rate == - ]] || metrics+=', {"MetricName": "StepsPerSecond", "Value": '$rate', "Unit": "Count/Second", '$dims'}'
      awsc cloudwatch put-metric-data --namespace "$TI_METRIC_NAMESPACE" --metric-data "[$metrics]" ||
        log "WARNING: progress metrics not sent"
      awsc s3 cp "$STATE/progress.json" "$ATTEMPT_PREFIX/progress.json" --only-show-errors || true
    fi
    if ((TI_STALL_SECONDS > 0 && now - changed >= TI_STALL_SECONDS)) && alive "$TRAINER_PID"; then
      collect_diagnostics
      request_stop stalled "no progress in $TI_HEARTBEAT_FILE for $((now - changed))s (last step $step)" "$TI_STOP_GRACE_SECONDS"
      return
    fi
  done
}
# The host PIDs of the trainer's container, for py-spy on the host: every process in the PID namespace
# of the container's init (`inspect .State.Pid`, a host PID in Docker and podman alike). Not
# `docker top -eo pid` (Docker's ps runs on the host): podman runs that ps inside the container, which
# fails in an image without ps (python:3.12-slim has none) and else prints the container's own PIDs
# (1, 2, ...), other processes on the host.
# globals: reads DOCKER CONTAINER
container_pids() {
  local init namespace
  init=$(timeout 20 "$DOCKER" inspect --format '{{.State.Pid}}' "$CONTAINER") && [[ $init =~ ^[1-9][0-9]*$ ]] &&
    namespace=$(ps -o pidns= -p "$init") && [[ $namespace =~ [0-9] ]] || return 1
  ps -e -o pidns=,pid= | awk -v namespace="$namespace" '$1 == namespace + 0 { print $2 }'
}
# What a stalled trainer was doing, into the attempt's logs (logs/training-diagnostics.txt) before it is stopped.
# globals: reads LOG_DIR RUNTIME TRAINER_PID NVIDIA_SMI TRAIN_LOG
collect_diagnostics() {  # bounded: a hung GPU can hang nvidia-smi too, and the stop must still come
  local pids pid until=$(($(date +%s) + 120))
  {
    echo "== $(date -u +%FT%TZ) process tree"
    ps -eo pid,ppid,pgid,stat,etime,pcpu,rss,args --forest
    echo "== $NVIDIA_SMI"
    timeout 20 "$NVIDIA_SMI" || echo "($NVIDIA_SMI not available or hung)"
    if [[ $RUNTIME == docker ]]; then
      pids=$(container_pids) || echo "== the container's processes were not found: no Python stacks"
    else
      pids=$(pgrep -g "$TRAINER_PID")
    fi
    if command -v py-spy >/dev/null; then
      for pid in $pids; do
        (($(date +%s) < until)) || { echo "== py-spy: 2 min spent, the other processes left out"; break; }
        echo "== py-spy dump --pid $pid"; timeout 20 py-spy dump --pid "$pid"
      done
    else
      echo "== py-spy is not installed: no Python stacks"
    fi
    echo "== the trainer's last 200 log lines"
    tail -n 200 "$TRAIN_LOG"
  } >"$LOG_DIR/training-diagnostics.txt" 2>&1
  note "stall diagnostics (process tree, $NVIDIA_SMI, $(command -v py-spy >/dev/null && echo "py-spy stacks" ||
    echo "no py-spy on this box"), last 200 lines) in logs/training-diagnostics.txt"
}
# globals: reads TI_CHECKPOINT_SYNC_SECONDS
watch_checkpoints() {  # only changed files travel; logs ride along so a hard kill loses little
  while sleep "$TI_CHECKPOINT_SYNC_SECONDS"; do
    sync_checkpoints || log "WARNING: periodic checkpoint sync failed; next try in ${TI_CHECKPOINT_SYNC_SECONDS}s"
    check_checkpoint_freshness
    upload_logs || true
  done
}
# globals: reads TI_TRAINER_ROLE_ARN TI_CREDENTIALS_REFRESH_SECONDS
# Sessions last 1 h: renewed every 30 min by default (half-life, clear of the SDKs' 15-minute refresh window).
watch_credentials() {  # at half-life; after a failed renewal, every minute until one succeeds
  local wait=$TI_CREDENTIALS_REFRESH_SECONDS
  while [[ -n $TI_TRAINER_ROLE_ARN ]] && sleep "$wait"; do
    if retry "trainer role" assume_trainer_role; then
      wait=$TI_CREDENTIALS_REFRESH_SECONDS
    else
      log "WARNING: trainer role session not renewed; trying again in 60 s"
      wait=60
    fi
  done
}
# globals: reads TI_LOG_SHIP_SECONDS
watch_logs() { while sleep "$TI_LOG_SHIP_SECONDS"; do ship_logs || log "WARNING: CloudWatch Logs upload failed"; done; }
run_watcher() { trap - ERR EXIT TERM INT; set +e; "$1"; }  # never the main traps (finalize)
# globals: sets WATCHERS
start_watchers() {
  local watcher
  for watcher in watch_spot watch_stop watch_deadline watch_idle watch_progress watch_checkpoints watch_logs watch_credentials; do
    spawn run_watcher "$watcher"
    WATCHERS+=("$LAST_PID")
  done
}

# ---------------------------------------------------------------- the end of every run
# globals: reads STATE RUN_ID OUTCOME EXIT_CODE STARTED_AT ENDED_AT START_EPOCH ENDED_EPOCH IMAGE MESSAGE
# and the instance's (INSTANCE_ID INSTANCE_TYPE MARKET AZ)
write_status() {  # prints the cost estimate
  python3 "$AGENT_TOOLS" status "$STATE/status.json" --run-id="$RUN_ID" --attempt="$ATTEMPT" --outcome="$OUTCOME" \
    --exit-code="$EXIT_CODE" --started-at="$STARTED_AT" --ended-at="$ENDED_AT" \
    --duration-seconds="$((ENDED_EPOCH - START_EPOCH))" --instance-id="$INSTANCE_ID" \
    --instance-type="$INSTANCE_TYPE" --market="$MARKET" --availability-zone="$AZ" \
    --hourly-price-usd="$TI_HOURLY_PRICE_USD" --image="$IMAGE" --message="$MESSAGE" --progress-file="$STATE/progress.state.json"
}
# globals: reads TI_ALERTS_TOPIC_ARN RUN_ID RUN_PREFIX OUTCOME EXIT_CODE MESSAGE COST START_EPOCH ENDED_EPOCH and the instance's
publish_notice() {
  [[ -n $TI_ALERTS_TOPIC_ARN ]] || return 0
  awsc sns publish --topic-arn "$TI_ALERTS_TOPIC_ARN" --subject "training-infra run $RUN_ID: $OUTCOME" \
    --message "Training run $RUN_ID on $INSTANCE_TYPE ($MARKET, $AZ, $INSTANCE_ID) ended: $OUTCOME, exit code ${EXIT_CODE:-none}, after $(((ENDED_EPOCH - START_EPOCH) / 60)) min, estimated cost \$${COST:-?}. ${MESSAGE} Results: $RUN_PREFIX/" >/dev/null
}
# globals: reads TI_OUTPUTS_BUCKET RUN_PREFIX
refresh_latest() {  # runs/latest/ mirrors this run; its _SUCCESS again goes last
  local latest=s3://$TI_OUTPUTS_BUCKET/runs/latest
  awsc s3 rm "$latest/_SUCCESS" --only-show-errors || true
  awsc s3 sync "$RUN_PREFIX/" "$latest/" --delete --exclude _SUCCESS --only-show-errors &&
    awsc s3 cp "$RUN_PREFIX/_SUCCESS" "$latest/_SUCCESS" --only-show-errors
}
# globals: reads TI_AUTO_SHUTDOWN POWEROFF_CMD
power_off() {
  if [[ $TI_AUTO_SHUTDOWN == true ]]; then
    log "powering off: $POWEROFF_CMD"
    bash -c "$POWEROFF_CMD" || log "WARNING: power-off command failed"
  else
    log "auto_shutdown is false: leaving the instance running (the OS deadline still applies)"
  fi
}
# globals: reads TI_FINALIZE_TIMEOUT_SECONDS POWEROFF_CMD
backstop() { sleep "$TI_FINALIZE_TIMEOUT_SECONDS"; log "finalize is stuck: powering off anyway"; bash -c "$POWEROFF_CMD"; }
# globals: reads WATCHERS TRAINER_PID TRAINER_STARTED RUN_ID STATE; sets FINALIZING OUTCOME MESSAGE ENDED_EPOCH ENDED_AT COST
finalize() {
  local rc=$1 pid backstop=""
  set +e
  trap - ERR
  trap 'log "signal during finalize: carrying on (the backstop still powers off)"' TERM INT
  [[ -z $FINALIZING ]] || return 0
  FINALIZING=1
  if [[ $TI_AUTO_SHUTDOWN == true ]]; then
    spawn backstop
    backstop=$LAST_PID
  fi
  for pid in "${WATCHERS[@]}"; do kill_group "$pid"; done
  rm -f "$STATE/secrets.env"
  if [[ -n $TRAINER_PID ]] && alive "$TRAINER_PID"; then
    [[ -n $OUTCOME ]] || OUTCOME=failed MESSAGE="agent stopped before the trainer finished (exit $rc)"
    stop_trainer "$TI_STOP_GRACE_SECONDS"
  fi
  [[ -n $OUTCOME ]] || OUTCOME=failed MESSAGE=${MESSAGE:-"agent exited with $rc before the trainer finished"}
  ENDED_EPOCH=$(date +%s)
  ENDED_AT=$(date -u -d "@$ENDED_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
  [[ -n $RUN_ID ]] || set_run_id
  note "run $RUN_ID finished: outcome=$OUTCOME exit_code=${EXIT_CODE:-none} ${MESSAGE}"
  if ((TRAINER_STARTED > 0)); then
    retry "final checkpoint sync" sync_checkpoints || MESSAGE+=" (final checkpoint sync failed)"
  fi
  # Interrupted: the box may vanish any second, so logs go up before the (larger) outputs.
  [[ $OUTCOME != interrupted ]] || upload_logs || true
  ship_logs --final || log "WARNING: final CloudWatch Logs upload failed"
  if ((TRAINER_STARTED > 0)); then
    if ! retry "outputs upload" awsc s3 sync "$OUT_DIR/" "$RUN_PREFIX/outputs/" --no-follow-symlinks --only-show-errors; then
      [[ $OUTCOME != succeeded ]] || OUTCOME=failed
      MESSAGE+=" (outputs upload failed)"
    fi
  fi
  # The trainer's last beats since the progress watcher's last look (none when it never started).
  ((TRAINER_STARTED > 0)) &&
    python3 "$AGENT_TOOLS" progress "$HEARTBEAT_HOST" "$STATE/progress.state.json" "$(date +%s)" --since "$TRAINER_STARTED" >/dev/null &&
    [[ -s $STATE/progress.state.json ]] &&
    { awsc s3 cp "$STATE/progress.json" "$ATTEMPT_PREFIX/progress.json" --only-show-errors || log "WARNING: progress.json not uploaded"; }
  COST=$(write_status) || log "WARNING: status.json not written"
  log "status: $(tr -d '\n' <"$STATE/status.json")"
  # The attempt's own record first (the supervisor reads it), then the run's summary (the CLI's).
  if ! retry "status upload" awsc s3 cp "$STATE/status.json" "$ATTEMPT_PREFIX/status.json" --only-show-errors ||
    ! retry "run summary upload" awsc s3 cp "$STATE/status.json" "$RUN_PREFIX/status.json" --only-show-errors; then
    log "WARNING: status.json not uploaded"
  elif [[ $OUTCOME == succeeded ]]; then
    upload_logs || log "WARNING: log upload failed"
    : >"$STATE/_SUCCESS"
    if awsc s3 cp "$STATE/_SUCCESS" "$RUN_PREFIX/_SUCCESS" --only-show-errors; then
      log "wrote $RUN_PREFIX/_SUCCESS"
      refresh_latest || log "WARNING: runs/latest/ not refreshed"
    else
      log "WARNING: _SUCCESS not written"
    fi
  fi
  [[ $OUTCOME == succeeded ]] || upload_logs || log "WARNING: log upload failed"
  publish_notice || log "WARNING: notice not published" &
  awsc cloudwatch put-metric-data --namespace "$TI_METRIC_NAMESPACE" --metric-name RunsFinished \
    --dimensions "Outcome=$OUTCOME" --value 1 --unit Count || true
  wait "$!"
  power_off
  [[ -z $backstop ]] || kill_group "$backstop" KILL
}
# globals: sets MESSAGE
on_error() { log "command failed (exit $1) at line $2: $3"; MESSAGE=${MESSAGE:-"agent error at line $2: $3 (exit $1)"}; }
# globals: sets OUTCOME MESSAGE
on_signal() {
  log "agent received SIG$1"
  OUTCOME=${OUTCOME:-interrupted} MESSAGE=${MESSAGE:-"agent received SIG$1 (instance shutting down?)"}
  exit 143
}

# ---------------------------------------------------------------- main
# globals: reads DEADLINE_EPOCH DEADLINE_WHY; sets OUTCOME MESSAGE
end_if_over() {  # no training once the deadline has passed or the supervisor asked to stop
  if ((DEADLINE_EPOCH <= $(date +%s))); then
    OUTCOME=deadline MESSAGE="$DEADLINE_WHY passed before the trainer started"
  elif stop_requested; then
    OUTCOME=$STOP_OUTCOME MESSAGE="$STOP_MESSAGE before the trainer started"
  else
    return 0
  fi
  note "$MESSAGE"
  exit 0
}
# globals: sets EXIT_CODE OUTCOME MESSAGE (and, through what it calls, every run global)
main() {
  local i
  rm -rf "$STATE"
  mkdir -p "$STATE" "$LOG_DIR" "$DATA_DIR" "$OUT_DIR" "$CKPT_DIR"
  mkdir -m 1777 "$PROGRESS_DIR"  # a trainer image with a non-root USER beats too
  rm -f "$LOG_DIR/training-diagnostics.txt"
  touch "$TRAIN_LOG"
  # 1. everything this script says goes to the setup log (and the console, for cloud-init)
  # tee ignores TERM/INT: at shutdown every process gets SIGTERM, and the finalizer must still
  # be able to write (a dead tee would end the agent with SIGPIPE mid-upload).
  exec > >(trap '' TERM INT; exec tee -a "$SETUP_LOG") 2>&1
  # 2. whatever happens next, logs are uploaded and the box powers off
  trap 'finalize $?' EXIT
  trap 'on_error $? $LINENO "$BASH_COMMAND"' ERR
  trap 'on_signal TERM' TERM
  trap 'on_signal INT' INT
  log "training-infra agent starting (runtime $RUNTIME, root '${ROOT:-/}')"
  validate
  # 3. the OS-level deadline, before any network call can hang (a deadline tag moves it later)
  arm_os_deadline
  read_metadata
  set_run_id
  log "run $RUN_ID attempt $ATTEMPT on $INSTANCE_ID ($INSTANCE_TYPE, $MARKET, $AZ, $REGION)"
  # The first line of this attempt in the run's one log stream: `logs RUN` shows where it starts.
  note "attempt $ATTEMPT started on $INSTANCE_TYPE in $AZ ($MARKET)"
  open_log_stream
  end_if_over
  # 4. image and data, each with bounded retries; a permanent failure ends the run as failed
  retry "image $IMAGE" fetch_image || fail "could not get image $IMAGE from ECR after $RETRIES attempts"
  retry "data sync" awsc s3 sync "s3://$TI_DATA_BUCKET/data/" "$DATA_DIR/" --only-show-errors ||
    fail "could not sync s3://$TI_DATA_BUCKET/data/ to $DATA_DIR after $RETRIES attempts"
  log "data: $(find "$DATA_DIR" -type f | wc -l) files in $DATA_DIR"
  # 5. restore this run's checkpoints (a relaunch with the same run id resumes), start the trainer
  retry "checkpoint restore" restore_checkpoints ||
    fail "could not restore checkpoints from $CKPT_PREFIX/"
  log "checkpoints: $(find "$CKPT_DIR" -type f | wc -l) files restored from $CKPT_PREFIX/"
  end_if_over
  retry secrets fetch_secrets || fail "could not read TI_SECRETS (see the setup log)"
  if [[ -n $TI_TRAINER_ROLE_ARN ]]; then
    retry "trainer role" assume_trainer_role || fail "could not assume $TI_TRAINER_ROLE_ARN"
    trainer_aws_config "$([[ $RUNTIME == docker ]] && echo /run/training-infra/aws || echo "$STATE/aws")"
  fi
  start_trainer
  # 6. watchers
  start_watchers
  EXIT_CODE=0
  wait "$TRAINER_PID" || EXIT_CODE=$?
  # The trainer's children may still be writing their last checkpoint: they get the grace period,
  # then the finalizer stops what is left of the group (a stray child must not hold the box up).
  for ((i = 0; i < TI_STOP_GRACE_SECONDS * 5; i++)); do alive "$TRAINER_PID" || break; sleep 0.2; done
  if [[ -f $STATE/stop/reason ]]; then
    { read -r OUTCOME; read -r MESSAGE; } <"$STATE/stop/reason"
    # `docker stop` kills silently after the grace period: say so, as the process runtime does.
    [[ $RUNTIME != docker || $EXIT_CODE != 137 ]] || note "trainer ignored SIGTERM for the grace period: killed"
  elif ((EXIT_CODE == 0)); then
    OUTCOME=succeeded MESSAGE="trainer finished"
  else
    OUTCOME=failed MESSAGE="trainer exited with code $EXIT_CODE"
  fi
  # 7. finalize (the EXIT trap): checkpoints, logs, outputs, status.json, _SUCCESS, notice, power-off
}

main "$@"
