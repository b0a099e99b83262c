#!/usr/bin/env python3
"""Generate README.md from nbs/index.ipynb (markdown cells as they are, code cells as python blocks).

nbdev's own `nbdev_readme` renders through Quarto, which cannot be installed on these machines;
this does the same for a notebook without outputs. `--check` fails if README.md is stale.
"""
import json, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def render(nb_path=root / 'nbs' / 'index.ipynb') -> str:
    nb = json.loads(Path(nb_path).read_text())
    parts = ['<!-- generated from nbs/index.ipynb by tools/readme.py: edit the notebook, not this file -->']
    for c in nb['cells']:
        src = ''.join(c['source']).strip()
        if not src or src.startswith('#| hide') or src.startswith('#|hide'): continue
        if c['cell_type'] == 'markdown': parts.append(src)
        else:
            lines = [l for l in src.splitlines() if not l.startswith('#|')]
            if lines: parts.append('```python\n' + '\n'.join(lines) + '\n```')
    return '\n\n'.join(parts) + '\n'

if __name__ == '__main__':
    text, readme = render(), root / 'README.md'
    if '--check' in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            sys.exit('FAIL: README.md is out of date with nbs/index.ipynb (run: python tools/readme.py)')
        print('README.md is in sync with nbs/index.ipynb')
    else:
        readme.write_text(text); print('wrote', readme)
