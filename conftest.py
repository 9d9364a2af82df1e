"""Environment for every test, notebooks included (pytest loads this before collecting anything)."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # no pretrained weights can be downloaded in tests
os.environ["MPLBACKEND"] = "Agg"
# Subprocesses (notebook kernels run by nbval/papermill, torchrun workers) put their temporary
# folders in one folder per test session, removed when the session ends, so notebook runs with
# out_dir="" do not pile up in /tmp; folders of sessions that died are removed at the next start,
# and two sessions running at once (e.g. two checkouts) never remove each other's files.
_ROOT_TMP = Path(tempfile.gettempdir()) / "tokenmix-tests"
_ROOT_TMP.mkdir(parents=True, exist_ok=True)
for _old in _ROOT_TMP.iterdir():
    try:
        os.kill(int(_old.name), 0)  # the session that made it is alive: keep
    except (ValueError, ProcessLookupError):
        shutil.rmtree(_old, ignore_errors=True)
_SUBPROCESS_TMP = _ROOT_TMP / str(os.getpid())
_SUBPROCESS_TMP.mkdir(parents=True, exist_ok=True)
atexit.register(shutil.rmtree, _SUBPROCESS_TMP, True)
os.environ["TMPDIR"] = str(_SUBPROCESS_TMP)
