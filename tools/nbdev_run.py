"""Run an nbdev command through this interpreter, without console scripts: `python -m tools.nbdev_run export|clean|test [ARGS]`.

A venv made with --system-site-packages on top of a Python that already has nbdev gets no `nbdev_*` scripts
(pip finds nbdev satisfied), so the project never calls them by path."""
import importlib, sys
from fastcore.script import anno_parser

CMDS = {'export': ('nbdev.doclinks', 'nbdev_export'), 'clean': ('nbdev.clean', 'nbdev_clean'), 'test': ('nbdev.test', 'nbdev_test')}

def main():
    if len(sys.argv) < 2 or sys.argv[1] not in CMDS:
        print(f"usage: python -m tools.nbdev_run {{{'|'.join(CMDS)}}} [ARGS]", file=sys.stderr); return 2
    mod, name = CMDS[sys.argv.pop(1)]
    fn = getattr(importlib.import_module(mod), name)
    args = vars(anno_parser(fn.__wrapped__, prog=name).parse_args())
    args.pop('pdb', None); args.pop('xtra', None)
    res = fn(**args)
    return res if isinstance(res, int) else 0

if __name__ == '__main__': sys.exit(main())
