import os, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

@pytest.fixture
def root(): return ROOT

@pytest.fixture
def smoke_env():
    "Environment for subprocess runs at smoke size (templates shrink under IN_TEST)."
    return dict(os.environ, IN_TEST='1', PYTHONHASHSEED='0')
