#!/usr/bin/env bash
# Missing rows of docs/results/calibration.md, several `calibration_report run` processes side by side on one GPU
# (each is launch-bound, so they share it well; on a machine of several GPUs, round-robin over them). One argument per process, "BITS|VARIANT,VARIANT", e.g.
#   bash tools/device/calibration_table.sh "W4A4|EDA-DM" "W4A4|DilateQuant (new defaults),DilateQuant + TDAC"
# Each process starts from docs/results/calibration_rows.json (rows there are skipped) and writes its rows after
# every row; after LIMIT seconds (default 500) unfinished ones are stopped. $OUT/rows.json: everything merged.
# Device tool, carry .whl.
set -uo pipefail
rm -rf /tmp/site /tmp/table && mkdir -p /tmp/table
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TQDM_DISABLE=1
report="python3 -m dilatequant.tools.calibration_report"
$report reference --n "${N:-5000}" --device cuda --out /tmp/table/fp.pt  # sampled once, read by every process
gpus=$(nvidia-smi -L 2> /dev/null | wc -l) && [ "$gpus" -gt 0 ] || gpus=1  # processes go round-robin over the machine's GPUs
k=0
for spec in "$@"; do
  k=$((k + 1))
  cp docs/results/calibration_rows.json "/tmp/table/rows_$k.json"
  CUDA_VISIBLE_DEVICES=$(((k - 1) % gpus)) $report run --bits "${spec%%|*}" --variants "${spec#*|}" --n "${N:-5000}" --device cuda --work "/tmp/table/work_$k" \
    --rows "/tmp/table/rows_$k.json" --reference /tmp/table/fp.pt > "/tmp/table/log_$k.txt" 2>&1 &
done
( sleep "${LIMIT:-500}" && pkill -f dilatequant.tools.calibration_report ) 2> /dev/null &
watchdog=$!
while [ "$(jobs -rp | grep -vc "^$watchdog$")" -gt 0 ]; do wait -n; done
kill "$watchdog" 2> /dev/null
tail -n 2 /tmp/table/log_*.txt
$report merge $(for i in $(seq 1 $k); do echo --rows "/tmp/table/rows_$i.json"; done) --out "$OUT/rows.json"
tar czf "$OUT/logs.tgz" -C /tmp/table $(cd /tmp/table && ls log_*.txt)
