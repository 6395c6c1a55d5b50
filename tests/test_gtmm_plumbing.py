"""The shared plumbing every command stands on: the one-line error contract, folder locks and safe writes."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gtmm import cli, fs

REPO = Path(__file__).resolve().parents[1]


def run_py(code: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, **kwargs)


# -- the entry wrapper ---------------------------------------------------------------------------------------------

WRAPPED = """
import sys
from gtmm import cli
def main(argv):
    kind = argv[0]
    if kind == "user":
        raise cli.UserError("--steps 0: expected >= 1\\n(second line)")
    if kind == "oserror":
        open("/nonexistent-dir/x", "w")
    if kind == "bug":
        raise ZeroDivisionError("a bug")
    if kind == "interrupt":
        raise KeyboardInterrupt
    print("ran", argv)
cli.run(main, sys.argv[1:])
"""


@pytest.mark.parametrize("kind, code, line", [
    ("user", 2, "error: --steps 0: expected >= 1 (second line)"),
    ("oserror", 2, "error: /nonexistent-dir/x: no such file or directory"),
    ("interrupt", 130, "interrupted"),
])
def test_known_errors_print_one_line(kind, code, line):
    result = run_py(WRAPPED, kind)
    assert result.returncode == code
    assert result.stderr.strip().splitlines() == [line]
    assert "Traceback" not in result.stderr


def test_unexpected_errors_keep_their_traceback_and_debug_shows_all():
    bug = run_py(WRAPPED, "bug")
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "ZeroDivisionError: a bug" in bug.stderr
    debug = run_py(WRAPPED, "user", "--debug")
    assert "Traceback" in debug.stderr and "UserError" in debug.stderr
    env = dict(os.environ, GTMM_DEBUG="1")
    assert "Traceback" in run_py(WRAPPED, "user", env=env).stderr


def test_success_exits_zero_without_the_debug_flag_in_argv():
    result = run_py(WRAPPED, "fine", "--debug")
    assert result.returncode == 0 and "ran ['fine']" in result.stdout


def test_parse_errors_are_one_line_naming_the_flag():
    code = """
    import dataclasses
    from gtmm import cli
    @dataclasses.dataclass
    class Config:
        seed: int = 0
        \"\"\"a seed\"\"\"
    cli.run(lambda argv: print(cli.parse(Config, argv, prog="demo")))
    """
    bad = run_py(code, "--seed", "abc")
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--seed" in lines[0] and "python -m demo --help" in lines[0]
    unknown = run_py(code, "--sed", "1")
    assert unknown.returncode == 2 and "--sed" in unknown.stderr and len(unknown.stderr.strip().splitlines()) == 1
    ok = run_py(code, "--seed", "3")
    assert ok.returncode == 0 and "seed=3" in ok.stdout
    helped = run_py(code, "--help")
    assert helped.returncode == 0 and "--seed INT" in helped.stdout and "usage: python -m demo" in helped.stdout


def test_parse_json_object_names_the_flag():
    assert cli.parse_json_object('{"grid": 6}', "env_kwargs") == {"grid": 6}
    with pytest.raises(cli.UserError, match="--env-kwargs: expected a JSON object"):
        cli.parse_json_object("[1]", "env_kwargs")
    with pytest.raises(cli.UserError, match="--env-kwargs: '{' is not valid JSON"):
        cli.parse_json_object("{", "env_kwargs")


# -- folder locks --------------------------------------------------------------------------------------------------

HOLD = """
import sys, time
from gtmm.fs import FolderLock
with FolderLock(sys.argv[1], "holder"):
    print("locked", flush=True)
    time.sleep(60)
"""


def _start_holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_is_refused_naming_the_holder(tmp_path):
    folder = tmp_path / "out"
    holder = _start_holder(folder)
    try:
        with pytest.raises(cli.UserError, match=rf"{folder} is in use by another process \(holder, pid {holder.pid}"):
            fs.FolderLock(folder, "second").acquire()
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    folder = tmp_path / "out"
    holder = _start_holder(folder)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (folder / fs.LOCK_NAME).exists()  # the dead holder could not clean up...
    with fs.FolderLock(folder, "next") as lock:  # ...but the kernel released its lock
        assert lock.path.exists()
    assert not (folder / fs.LOCK_NAME).exists()  # a clean release leaves the folder as it was


def test_lock_refuses_a_regular_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(cli.UserError, match="is a file, expected a folder"):
        fs.FolderLock(target, "x").acquire()
    assert target.read_text() == "keep me"


# -- safe writes ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_respects_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        fs.write_bytes_atomic(tmp_path / "f", b"data")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == mode


def test_full_disk_names_the_file_keeps_the_old_one_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")

    def no_space(fd):  # the OS refusing the flush, as a full disk does
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(cli.UserError, match=f"no space left on device while writing {target}"):
        fs.write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
