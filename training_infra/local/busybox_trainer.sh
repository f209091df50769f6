#!/bin/sh
# The trainer of the local container image (training_infra/local/containers.py): busybox sh only,
# since the image is built here with no base from the internet. It honours the same container
# contract as examples/trainer/train.py, with the same knobs and log lines, so the agent's tests
# and the demo can watch the real container path: reads DATA_DIR (and checks it is read-only),
# checkpoints to CHECKPOINT_DIR atomically and resumes from the newest, writes OUTPUT_DIR, touches
# HEARTBEAT_FILE, and on SIGTERM saves a checkpoint and its outputs (taking FLUSH_SECONDS, to show
# the grace period holds) and exits 143. FAIL_AT_EPOCH exits 3; HANG_AT_EPOCH ignores SIGTERM.
set -u
DATA_DIR=${DATA_DIR:-/data} OUTPUT_DIR=${OUTPUT_DIR:-/outputs} CHECKPOINT_DIR=${CHECKPOINT_DIR:-/checkpoints}
EPOCHS=${EPOCHS:-30} STEP_SECONDS=${STEP_SECONDS:-1.0} CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-3}
KEEP_CHECKPOINTS=${KEEP_CHECKPOINTS:-3} FAIL_AT_EPOCH=${FAIL_AT_EPOCH:-0} HANG_AT_EPOCH=${HANG_AT_EPOCH:-0}
FLUSH_SECONDS=${FLUSH_SECONDS:-0} HEARTBEAT_FILE=${HEARTBEAT_FILE:-} RUN_ID=${RUN_ID:-?}
STOP=""

now() {  # wall-clock seconds with a fraction: busybox date has no %N, busybox adjtimex has
  case $(date +%s.%N) in
    *N) adjtimex | awk '/tv_sec/ { s = $2 } /tv_usec/ { u = $2 } END { printf "%d.%06d", s, u }' ;;
    *) date +%s.%N ;;
  esac
}
log() { echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) [trainer] $*"; }
checkpoints() {  # names of the checkpoints in CHECKPOINT_DIR, oldest first
  for file in "$CHECKPOINT_DIR"/ckpt-[0-9][0-9][0-9][0-9][0-9][0-9].txt; do [ ! -e "$file" ] || echo "${file##*/}"; done
}
save_checkpoint() {  # save_checkpoint EPOCH [NOTE]: write .tmp, then rename; keep the newest few
  name=$(printf 'ckpt-%06d.txt' "$1")
  echo "epoch=$1" >"$CHECKPOINT_DIR/$name.tmp" && mv "$CHECKPOINT_DIR/$name.tmp" "$CHECKPOINT_DIR/$name"
  checkpoints | sort -r | tail -n "+$((KEEP_CHECKPOINTS + 1))" | while read -r old; do rm -f "$CHECKPOINT_DIR/$old"; done
  log "checkpoint $name${2:+ $2}"
}
on_term() {
  log "received SIGTERM at $(now); saving a checkpoint and stopping"
  STOP=1
}

log "started at $(now) as pid $$ ($(id -u):$(id -g)), run $RUN_ID"
trap on_term TERM
mkdir -p "$OUTPUT_DIR" "$CHECKPOINT_DIR"
if touch "$DATA_DIR/.write-probe" 2>/dev/null; then
  rm -f "$DATA_DIR/.write-probe"
  DATA_READ_ONLY=false
else
  DATA_READ_ONLY=true
fi
ROWS=$(find "$DATA_DIR" -name '*.csv' -type f -exec cat {} + | grep -c .)
log "data: $ROWS lines under $DATA_DIR (read-only: $DATA_READ_ONLY)"
START=0 RESUMED=null
NEWEST=$(checkpoints | tail -n 1)
if [ -n "$NEWEST" ]; then
  START=$(sed -n 's/^epoch=//p' "$CHECKPOINT_DIR/$NEWEST")
  RESUMED=$START
  log "resumed from checkpoint $NEWEST (epoch $START)"
fi

EPOCH=$START
while [ "$EPOCH" -lt "$EPOCHS" ] && [ -z "$STOP" ]; do
  EPOCH=$((EPOCH + 1))
  if [ "$EPOCH" -eq "$HANG_AT_EPOCH" ]; then
    log "epoch $EPOCH: simulating a hang (no progress, SIGTERM ignored)"
    trap '' TERM
    while :; do sleep 1; done
  fi
  log "epoch $EPOCH/$EPOCHS"
  [ -z "$HEARTBEAT_FILE" ] || touch "$HEARTBEAT_FILE"
  if [ "$EPOCH" -eq "$FAIL_AT_EPOCH" ]; then
    log "epoch $EPOCH: simulated crash (FAIL_AT_EPOCH)"
    exit 3
  fi
  if [ $((EPOCH % CHECKPOINT_EVERY)) -eq 0 ] || [ "$EPOCH" -eq "$EPOCHS" ]; then save_checkpoint "$EPOCH"; fi
  sleep "$STEP_SECONDS" &
  wait $! || true  # a trapped SIGTERM ends the wait at once
done

INTERRUPTED=false
if [ -n "$STOP" ] && [ "$EPOCH" -lt "$EPOCHS" ]; then
  INTERRUPTED=true
  sleep "$FLUSH_SECONDS"  # a real trainer takes a while to write its state
  save_checkpoint "$EPOCH" "(on SIGTERM)"
fi
printf '{"run_id": "%s", "epochs_completed": %s, "epochs_planned": %s, "resumed_from_epoch": %s, ' \
  "$RUN_ID" "$EPOCH" "$EPOCHS" "$RESUMED" >"$OUTPUT_DIR/metrics.json"
printf '"interrupted": %s, "data_rows": %s, "data_read_only": %s}\n' \
  "$INTERRUPTED" "$ROWS" "$DATA_READ_ONLY" >>"$OUTPUT_DIR/metrics.json"
log "outputs written to $OUTPUT_DIR ($([ "$INTERRUPTED" = true ] && echo interrupted || echo finished))"
[ "$INTERRUPTED" = false ] || exit 143
