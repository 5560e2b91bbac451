#!/usr/bin/env bash
# Creates one venv per peer server, outside the repo, with pinned versions, for the race in
# bench/peers/race.py. Each peer gets the same onnxruntime as ours so only the server differs.
# Needs Python 3.11 (as the project) and PyPI; the race itself also needs wrk (apt-get install wrk).
# Usage: bash bench/peers/setup.sh [ROOT]   (ROOT defaults to /work/peer-venvs)
set -euo pipefail
ROOT="${1:-${PEER_VENVS:-/work/peer-venvs}}"
PY="${PYTHON:-python3.11}"
ORT="onnxruntime==1.32.0"
declare -A PINS=(
  [mlserver]="mlserver==1.7.1"
  [kserve]="kserve==0.21.0"
  [bentoml]="bentoml==1.4.40"
)
mkdir -p "$ROOT"
for name in mlserver kserve bentoml; do
  venv="$ROOT/$name"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import onnxruntime, $name" 2>/dev/null; then
    echo "$name: already installed in $venv"
    continue
  fi
  "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q "${PINS[$name]}" "$ORT"
  "$venv/bin/python" -c "from importlib.metadata import version as v; print('$name', v('$name'), 'onnxruntime', v('onnxruntime'))"
done
