#!/usr/bin/env bash
# The whole test suite, in order: export-in-sync, notebooks clean, nbdev_test, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
NBDEV="$PY -m tools.nbdev_run"     # through the interpreter: a venv on system site-packages has no nbdev_* scripts
export PYTHONHASHSEED=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
snap() { find "$1" -type f \( -name '*.py' -o -name '*.ipynb' \) -not -path '*/.ipynb_checkpoints/*' -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 md5sum | md5sum; }

echo "== 1/4 nbdev_export: kdnb/ must already match nbs/"
before=$(snap kdnb); $NBDEV export; after=$(snap kdnb)
if [ "$before" != "$after" ]; then echo "FAIL: kdnb/ was out of sync with nbs/ (nbdev_export changed it; commit the export)"; git status --short kdnb; exit 1; fi

echo "== 2/4 nbdev_clean: notebooks must already be clean; README.md generated from nbs/index.ipynb"
before=$(snap nbs); $NBDEV clean; after=$(snap nbs)
if [ "$before" != "$after" ]; then echo "FAIL: notebooks under nbs/ were not clean (nbdev_clean changed them; commit them clean)"; git status --short nbs; exit 1; fi

$PY tools/readme.py --check

echo "== 3/4 nbdev_test (IN_TEST sizes; experiment templates run under pytest)"
OMP_NUM_THREADS=1 $NBDEV test --n_workers 2 --skip_folder_re '^(experiments|[_.].*)$' --timing

echo "== 4/4 pytest"
# tests/test_browser.py drives Debian's chromium (never a downloaded browser build)
command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) || echo "chromium could not be installed: tests/test_browser.py will be skipped"
$PY -m pytest -q tests "$@"
