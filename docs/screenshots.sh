#!/usr/bin/env bash
# Regenerate the observability screenshots in docs/ from a real run on the simulator:
#
#   docs/report.png   `ihld report` of a seed-like batch (affinity policy)
#   docs/report.html  the page itself (self-contained: open it in a browser)
#   docs/status.png   `ihld status --watch` mid-run (the same rich view, exported to SVG)
#   docs/report-fifo.png  the same batch under the `fifo` baseline, for contrast
#
# Needs the venv (`make test` or `make demo` creates it) and Debian's chromium
# (`apt-get install -y chromium`). Everything listens on 127.0.0.1 only.
#
#   docs/screenshots.sh [JOBS] [SPEED]      # defaults: 80 jobs, --speed 10
#   KEEP=1 docs/screenshots.sh              # keep the spools and logs (path printed)
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${1:-80}
SPEED=${2:-10}
PY=.venv/bin/python
IHLD=.venv/bin/ihld
CHROMIUM=$(command -v chromium || command -v chromium-browser || true)
[ -n "$CHROMIUM" ] || { echo "chromium not found (apt-get install -y chromium)" >&2; exit 1; }
WORK=$(mktemp -d /tmp/ihld-shots.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

shoot() {  # shoot URL PNG WIDTH HEIGHT
    "$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-background-networking \
        --disable-component-update --disable-sync --no-first-run --hide-scrollbars \
        --user-data-dir="$(mktemp -d "$WORK/chrome.XXXXXX")" \
        --screenshot="$2" --window-size="$3,$4" "$1" >/dev/null 2>&1
    echo "wrote $2"
}

# run POLICY NAME: a simulator, a daemon on a fresh spool, JOBS debate jobs; leaves the log
run() {
    local policy=$1 name=$2 port spool sim daemon
    port=$(free_port)
    spool="$WORK/$name/spool"
    mkdir -p "$WORK/$name"
    $IHLD sim --port "$port" --profile laptop-6gb-4slot --speed "$SPEED" >"$WORK/$name/sim.out" 2>&1 &
    sim=$!; PIDS+=("$sim")
    cat >"$WORK/$name/ihld.toml" <<TOML
[spool]
dir = "$spool"
settle_s = 0.1
rescan_s = 0.5
[[backends]]
name = "laptop"
url = "http://127.0.0.1:$port"
slots = 4
max_loaded = 1
[scheduler]
policy = "$policy"
fifo_workers = 4
[log]
stderr = false
TOML
    for _ in $(seq 100); do grep -q listening "$WORK/$name/sim.out" && break; sleep 0.1; done
    $IHLD run --config "$WORK/$name/ihld.toml" &
    daemon=$!; PIDS+=("$daemon")
    for _ in $(seq 100); do [ -S "$spool/run/ihld.sock" ] && break; sleep 0.1; done
    $PY - "$JOBS" >"$WORK/$name/batch.jsonl" <<'PYEOF'
import json, sys
topics = ["tabs versus spaces", "cities should ban cars", "remote work", "nuclear power",
          "four-day week", "homework", "space exploration", "universal basic income"]
for n in range(int(sys.argv[1])):
    print(json.dumps({"id": f"debate-{n:03d}", "pipeline": "debate",
                      "input": {"topic": f"{topics[n % len(topics)]} ({n})"}}))
PYEOF
    $IHLD submit --config "$WORK/$name/ihld.toml" --wait --timeout 600 "$WORK/$name/batch.jsonl" \
        2>"$WORK/$name/submit.err" &
    local submit=$!
    if [ "$policy" = affinity ]; then
        # mid-run: the status view, exported by rich to SVG exactly as `--watch` draws it
        $PY - "$spool" "$JOBS" docs/status.svg <<'PYEOF'
import asyncio, sys, time
from pathlib import Path
from rich.console import Console
from ihld.status import status_view
from ihld.submit import control_request
sock, jobs, out = Path(sys.argv[1]) / "run" / "ihld.sock", int(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    snap = asyncio.run(control_request(sock, "GET", "/status"))
    # past the first model switch, with the ETA learned: the interesting moment
    if snap and snap["jobs"]["done"] + snap["jobs"]["failed"] >= jobs * 0.25 and snap["eta_s"]:
        break
    time.sleep(0.1)
time.sleep(1.2)  # let the background /api/ps poll catch up with a model switch
snap = asyncio.run(control_request(sock, "GET", "/status"))
console = Console(record=True, width=104, file=open("/dev/null", "w"))
console.print(status_view(snap))
console.save_svg(out, title="ihld status --watch")
print(f"wrote {out}")
PYEOF
    fi
    wait "$submit"
    kill -TERM "$daemon"; wait "$daemon" || true
    kill "$sim"; wait "$sim" 2>/dev/null || true
}

run affinity affinity
$IHLD report --log "$WORK/affinity/spool/log/ihld.jsonl" -o docs/report.html
run fifo fifo
$IHLD report --log "$WORK/fifo/spool/log/ihld.jsonl" -o "$WORK/report-fifo.html"

shoot "file://$PWD/docs/report.html" docs/report.png 1400 1120
shoot "file://$WORK/report-fifo.html" docs/report-fifo.png 1400 1120
# the status SVG at 1000 px wide, the window cut to its height
HEIGHT=$($PY -c 'import re,sys; w,h=map(float,re.search(r"viewBox=\"0 0 ([\d.]+) ([\d.]+)",open(sys.argv[1]).read()).groups()); print(round(1000*h/w))' docs/status.svg)
cat >"$WORK/status.html" <<HTML
<!DOCTYPE html><html><body style="margin:0;background:#fff">
<img src="file://$PWD/docs/status.svg" style="display:block;width:1000px"></body></html>
HTML
shoot "file://$WORK/status.html" docs/status.png 1000 "$HEIGHT"
