"""What the browser tests share: Debian's headless chromium (never a downloaded browser build), its flags, why a test
must be skipped, and a free loopback port."""
import os, shutil, socket

CHROMIUM = shutil.which('chromium') or '/usr/bin/chromium'
FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync']


def missing() -> str:
    "Why the browser tests cannot run here ('' when they can)."
    if not os.path.exists(CHROMIUM):
        return ("Debian chromium is not installed and could not be installed (tools/test.sh runs "
                "`apt-get install chromium`; install it and rerun)")
    try: import playwright.sync_api  # noqa: F401
    except ImportError: return 'the playwright python package is missing (it is in tools/requirements.txt; run tools/setup_env.sh)'
    return ''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]
