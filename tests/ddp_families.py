"""Worker for tests/test_distributed.py (not a test module): trains one tiny run per method family
under ``torchrun``; argv: out_dir data_dir config-JSON method[,method...]."""
import json
import sys

from tokenmix.train.config import RunConfig
from tokenmix.train.engine import train

out_dir, data_dir, base, names = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4].split(",")
for name in names:
    train(RunConfig(**{**base, "method": name, "run_id": name, "out_dir": out_dir, "data_dir": data_dir}))
