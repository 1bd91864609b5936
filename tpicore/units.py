"""Units: byte sizes, rates, durations and fractions from config values and flags (a leaf: imports only
tpicore.errors).

Owns the one parser for values that carry a unit. Each function takes the raw value (a number in the
field's own unit, or a string '<number><unit>') and the field name used in the error, and returns the
value in the unit its name says:

    parse_bytes     '2GiB', '500MB', '1e9', 8589934592       -> bytes (int); GB/MB/KB decimal, GiB/MiB binary
    parse_mbps      '300mbps', '1gbit', '10Mbit/s', '2GB/s'  -> megabits/s (capital B/s = bytes/s);
                    None / 'unlimited'                       -> None
    parse_ms        '5ms', '1.5s', '200us', 5                -> milliseconds
    parse_seconds   '5ms', '1.5s', 30                        -> seconds
    parse_fraction  0.01, '1%'                               -> a fraction

Errors are UnitError (a TpiError) "<field>: cannot parse '<value>' (a number in <unit>, or with a unit:
...)"; `detail` holds the text after the field name (tpicore.schema prefixes its own field path).
Must not import numpy or anything above errors.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

from tpicore.errors import TpiError

# milliseconds per unit, matched case-insensitively
_TIME_MS = {"us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3}
# megabits per second per unit, matched case-insensitively
_RATE_BITS = {"bps": 1e-6, "kbps": 1e-3, "mbps": 1.0, "gbps": 1e3,
              "kbit": 1e-3, "mbit": 1.0, "gbit": 1e3, "kbit/s": 1e-3, "mbit/s": 1.0, "gbit/s": 1e3}
# bytes per second, matched case-sensitively (capital B = bytes), as megabits per second
_RATE_BYTES = {"B/s": 8e-6, "kB/s": 8e-3, "KB/s": 8e-3, "MB/s": 8.0, "GB/s": 8e3}
# bytes per unit, matched case-insensitively ('k', 'm', 'g' alone are decimal, like kb/mb/gb)
_SIZE_BYTES = {"b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_NUMBER_UNIT = re.compile(r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ/]*)\s*")


class UnitError(TpiError):
    """A value that is not a number with a known unit; str() is '<field>: <detail>'."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}" if field else detail)
        self.field, self.detail = field, detail


def number(value: Any, field: str) -> float:
    """A finite int or float (not a bool), as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UnitError(field, f"expected a number, got {value!r}")
    if not math.isfinite(value):
        raise UnitError(field, f"must be finite, got {value!r}")
    return float(value)


def _with_unit(value: Any, field: str, factor: Callable[[str], float | None], plain: str, units: str) -> float:
    """A number in the field's own unit, or '<number><unit>' where factor(unit) converts the unit to the
    field's (None if unknown)."""
    if isinstance(value, str):
        m = _NUMBER_UNIT.fullmatch(value)
        if m:
            f = 1.0 if m.group(2) == "" else factor(m.group(2))
            if f is not None:
                v = float(m.group(1)) * f
                if not math.isfinite(v):  # '1e400GiB': too large to be a number at all
                    raise UnitError(field, f"expected a finite number, got {value!r}")
                return v
        raise UnitError(field, f"cannot parse {value!r} (a number in {plain}, or with a unit: {units})")
    return number(value, field)


def parse_ms(value: Any, field: str) -> float:
    """Time in milliseconds: 5, 5.0, '5ms', '500us', '1.5s'."""
    return _with_unit(value, field, lambda u: _TIME_MS.get(u.lower()), "ms", "us, ms, s")


def parse_seconds(value: Any, field: str) -> float:
    """Time in seconds: 30, '1.5s', '200ms', '50us'."""
    return _with_unit(value, field, lambda u: None if u.lower() not in _TIME_MS else _TIME_MS[u.lower()] / 1e3,
                      "s", "us, ms, s")


def parse_mbps(value: Any, field: str) -> float | None:
    """Rate in megabits/s: 300, '300mbps', '1gbit', '10Mbit/s', '2GB/s' (bytes). None/'unlimited' -> None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("unlimited", "inf", "none")):
        return None
    return _with_unit(value, field, lambda u: _RATE_BITS.get(u.lower(), _RATE_BYTES.get(u)), "Mbit/s",
                      "kbps, mbps, gbps, MB/s, GB/s, unlimited")


def parse_bytes(value: Any, field: str) -> int:
    """Size in bytes: 8589934592, '1e9', '8GiB', '512MiB', '8GB' (= 8e9), '500MB'."""
    if isinstance(value, str):
        return int(_with_unit(value, field, lambda u: _SIZE_BYTES.get(u.lower()), "bytes",
                              "B, KB, MB, GB, KiB, MiB, GiB"))
    v = number(value, field)
    if v != int(v):
        raise UnitError(field, f"expected a whole number of bytes, got {value!r}")
    return int(v)


def parse_fraction(value: Any, field: str) -> float:
    """A probability: 0.01 or '1%'."""
    if isinstance(value, str) and value.strip().endswith("%"):
        return _with_unit(value.strip()[:-1], field, lambda u: None, "percent", "%") / 100.0
    return number(value, field)
