"""Environment for every test, notebooks included (pytest loads this before collecting anything)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # no pretrained weights can be downloaded in tests
os.environ["MPLBACKEND"] = "Agg"
# Subprocesses (notebook kernels run by nbval/papermill, torchrun workers) put their temporary
# folders here; it is emptied at the start of every test session, so notebook runs with
# out_dir="" do not pile up in /tmp.
_SUBPROCESS_TMP = Path(tempfile.gettempdir()) / "tokenmix-tests"
shutil.rmtree(_SUBPROCESS_TMP, ignore_errors=True)
_SUBPROCESS_TMP.mkdir(parents=True, exist_ok=True)
os.environ["TMPDIR"] = str(_SUBPROCESS_TMP)
