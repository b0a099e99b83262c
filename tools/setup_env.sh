#!/usr/bin/env bash
# Create or update the project venv offline-safe, idempotently.
#   - reuses a torch the interpreter already has (e.g. a CUDA build on a GPU box): never replaces it;
#   - otherwise installs torch==2.13.0 first (a local CPU build on CPU machines);
#   - installs everything else under a constraints file that pins torch and torchvision;
#   - applies the torchvision start-up shim only when torchvision's native ops cannot load.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${KDNB_PYTHON:-python3}
STAMP="$VENV/.kdnb-setup"
ABSVENV="$(pwd)/$VENV"; case "$VENV" in /*) ABSVENV="$VENV";; esac
HASH=$(cat settings.ini setup.py tools/setup_env.sh tools/requirements.txt tools/torchvision_shim.py | md5sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] && (cd / && "$ABSVENV/bin/python" -c "import kdnb.runs, timm") 2>/dev/null; then
  exit 0
fi
echo "== kdnb setup: $VENV"
if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "   torch $("$PYTHON" -c 'import torch;print(torch.__version__)') found in $PYTHON: reusing it (venv with system site-packages)"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
PIP="$PY -m pip --disable-pip-version-check"
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "   installing torch==2.13.0"
  $PIP install -q torch==2.13.0
fi
TORCH=$("$PY" -c "import torch;print(torch.__version__.split('+')[0])")
TV=$("$PY" -c "import importlib.metadata as m;print(m.version('torchvision'))" 2>/dev/null || true)
if [ -z "$TV" ]; then
  # torchvision 0.(minor+15) pairs with torch 2.minor
  TV=$("$PY" -c "v='$TORCH'.split('.');print(f'0.{int(v[1])+15}.0')")
fi
CONS="$VENV/kdnb-constraints.txt"
printf 'torch==%s\ntorchvision==%s\n' "$TORCH" "$TV" > "$CONS"
echo "   pinned torch==$TORCH torchvision==$TV; installing requirements"
$PIP install -q -c "$CONS" "torchvision==$TV" -r tools/requirements.txt
$PIP install -q -c "$CONS" --no-deps -e .
# torchvision native ops: install the documented shim only when they cannot load
SITE=$("$PY" -c "import sysconfig;print(sysconfig.get_paths()['purelib'])")
rm -f "$SITE/_kdnb_torchvision_shim.py" "$SITE/_kdnb_torchvision_shim.pth"
if ! "$PY" -c "import torchvision" 2>/tmp/kdnb-tv-err.$$; then
  if grep -q "torchvision::nms does not exist" /tmp/kdnb-tv-err.$$; then
    echo "   torchvision's native ops cannot load on this torch: installing the start-up shim (see tools/torchvision_shim.py)"
    cp tools/torchvision_shim.py "$SITE/_kdnb_torchvision_shim.py"
    echo "import _kdnb_torchvision_shim" > "$SITE/_kdnb_torchvision_shim.pth"
  else
    cat /tmp/kdnb-tv-err.$$; rm -f /tmp/kdnb-tv-err.$$; echo "torchvision import failed for another reason" >&2; exit 1
  fi
fi
rm -f /tmp/kdnb-tv-err.$$
# nbconvert's templates ('lab', 'classic', ...) live under the share/ of the prefix nbconvert was installed into; a venv
# on system site-packages searches only its own prefix: link the installed ones in (else HTML export finds no 'lab')
"$PY" - <<'PYEOF'
import pathlib, site, sys
import nbconvert
from jupyter_core.paths import jupyter_path
if any((pathlib.Path(p) / 'nbconvert' / 'templates' / 'lab').is_dir() for p in jupyter_path()): raise SystemExit
pkg = pathlib.Path(nbconvert.__file__).resolve().parent            # <prefix>/lib/pythonX.Y/site-packages/nbconvert
cands = [pkg.parents[3], pathlib.Path(sys.base_prefix), pathlib.Path(site.getuserbase()), pathlib.Path('/usr/local'), pathlib.Path('/usr')]
found = next((c / 'share/jupyter/nbconvert/templates' for c in cands if (c / 'share/jupyter/nbconvert/templates/lab').is_dir()), None)
if found is None: print("   warning: nbconvert's HTML templates not found; HTML export of runs will fail"); raise SystemExit
dst = pathlib.Path(sys.prefix) / 'share/jupyter/nbconvert/templates'
dst.mkdir(parents=True, exist_ok=True)
for t in found.iterdir():
    if not (dst / t.name).exists(): (dst / t.name).symlink_to(t)
print(f"   nbconvert templates: linked {found} into {dst}")
PYEOF
(cd / && "$ABSVENV/bin/python" -c "import torchvision, timm, kdnb.runs, nbdev, papermill; print('   ok: torch', __import__('torch').__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)")
echo "$HASH" > "$STAMP"
