"""The one entry wrapper and the shared helpers of every `python -m ...` command.

Contract (issue 10): a known error (bad flag, bad file, busy folder, full disk) prints ONE line
``error: <what>, <where>, <expected vs got>`` on stderr and exits 2; an unexpected error keeps its traceback (it is
a bug to report). ``--debug`` (stripped before parsing) or ``GTMM_DEBUG=1`` shows the traceback of every error.
Ctrl-C exits 130 (128 + SIGINT) without a traceback; commands that must save work on a signal do so themselves.

    def main(argv=None):
        cfg = cli.parse(MyConfig, argv, prog="rollouts.collect")
        ...

    if __name__ == "__main__":
        cli.run(main)
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")

EXIT_USAGE = 2  # argparse's and tyro's exit status for bad input: one for every kind of user error
DEBUG_ENV = "GTMM_DEBUG"


class UserError(ValueError):
    """Bad input from the user (a flag, a file, a folder): the CLI prints the message on one line and exits 2.

    A subclass of ValueError, so library callers that catch ValueError keep working."""


def parse_json(text: str, name: str, kind: type, expected: str) -> Any:
    """The JSON value ``text`` given to flag ``name`` (e.g. ``--path-period``), which must be a ``kind`` (dict, list);
    a UserError naming the flag when it is not JSON, or not ``expected`` (the words for ``kind``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{name}: {text!r} is not valid JSON ({error})") from error
    if not isinstance(value, kind):
        raise UserError(f"{name}: expected {expected}, got {text!r}")
    return value


def parse_json_object(text: str, flag: str) -> dict[str, Any]:
    """The JSON object given to ``--<flag>`` (e.g. ``--env-kwargs '{"grid": 6}'``), or a UserError naming the flag."""
    return parse_json(text, "--" + flag.replace("_", "-"), dict, "a JSON object like '{\"key\": 1}'")


def check_range(flag: str, value: float, low: float | None = None, high: float | None = None) -> None:
    """UserError ``--flag V: expected >= low`` (and/or ``<= high``) when ``value`` is out of range."""
    if (low is not None and value < low) or (high is not None and value > high):
        want = " and ".join(s for s in ((f">= {low}" if low is not None else ""), (f"<= {high}" if high is not None else "")) if s)
        raise UserError(f"--{flag.replace('_', '-')} {value}: expected {want}")


def resolve_device(name: str, local_rank: int = 0):
    """``--device`` as a ``torch.device``: auto = this rank's GPU if CUDA is available, else the CPU; ``cuda`` = this
    rank's GPU; a UserError for a malformed name, for CUDA on a machine without it, or for a GPU it does not have."""
    import torch  # here: the CLI plumbing itself stays torch-free

    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise UserError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


_BOX = re.compile(r"[│╭╮╰╯─┌┐└┘├┤━┃]")


def parse(config_cls: type[T], argv: Sequence[str] | None = None, *, prog: str, default: T | None = None,
          description: str | None = None) -> T:
    """``tyro.cli(config_cls)`` with the usage line ``python -m <prog>`` and tyro's boxed parse errors turned into
    the one-line ``error: ...`` of every other bad input (exit 2). ``--help`` prints tyro's help unchanged."""
    import tyro  # here: library code that imports gtmm.cli (UserError) needs no CLI packages

    argv = list(sys.argv[1:] if argv is None else argv)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
            return tyro.cli(config_cls, args=argv, default=default, prog=f"python -m {prog}", description=description)
    except SystemExit as exit_:
        text = captured.getvalue()
        if exit_.code in (0, None):  # --help: show it as tyro wrote it
            sys.stdout.write(text)
            raise
        # tyro's box: a title ("Value error", "Unrecognized options"), a rule, then the reason, which tyro wraps at
        # the box's width (a list of choices spans two lines), up to the next rule
        lines = [_BOX.sub("", line).strip() for line in text.splitlines()]
        rules = [i for i, line in enumerate(lines) if line and set(line) <= set("-=_ ")]
        body = lines[rules[0] + 1:rules[1] if len(rules) > 1 else None] if rules else lines
        reason = " ".join(line for line in body if line) or "bad arguments"
        print(f"error: {reason} (python -m {prog} --help lists the flags)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def _one_line(error: BaseException) -> str | None:
    """The one-line message of a known error, or None for an unexpected one (which keeps its traceback)."""
    if isinstance(error, UserError):
        return " ".join(str(error).split())
    if isinstance(error, OSError) and error.filename is not None:
        where = error.filename
        if error.errno == errno.ENOSPC:
            return f"no space left on device while writing {where}"
        reason = error.strerror or os.strerror(error.errno or 0)
        return f"{where}: {reason.lower()}"
    return None


def run(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> NoReturn:
    """Run ``main(argv)`` as a command: exit 0 on success, 2 with one ``error:`` line on a known error, 130 on
    Ctrl-C; unexpected errors propagate with their traceback. ``--debug`` anywhere in argv shows every traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        main(argv)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:  # noqa: BLE001 - sorted into known (one line) and unexpected (re-raised) below
        message = _one_line(error)
        if message is None or debug:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None
    raise SystemExit(0)
