"""tools/setup_env.sh on a GPU-box-like Python: one that already holds torch, timm, nbdev, papermill and jupyterlab.

The packages of this checkout's venv are put on that Python's path (PYTHONPATH), so the new venv (made with
--system-site-packages) finds every requirement satisfied: pip then writes no `nbdev_*` console scripts and
nbconvert's templates are not under the new venv's prefix: the two ways `make test` and HTML export broke there."""
import os, subprocess, sys, sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_setup_env_on_a_python_that_already_has_the_packages(tmp_path):
    base = Path(sys.base_prefix) / 'bin' / 'python3'
    env = dict(os.environ, PYTHONPATH=sysconfig.get_paths()['purelib'], VENV=str(tmp_path / 'v'), KDNB_PYTHON=str(base))
    r = subprocess.run(['bash', 'tools/setup_env.sh'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert 'reusing it (venv with system site-packages)' in r.stdout and 'ok: torch' in r.stdout
    assert 'nbconvert templates: linked' in r.stdout                    # they are under the other prefix only
    py = tmp_path / 'v' / 'bin' / 'python'
    assert not (tmp_path / 'v' / 'bin' / 'nbdev_export').exists()        # the situation that broke `make test`
    out = subprocess.run([str(py), '-m', 'tools.nbdev_run', 'export', '--help'], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and 'nbdev_export' in out.stdout, out.stderr[-2000:]
    html = ("import nbformat; from nbconvert import HTMLExporter; "
            "nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('1 + 1')]); "
            "body, _ = HTMLExporter().from_notebook_node(nb); assert 'jp-Cell' in body and len(body) > 1000")
    out = subprocess.run([str(py), '-c', html], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]                       # nbconvert's 'lab' template found
