#!/usr/bin/env bash
# Record tests/data/run.jsonl: the event log of a real short run on the simulator.
#
# 12 debate jobs on the laptop-6gb-4slot profile (--speed 20, 4 slots, one model
# resident at a time), plus one line that is not JSON (rejected) and one debate
# job without a topic (fails at its first stage). Midway the simulator is killed
# and restarted on the same port: a backend outage the daemon rides out.
# tests/test_report.py asserts on this log; re-record only on purpose and update
# the expected figures there.
set -euo pipefail
cd "$(dirname "$0")/../.."
IHLD=.venv/bin/ihld
WORK=$(mktemp -d /tmp/ihld-record.XXXXXX)
PORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
SIM_ARGS=(sim --port "$PORT" --profile laptop-6gb-4slot --speed 20)
cat >"$WORK/ihld.toml" <<TOML
[spool]
dir = "$WORK/spool"
settle_s = 0.1
rescan_s = 0.3
[[backends]]
name = "sim"
url = "http://127.0.0.1:$PORT"
slots = 4
max_loaded = 1
retries = 1
connect_timeout_s = 1
[limits]
retry_backoff_s = 0.05
[log]
stderr = false
TOML
$IHLD "${SIM_ARGS[@]}" >"$WORK/sim.out" 2>&1 & SIM=$!
sleep 1
$IHLD run --config "$WORK/ihld.toml" & DAEMON=$!
for _ in $(seq 100); do [ -S "$WORK/spool/run/ihld.sock" ] && break; sleep 0.1; done
{
    for n in $(seq -w 0 11); do
        echo "{\"id\": \"rec-$n\", \"pipeline\": \"debate\", \"input\": {\"topic\": \"topic $n\"}}"
    done
    echo '{"id": "rec-bad", "pipeline": "debate", "input": {"topic": "unterminated"'
    echo '{"id": "rec-notopic", "pipeline": "debate", "input": {}}'
} >"$WORK/batch.jsonl"
$IHLD submit --config "$WORK/ihld.toml" --wait --timeout 120 "$WORK/batch.jsonl" & SUBMIT=$!
sleep 1.2
kill "$SIM"; wait "$SIM" 2>/dev/null || true   # the outage
sleep 1.0
$IHLD "${SIM_ARGS[@]}" >"$WORK/sim2.out" 2>&1 & SIM=$!
wait "$SUBMIT" || true
kill -TERM "$DAEMON"; wait "$DAEMON" || true
kill "$SIM"; wait "$SIM" 2>/dev/null || true
cp "$WORK/spool/log/ihld.jsonl" tests/data/run.jsonl
rm -rf "$WORK"
wc -l tests/data/run.jsonl
