"""Start-up shim for a torchvision whose compiled ops cannot load (installed by tools/setup_env.sh).

On CPU-only torch, the registry's torchvision 0.28.0 wheel is a CUDA build: its `_C` extension
fails to load, and `import torchvision` then dies in `_meta_registrations.py` with
`operator torchvision::nms does not exist`, because it registers fake kernels for the two
operators `nms` and `qnms` without checking that they exist. This shim defines just those two
operator *schemas* (no kernels) right before torchvision is first imported, so the import
succeeds. torchvision's compiled ops (nms, roi_align, ...) and its image decoders stay
unavailable; kdnb uses PIL for images. Set KDNB_NO_TV_SHIM=1 to disable.
The setup only installs this file when the native ops really cannot load.
"""
import os, sys
import importlib.abc


class _TorchvisionShim(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == 'torchvision':
            sys.meta_path.remove(self)
            try: _define_schemas()
            except Exception: pass
        return None


_LIB = None


def _define_schemas():
    global _LIB
    import torch
    try:
        torch.ops.torchvision.nms
        return  # already there (native ops loaded): nothing to do
    except (AttributeError, RuntimeError):
        pass
    _LIB = torch.library.Library('torchvision', 'DEF')
    _LIB.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
    _LIB.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')


if not os.environ.get('KDNB_NO_TV_SHIM'):
    sys.meta_path.insert(0, _TorchvisionShim())
