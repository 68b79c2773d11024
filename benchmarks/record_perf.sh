#!/usr/bin/env bash
# The runs behind docs/perf.md, one after another (use a quiet machine). Results go to $OUT.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/perf}
mkdir -p "$OUT"
B=.venv/bin
log() { echo "=== $* ($(date +%T), load $(cut -d' ' -f1 /proc/loadavg))"; }
cleanup() { pkill -f "fleetserve serve --port 870" ; pkill -f "hf_server.py --port 8701"; pkill -f "fleetserve up --port 8790"; }
trap cleanup EXIT

log "1. in-process engine vs HF (fp32)"
$B/python benchmarks/engine_vs_hf.py --rounds 3 2>&1 | grep -v -E "Convert|Loading|KV cache|Warning|warn|\"msg\""

log "2. fleetserve serve vs minimal HF server, bench --compare"
$B/fleetserve serve --port 8700 > $OUT/fs.log 2>&1 &
$B/python benchmarks/hf_server.py --port 8701 > $OUT/hf.log 2>&1 &
until curl -sf localhost:8700/readyz >/dev/null && curl -sf localhost:8701/health >/dev/null; do sleep 1; done
$B/fleetserve bench --url http://127.0.0.1:8700 --compare http://127.0.0.1:8701 --input-len 128 --output-len 64 \
  --ignore-eos --concurrency 1,16 --num-prompts 16 --rounds 2 --warmup 2 --seed 0 --no-progress \
  --output $OUT/fs_vs_hf.json 2>&1
pkill -f "hf_server.py --port 8701"

log "3. shared prefix: prefix caching on (A, port 8700) vs off (B, port 8702)"
$B/fleetserve serve --port 8702 --no-prefix-caching > $OUT/fs_nocache.log 2>&1 &
until curl -sf localhost:8702/readyz >/dev/null; do sleep 1; done
$B/fleetserve bench --url http://127.0.0.1:8700 --compare http://127.0.0.1:8702 --dataset shared-prefix \
  --num-groups 4 --prefix-len 512 --suffix-len 32 --output-len 16 --ignore-eos --concurrency 4 --num-prompts 32 \
  --rounds 2 --warmup 4 --seed 1 --no-progress --output $OUT/prefix.json 2>&1
pkill -f "fleetserve serve --port 8702"
pkill -f "fleetserve serve --port 8700"

log "4. gateway overhead: direct to a replica (A) vs through fleetserve up (B)"
export FLEETSERVE_HOME=$OUT/home; rm -rf $FLEETSERVE_HOME; mkdir -p $FLEETSERVE_HOME/models; cp -r ~/.fleetserve/models/default $FLEETSERVE_HOME/models/
$B/fleetserve up --port 8790 > $OUT/up.log 2>&1 &
until [ "$(curl -s localhost:8790/api/v1/deployments/default | python3 -c 'import sys,json; print(json.load(sys.stdin)["status"])' 2>/dev/null)" = running ]; do sleep 1; done
REPLICA=$(curl -s localhost:8790/api/v1/deployments/default | python3 -c 'import sys,json; print(json.load(sys.stdin)["replicas"][0]["url"])')
KEY=$($B/python -c "
from pathlib import Path; from fleetserve.control.secrets import SecretBox
h=Path('$FLEETSERVE_HOME'); print(SecretBox(h/'secret.key').internal_key(h/'internal.key'))")
FLEETSERVE_BENCH_API_KEY=$KEY $B/fleetserve bench --url $REPLICA --compare http://127.0.0.1:8790 --model default --model2 default \
  --input-len 128 --output-len 32 --ignore-eos --concurrency 1,8 --num-prompts 24 --rounds 2 --warmup 2 --seed 2 \
  --no-progress --output $OUT/gateway.json 2>&1
log "done"
