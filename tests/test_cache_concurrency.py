"Two processes asking for the same teacher cache at once: one builds it, the other waits and reuses it."
import subprocess, sys

CODE = """
import sys
from kdnb.data import load_data
from kdnb.teachers import TeacherBank
from kdnb.cache import build_cache
data = load_data('digits')
bank = TeacherBank.from_zoo(['resnet_t'], data, train=False)
c = build_cache(bank, data, path=sys.argv[1], splits=['train', 'val', 'test'], chunk_size=128, progress=False)
print('rows', len(c))
"""

def test_concurrent_builds_of_one_cache(tmp_path):
    path = str(tmp_path / 'same.kdc')
    procs = [subprocess.Popen([sys.executable, '-c', CODE, path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert 'rows 1797' in out
    assert not (tmp_path / 'same.kdc.part').exists()
