"""The ``memlm`` console script as installed: --version, --help and info."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import memlm
from memlm.cli import main


def run(*args: str) -> subprocess.CompletedProcess:
    script = shutil.which("memlm", path=str(Path(sys.executable).parent))
    assert script, "the memlm console script is not installed next to this python"
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=120, check=False)


def test_version_and_help():
    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"memlm {memlm.__version__}"
    help_ = run("--help")
    assert help_.returncode == 0 and "usage: memlm" in help_.stdout and "info" in help_.stdout


def test_info_lists_the_index_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "index backends: torch, faiss (flat, ivf)" in out and "torch 2." in out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["frobnicate"])
    assert exit_.value.code == 2 and "invalid choice: 'frobnicate'" in capsys.readouterr().err
