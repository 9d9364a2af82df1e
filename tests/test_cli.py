"""The command line: validation errors come back fast, before any data or model work."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tokenmix import methods
from tokenmix.__main__ import config_parser, main

# real subprocesses for the two validation errors (each pays the torch/timm import, so the other
# commands are exercised in-process through the same ``main``)
CASES = {
    "nosuch": ["train", "--method", "nosuch"],
    "img30": ["train", "--img_size", "30"],
}


@pytest.fixture(scope="module")
def cli_runs(repo_root, tmp_path_factory):
    """Start every CLI case at once (each pays the torch/timm import), then collect them."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")])}
    procs = {}
    for name, args in CASES.items():
        cwd = tmp_path_factory.mktemp(f"cli_{name}")
        out_dir = cwd / "runs"
        extra = ["--out_dir", str(out_dir), "--data_dir", str(cwd / "data")]
        procs[name] = (cwd, out_dir, time.monotonic(),
                       subprocess.Popen([sys.executable, "-m", "tokenmix", *args, *extra], cwd=cwd, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    for name, (cwd, out_dir, t0, p) in procs.items():
        try:
            out, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        results[name] = {"rc": p.returncode, "out": out, "err": err, "seconds": time.monotonic() - t0,
                         "cwd": cwd, "out_dir": out_dir}
    return results


def _assert_fast_and_clean(r):
    assert r["seconds"] < 60, r
    assert not r["out_dir"].exists()  # no run folder
    assert list(r["cwd"].iterdir()) == []  # nothing written at all (no data download, no runs/)


def test_unknown_method_fails_fast_naming_valid_methods(cli_runs):
    r = cli_runs["nosuch"]
    assert r["rc"] != 0 and "Traceback" not in r["err"]
    assert "nosuch" in r["err"]
    for name in methods.available():
        assert name in r["err"]
    _assert_fast_and_clean(r)


def test_bad_img_size_fails_fast_naming_valid_sizes(cli_runs):
    r = cli_runs["img30"]
    assert r["rc"] != 0 and "Traceback" not in r["err"]
    assert "img_size 30" in r["err"] and "28" in r["err"] and "32" in r["err"]
    _assert_fast_and_clean(r)


def test_non_integer_epochs_is_an_argparse_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["train", "--epochs", "abc", "--out_dir", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--epochs" in err and "invalid int value: 'abc'; see --help" in err
    assert not (tmp_path / "r").exists()


def test_methods_command_lists_methods_and_parameters(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert listed == set(methods.available())
    for name in methods.available():
        line = next(ln for ln in out.splitlines() if ln.split()[0] == name)
        for k, v in methods.parameters(name).items():
            assert (f"{k}={v!r}" in line) == (k != "num_classes")


# ---------------------------------------------------------------------------------------------
# in-process

def test_help_and_unknown_command(capsys):
    assert main([]) == 0 and "python -m tokenmix train" in capsys.readouterr().out
    assert main(["bogus"]) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and "train" in err and "methods" in err


def test_parser_has_one_typed_option_per_field():
    from tokenmix.train.config import RunConfig
    p = config_parser()
    opts = {a.dest for a in p._actions if a.dest != "help"}
    assert opts == set(RunConfig.field_names())
    args = vars(p.parse_args(["--amp", "false", "--lr", "0.5", "--method_kwargs", '{"cutmix_snap": "token"}',
                              "--epochs", "3"]))
    assert args == {"amp": False, "lr": 0.5, "method_kwargs": {"cutmix_snap": "token"}, "epochs": 3}
    assert vars(p.parse_args([])) == {}  # unset fields keep RunConfig's defaults


@pytest.mark.parametrize("argv", [["--amp", "maybe"], ["--method_kwargs", "[1, 2]"], ["--method_kwargs", "{bad"],
                                  ["--lr", "fast"], ["--epoch", "3"]])
def test_parser_rejects_bad_values(argv, capsys):
    with pytest.raises(SystemExit) as e:
        config_parser().parse_args(argv)
    assert e.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_config_error_in_process(capsys, tmp_path):
    assert main(["train", "--batch_size", "0", "--out_dir", str(tmp_path / "r")]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
