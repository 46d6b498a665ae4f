#!/usr/bin/env bash
# One-at-a-time job queue for this 2-core machine: training and evaluation runs must not overlap.
# Usage: scripts/train_queue.sh QUEUE_FILE LOG_DIR [TIMEOUT_S]
#   QUEUE_FILE: one job per line, "NAME<space>COMMAND..." (appended at any time; lines starting with # are skipped).
#   Each job runs in the repository root with `timeout`, output to LOG_DIR/train_NAME.log; a status line
#   "NAME rc=RC start end seconds" is appended to QUEUE_FILE.done. The queue polls for new lines until killed.
set -u
queue=${1:?queue file}; logs=${2:?log dir}; limit=${3:-2400}
cd "$(dirname "$0")/.."
mkdir -p "$logs"; touch "$queue" "$queue.done"
n=0
while true; do
  total=$(wc -l < "$queue")
  if [ "$n" -ge "$total" ]; then sleep 10; continue; fi
  n=$((n + 1))
  line=$(sed -n "${n}p" "$queue")
  case "$line" in ''|'#'*) continue;; esac
  name=${line%% *}; cmd=${line#* }
  start=$(date +%s); echo "$(date +%H:%M:%S) start $name" >> "$queue.done"
  timeout "$limit" bash -c "$cmd" > "$logs/train_$name.log" 2>&1
  rc=$?; end=$(date +%s)
  echo "$(date +%H:%M:%S) $name rc=$rc seconds=$((end - start))" >> "$queue.done"
done
