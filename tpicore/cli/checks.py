"""Flag checks shared by the `tpi` subcommands: each bad value becomes one TpiError line naming the flag
(the dispatcher prints it as `error: ...`, exit 2) before any work is done or any file is written.

Layer: cli (imports tpicore.errors only). Owns the value checks argparse's `type=` cannot express: finite
numbers and their ranges, non-negative seeds, HOST:PORT with a port in range, output paths that can be
written (not a folder, in an existing folder), prompt text that is valid UTF-8, and flags that only mean
something together. Must not open models or sockets.
"""

from __future__ import annotations

import math
import os

from tpicore.errors import TpiError


def number(flag: str, value: float | None, *, lo: float | None = None, lo_open: bool = False,
           hi: float | None = None) -> None:
    """A finite number within [lo, hi] ((lo, hi] with lo_open); None (not given) passes."""
    if value is None:
        return
    ok = math.isfinite(value) and (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi)
    if not ok:
        want = "a finite number"
        if lo is not None:
            want += f" {'>' if lo_open else '>='} {lo:g}"
        if hi is not None:
            want += f"{' and' if lo is not None else ''} <= {hi:g}"
        raise TpiError(f"{flag}: expected {want}, got {value!r}")


def integer(flag: str, value: int | None, lo: int, hi: int | None = None) -> None:
    """An integer >= lo (and <= hi); None (not given) passes."""
    if value is None:
        return
    if value < lo or (hi is not None and value > hi):
        raise TpiError(f"{flag}: expected an integer >= {lo}{f' and <= {hi}' if hi is not None else ''}, got {value}")


def host_port(flag: str, text: str) -> tuple[str, int]:
    """'HOST:PORT' with a non-empty host and a port 0..65535 ('[::1]:PORT' keeps the brackets off)."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isascii() or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise TpiError(f"{flag}: expected HOST:PORT with a port in 0..65535, got {text!r}")
    return host, int(port)


def output_file(flag: str, path: str | None) -> None:
    """A file path that can be written: not a folder, inside an existing folder we may write to."""
    if path is None:
        return
    if not path or os.path.isdir(path):
        raise TpiError(f"{flag}: {path!r} is a folder; expected a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise TpiError(f"{flag}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise TpiError(f"{flag}: folder {parent} is not writable")


def utf8(flag: str, text: str | None) -> None:
    """Text that came from the command line as valid UTF-8 (undecodable bytes arrive as surrogates)."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TpiError(f"{flag}: not valid UTF-8 (byte {e.object[e.start].encode('utf-8', 'surrogateescape')!r} "
                       f"at character {e.start})") from None


def needs(flag: str, given: bool, other: str, other_given: bool) -> None:
    """`flag` means something only with `other`: refuse it alone rather than ignore it."""
    if given and not other_given:
        raise TpiError(f"{flag}: needs {other}")


def exclusive(flag: str, given: bool, other: str, other_given: bool) -> None:
    if given and other_given:
        raise TpiError(f"{flag} and {other}: give one, not both")


def folder(flag: str, path: str | None) -> None:
    """An existing folder (a file or a missing path named as such)."""
    if path is None:
        return
    if os.path.isfile(path):
        raise TpiError(f"{flag}: {path} is a file, not a folder")
    if not os.path.isdir(path):
        raise TpiError(f"{flag}: {path}: folder not found")
