#!/usr/bin/env bash
# Runs campaign cells one at a time from a queue file, each alone on 2 threads, so that the
# order can change while cells run: each line is a `cell` call of env.sh (SEED METHODS RATIOS
# [DIR OPTIONS...]); the first line is taken off before its cell starts, and a failed cell is
# put back at the end of QUEUE.failed. Usage: queue.sh QUEUE_FILE [PID_TO_WAIT_FOR]
export GKPD_CAMPAIGN_THREADS=${GKPD_CAMPAIGN_THREADS:-2} OMP_WAIT_POLICY=PASSIVE
queue=$(realpath "$1")
. "$(dirname "$0")/env.sh"
set +e
if [[ -n ${2:-} ]]; then while kill -0 "$2" 2>/dev/null; do sleep 10; done; fi
while line=$(head -n 1 "$queue") && [[ -n $line ]]; do
  tail -n +2 "$queue" > "$queue.tmp" && mv "$queue.tmp" "$queue"
  echo "$(date -u +%FT%TZ) start: $line"
  # shellcheck disable=SC2086
  if cell $line; then echo "$(date -u +%FT%TZ) done: $line"; else echo "$line" >> "$queue.failed"; fi
done
