#!/usr/bin/env bash
# Run a job file on the GPU machine, P jobs at a time, stopping at LIMIT seconds. Lines of the file:
#   before: COMMAND     run first, in order (e.g. the FP reference every job reads)
#   NAME: COMMAND       a job; a job that succeeded is marked done in $WORK and skipped when the file runs again
#   after: COMMAND      run last, in order (copy results to $OUT)
# Resumable across calls: the device tool keeps the git-ignored $WORK (default .device-work/) while the machine
# stays warm, so running the same file again skips finished jobs, and a stopped calibration resumes from its
# OUT.work/ block checkpoints. On a machine of several GPUs, jobs go round-robin over them.
#   LIMIT=540 P=7 bash tools/device/queue.sh tools/device/issue13_rows.jobs    (device tool, carry .whl)
# Two job files side by side (each with its own P):
#   LIMIT=540 P=1 bash tools/device/queue.sh A.jobs > a.log & LIMIT=540 P=7 bash tools/device/queue.sh B.jobs; wait; cat a.log
set -uo pipefail
start=$(date +%s)
deadline=$((start + ${LIMIT:-540}))
# Two torch CPU threads per job: a GPU job needs few. On 2026-11-29, 11 jobs at torch's default thread count on 16
# cores ran a group-size search generation in 244 s (44 s once fewer jobs ran) and ONNX Runtime's CPU sampling,
# which sizes its own thread pool, at 11.7 s per step (6.6 s with fewer jobs).
export WORK=${WORK:-$PWD/.device-work} PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TQDM_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$WORK/done" "$WORK/logs"
bash tools/device/install_wheels.sh || exit
gpus=$(nvidia-smi -L 2> /dev/null | wc -l) && [ "$gpus" -gt 0 ] || gpus=1

section() { sed -n "s/^$1: //p" "$2"; }
while IFS= read -r command; do bash -c "$command" || echo "before-step failed: $command"; done < <(section before "$1")

launched=0
while IFS= read -r line; do
  name=${line%%: *} command=${line#*: }
  [ -f "$WORK/done/$name" ] && echo "$name: done in an earlier call" && continue
  while [ "$(jobs -rp | wc -l)" -ge "${P:-7}" ]; do wait -n; done
  left=$((deadline - $(date +%s)))
  [ "$left" -lt 30 ] && echo "out of time before $name" && break
  (
    CUDA_VISIBLE_DEVICES=$((launched % gpus)) timeout "$left" bash -c "$command" >> "$WORK/logs/$name.log" 2>&1
    rc=$?
    [ "$rc" = 0 ] && touch "$WORK/done/$name"
    echo "$name: rc $rc at $(($(date +%s) - start)) s"
  ) &
  launched=$((launched + 1))
done < <(grep -vE '^(#|before: |after: |$)' "$1")
wait
while IFS= read -r command; do bash -c "$command" || echo "after-step failed: $command"; done < <(section after "$1")
