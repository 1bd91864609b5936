"""Dotted overrides into a parsed YAML document: the one place `--set KEY=VALUE`, flags, sweep points and
topology overrides are applied.

    parse_override("links.latency_ms=5ms") -> ("links.latency_ms", "5ms")   VALUE read as YAML
    apply_dotted(doc, "devices.template.cores", 4)                           doc["devices"]["template"]["cores"] = 4

Path parts are mapping keys, or list indexes where the node is a list ("devices.1.cores"); missing
(or null) mappings on the way are created. The value is deep-copied, so documents never share it.
Owns no knowledge of what the keys mean (run_config.py maps its short forms); must not import above
emulator.config.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from tpicore.errors import TpiError


def parse_override(text: str) -> tuple[str, Any]:
    """'links.latency_ms=5ms' -> ('links.latency_ms', '5ms'); the value is read as YAML (5 -> int,
    [16, 64] -> list, null or nothing -> None)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise TpiError(f"--set {text!r}: expected KEY=VALUE with a dotted KEY, e.g. links.latency_ms=5")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise TpiError(f"--set {text!r}: value is not valid YAML ({e})") from None
    return key, parsed


def _index(node: list, part: str, key: str, where: str) -> int:
    if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
        raise TpiError(f"--set {key}: {where}: no such list item")
    return int(part)


def apply_dotted(doc: dict, key: str, value: Any) -> None:
    """Set the node at dotted `key` of `doc` to a copy of `value`, in place; TpiError naming the key."""
    value = copy.deepcopy(value)  # sweep points share their values: a later override must not edit them
    parts = key.split(".")
    node: Any = doc
    for i, part in enumerate(parts):
        where = ".".join(parts[:i + 1])
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = _index(node, part, key, where)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise TpiError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping")
