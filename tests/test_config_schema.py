"""The one units module (tpicore/units.py), the one config validation (tpicore/schema.py) and the one
dotted-override function (emulator/config/overrides.py)."""

from __future__ import annotations

from typing import Annotated

import pytest

from emulator.config.overrides import apply_dotted, parse_override
from tpicore.errors import TpiError
from tpicore.schema import Choice, Int, Invalid, Ms, Record, SchemaError, check, load
from tpicore.units import UnitError, parse_bytes, parse_mbps, parse_ms, parse_seconds


def test_units_parse_sizes_rates_and_durations():
    assert parse_bytes("2GiB", "x") == 2 * 2**30 and parse_bytes("500MB", "x") == 500 * 10**6
    assert parse_bytes("1e9", "x") == 10**9 and parse_bytes("20KB", "x") == 20_000 and parse_bytes(4096, "x") == 4096
    assert parse_bytes("3k", "x") == 3000  # a bare k/m/g is decimal, like kb/mb/gb
    assert parse_mbps("300mbps", "x") == 300.0 and parse_mbps("1gbit", "x") == 1000.0
    assert parse_mbps("10Mbit/s", "x") == 10.0 and parse_mbps("unlimited", "x") is None
    assert parse_ms("5ms", "x") == 5.0 and parse_ms("1.5s", "x") == 1500.0 and parse_ms("200us", "x") == 0.2
    assert parse_seconds("1.5s", "x") == 1.5 and parse_seconds("200ms", "x") == pytest.approx(0.2)
    assert parse_seconds(30, "x") == 30.0


def test_unit_errors_name_the_field():
    with pytest.raises(UnitError, match=r"--max-shard-bytes: cannot parse '2 parsecs'") as e:
        parse_bytes("2 parsecs", "--max-shard-bytes")
    assert isinstance(e.value, TpiError) and e.value.detail.startswith("cannot parse '2 parsecs'")
    with pytest.raises(TpiError, match=r"mem: expected a whole number of bytes, got 1.5"):
        parse_bytes(1.5, "mem")
    with pytest.raises(TpiError, match=r"t: expected a number, got True"):
        parse_ms(True, "t")


class _Leaf(Record):
    size: Int(1)
    mode: Choice("a", "b") = "a"
    delay_ms: Ms() = 0.0


def _not_bad(value: str) -> str:
    if value == "bad":
        raise Invalid("not that name")
    return value


class _Doc(Record):
    name: Annotated[str, check(_not_bad)]
    leaves: list[_Leaf] = []
    by_name: dict[str, _Leaf] = {}


def test_schema_errors_are_one_line_with_file_and_field_path():
    ok = load(_Doc, {"name": "x", "leaves": [{"size": 2, "delay_ms": "1.5s"}]}, "f.yaml")
    assert ok.leaves[0].delay_ms == 1500.0 and ok.leaves[0].mode == "a"
    cases = [
        ({"name": "x", "leaves": [{"size": 2}, {"size": 0}]}, "f.yaml: leaves[1].size: must be an integer >= 1, got 0"),
        ({"name": "x", "by_name": {"k": {"size": 1, "mode": "c"}}},
         "f.yaml: by_name.k.mode: expected one of a, b, got 'c'"),
        ({"name": "x", "leaves": [{"size": 1, "sise": 2}]},
         "f.yaml: leaves[0].sise: unknown key (allowed: size, mode, delay_ms)"),
        ({"leaves": []}, "f.yaml: name: missing"),
        ({"name": "bad"}, "f.yaml: name: not that name"),
        ({"name": "x", "leaves": {"size": 1}}, "f.yaml: leaves: expected a list, got {'size': 1}"),
        ({"name": "x", "leaves": [{"size": 1, "delay_ms": "soon"}]},
         "f.yaml: leaves[0].delay_ms: cannot parse 'soon' (a number in ms, or with a unit: us, ms, s)"),
    ]
    for doc, message in cases:
        with pytest.raises(SchemaError) as e:
            load(_Doc, doc, "f.yaml")
        assert str(e.value) == message


def test_records_construct_directly_with_the_same_errors():
    assert _Leaf(3, "b") == _Leaf(size=3, mode="b")
    assert _Leaf(3).replace(mode="b") == _Leaf(3, "b")
    with pytest.raises(TpiError, match=r"^size: must be an integer >= 1, got 0$"):
        _Leaf(0)
    with pytest.raises(TpiError, match=r"^mode: expected one of a, b, got 'c'$"):
        _Leaf(1).replace(mode="c")
    with pytest.raises(ValueError, match="frozen"):  # a programming error, not a user's: pydantic's own
        setattr(_Leaf(1), "size", 2)


def test_apply_dotted_sets_creates_indexes_and_copies():
    doc: dict = {"links": {"latency_ms": 1}, "devices": [{"cores": 1}, {"cores": 2}], "model": None}
    shared = [16, 64]
    apply_dotted(doc, "links.latency_ms", "5ms")
    apply_dotted(doc, "devices.1.cores", 4)
    apply_dotted(doc, "model.synth", "tiny")  # null on the way: a new mapping
    apply_dotted(doc, "workload.prompt_lengths", shared)
    shared.append(1)  # the document holds a copy
    assert doc == {"links": {"latency_ms": "5ms"}, "devices": [{"cores": 1}, {"cores": 4}],
                   "model": {"synth": "tiny"}, "workload": {"prompt_lengths": [16, 64]}}
    with pytest.raises(TpiError, match=r"--set devices\.5\.cores: devices\.5: no such list item"):
        apply_dotted(doc, "devices.5.cores", 1)
    with pytest.raises(TpiError, match=r"--set links\.latency_ms\.x: links\.latency_ms is not a mapping"):
        apply_dotted(doc, "links.latency_ms.x", 1)
    assert parse_override("links.latency_ms=5") == ("links.latency_ms", 5)
    assert parse_override("workload.prompt_lengths=[16, 64]") == ("workload.prompt_lengths", [16, 64])
    assert parse_override("options.window=") == ("options.window", None)
    with pytest.raises(TpiError, match="expected KEY=VALUE"):
        parse_override("links..x=1")
