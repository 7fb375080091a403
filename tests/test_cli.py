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


@pytest.mark.slow
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


@pytest.mark.parametrize("command", [["demo"], ["eval"], ["serve", "--store", "s"], ["ingest", "f", "--store", "s",
                                     "--doc-id", "d"], ["ask", "q", "--store", "s", "--doc", "d"]])
def test_threads_must_be_a_positive_integer(command, capsys):
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--threads", bad])
        assert exit_.value.code == 2
        assert f"argument --threads: expected an integer >= 1, got '{bad}'" in capsys.readouterr().err


def test_threads_limit_the_commands_sessions(tmp_path, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        (tmp_path / "doc.txt").write_text("The pass key is 417. " * 40)
        assert main(["ingest", str(tmp_path / "doc.txt"), "--store", str(tmp_path / "store"), "--doc-id", "doc",
                     "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1 and "complete" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)
