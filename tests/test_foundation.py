"Foundation: nbdev hygiene, data-loader errors, the papermill template and the CLI."
import json, shutil, subprocess, sys
from pathlib import Path
import nbformat, pytest
from conftest import ROOT, BIN
from kdnb.core import KdnbError
from kdnb.data import load_data, write_fake_cifar


def test_parameters_tag_survives_nbdev_clean(tmp_path):
    src = ROOT / 'nbs' / 'experiments' / 'distill.ipynb'
    nb = nbformat.read(src, as_version=4)
    pcell = next(c for c in nb.cells if 'parameters' in c.metadata.get('tags', []))
    pcell.metadata['collapsed'] = True; pcell.execution_count = 7   # noise nbdev_clean must strip
    nb.metadata['papermill'] = {'duration': 1.0}; pcell.metadata['papermill'] = {'status': 'completed'}
    f = tmp_path / 'messy.ipynb'; nbformat.write(nb, f)
    subprocess.run([str(BIN / 'nbdev_clean'), '--fname', str(f)], cwd=ROOT, check=True)
    cleaned = nbformat.read(f, as_version=4)
    tagged = [c for c in cleaned.cells if 'parameters' in c.metadata.get('tags', [])]
    assert len(tagged) == 1 and tagged[0].source == pcell.source
    assert 'collapsed' not in tagged[0].metadata and tagged[0].execution_count is None
    assert 'papermill' not in cleaned.metadata and 'papermill' not in tagged[0].metadata


def test_unknown_dataset_name():
    with pytest.raises(KdnbError, match=r"`name`.*'digits'"): load_data('mnist')


def test_missing_cifar_folder(tmp_path):
    with pytest.raises(KdnbError) as e: load_data('cifar10', root=tmp_path)
    msg = str(e.value)
    assert '`root`' in msg and 'cifar-10-batches-py' in msg and 'never downloads' in msg


def test_cifar_loads_from_folder(tmp_path):
    write_fake_cifar(tmp_path, 'cifar100', n_per_batch=200, n_test=100)   # every class in every split (2 train, 1 test each)
    d = load_data('cifar100', root=tmp_path, size=16)
    assert d.images.shape == (300, 3, 16, 16) and d.num_classes == 100


@pytest.mark.parametrize('size', [0, 4, 32.0, 'big', 5000])
def test_wrong_image_size(size):
    with pytest.raises(KdnbError, match='`size`'): load_data('digits', size=size)


def test_imagefolder_needs_root_and_images(tmp_path):
    with pytest.raises(KdnbError, match='`root`'): load_data('imagefolder')
    (tmp_path / 'empty' / 'cls').mkdir(parents=True)
    with pytest.raises(KdnbError, match='no images'): load_data('imagefolder', root=tmp_path / 'empty')


def test_kdnb_error_is_value_error():
    assert issubclass(KdnbError, ValueError)


def test_cli_help_and_bad_param(tmp_path):
    kdnb = str(BIN / 'kdnb')
    out = subprocess.run([kdnb, '--help'], capture_output=True, text=True)
    assert out.returncode == 0 and 'run' in out.stdout and 'demo' in out.stdout
    out = subprocess.run([kdnb, 'run', 'distill', '-p', 'epoch', '3', '--out', str(tmp_path / 'r')], capture_output=True, text=True)
    assert out.returncode == 2 and "'epochs'" in out.stderr and '`params`' in out.stderr
    assert not (tmp_path / 'r').exists()


def test_distill_template_smoke_papermill(tmp_path, smoke_env):
    "The walking skeleton through papermill at smoke size: executed notebook, params, metrics, HTML."
    out = tmp_path / 'run'
    r = subprocess.run([str(BIN / 'kdnb'), 'run', 'distill', '-p', 'device', 'cpu', '--out', str(out)],
                       capture_output=True, text=True, env=smoke_env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / 'metrics.json').read_text())
    for k in ('teacher', 'student_alone', 'student_kd'): assert 0.0 <= m[k]['test_acc'] <= 1.0
    assert m['teacher']['test_acc'] > 0.3          # one smoke epoch already learns something
    assert json.loads((out / 'params.json').read_text())['device'] == 'cpu'
    assert (out / 'distill.ipynb').exists() and '<html' in (out / 'distill.html').read_text()[:2000].lower()
    assert 'student_kd' in r.stdout


def test_torchvision_and_timm_import():
    "timm imports torchvision; on CPU torch the setup's shim must make that work."
    r = subprocess.run([sys.executable, '-c', 'import timm, torchvision; print(timm.__version__)'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
