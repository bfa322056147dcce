#!/usr/bin/env bash
# Runs jobs one at a time from a queue file, each alone on 2 threads, so that the order can
# change while they run: each line is a command run in env.sh's shell, from the project root —
# a cell (`cell SEED METHODS RATIOS [DIR OPTIONS...]`) or another benchmark (`python
# benchmarks/transformer_minilm.py ...`); the first line is taken off before it starts, and a
# failed line is put at the end of QUEUE.failed. Usage: queue.sh QUEUE_FILE [PID_TO_WAIT_FOR]
# OpenMP's wait policy stays the default here: timing lines must run as users run, and
# PASSIVE made ResNet-32 at batch 1 three times slower (RESULTS.md, "OpenMP's wait policy");
# cells set PASSIVE themselves (env.sh), as every campaign cell ran.
export GKPD_CAMPAIGN_THREADS=${GKPD_CAMPAIGN_THREADS:-2}
queue=$(realpath "$1")
. "$(dirname "$0")/env.sh"
set +e
if [[ -n ${2:-} ]]; then while kill -0 "$2" 2>/dev/null; do sleep 10; done; fi
while line=$(head -n 1 "$queue") && [[ -n $line ]]; do
  tail -n +2 "$queue" > "$queue.tmp" && mv "$queue.tmp" "$queue"
  echo "$(date -u +%FT%TZ) start: $line"
  if (eval "$line"); then echo "$(date -u +%FT%TZ) done: $line"
  else echo "$(date -u +%FT%TZ) failed: $line"; echo "$line" >> "$queue.failed"; fi
done
