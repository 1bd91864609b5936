"""Topology as data: presets load, bad values are rejected naming the field, route lengths per shape."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from emulator.config.topology import (
    Link,
    Machine,
    Topology,
    load_topology,
    make_topology,
    topology_from_dict,
)
from tpicore.errors import TpiError
from tpicore.units import parse_bytes, parse_mbps, parse_ms

PRESETS = Path(__file__).resolve().parent.parent / "configs" / "topologies"


def write(tmp_path: Path, doc: dict, name: str = "x.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc))
    return p


def base_doc(**links) -> dict:
    return {"devices": {"count": 3, "template": {"cores": 2, "mem_bytes": "1GiB"}},
            "links": {"shape": "star", "latency_ms": 1, "bandwidth_mbps": 100, **links}}


def test_presets_load():
    klonet = load_topology(PRESETS / "klonet.yaml")
    assert len(klonet) == 8 and [d.name for d in klonet.devices][:2] == ["d0", "d1"]
    assert all(d.cores == 8 and d.mem_bytes == 8 * 2**30 for d in klonet.devices)
    assert set(klonet.links.values()) == {Link(latency_ms=1.0, bandwidth_mbps=300.0)}

    laptops = load_topology(PRESETS / "laptops.yaml")
    assert [(d.name, d.cores, d.mem_bytes // 2**30, d.speed) for d in laptops.devices] == [
        ("m1", 8, 8, 1.0), ("i5", 4, 8, 0.5), ("i7a", 8, 16, 0.8), ("i7b", 8, 16, 0.8)]
    assert laptops.links["i5>switch"] == Link(latency_ms=7.0, bandwidth_mbps=320.0)
    assert laptops.links["switch>m1"] == Link(latency_ms=5.0, bandwidth_mbps=510.0)
    assert laptops.idle_delay_s(1, 0, 0) == pytest.approx(0.012)  # i5 -> m1: 7 ms + 5 ms

    star = load_topology(PRESETS / "star.yaml")
    assert len(star) == 8 and len(star.links) == 16


def test_path_lengths_per_shape():
    devices = [Machine(f"d{i}", cores=1, mem_bytes=2**30) for i in range(4)]
    link = Link(latency_ms=1, bandwidth_mbps=300)
    assert make_topology(devices, "klonet", link).route(3, 0) == ("d3>gw:d3", "gw:d3>core", "core>gw:d0", "gw:d0>d0")
    assert make_topology(devices, "star", link).route(3, 0) == ("d3>switch", "switch>d0")
    assert make_topology(devices, "full", link).route(3, 0) == ("d3>d0",)
    klonet = load_topology(PRESETS / "klonet.yaml")
    assert all(len(klonet.route(w, 0)) == 4 for w in range(1, 8))


def test_star_models_the_masters_downlink_as_shared():
    topo = load_topology(PRESETS / "star.yaml")
    into_master = {topo.route(w, 0)[-1] for w in range(1, 8)}
    assert into_master == {"switch>d0"}  # every worker's payload crosses the same link: incast


def test_units_and_overrides(tmp_path):
    assert parse_ms("5ms", "x") == 5.0 and parse_ms("500us", "x") == 0.5 and parse_ms(2, "x") == 2.0
    assert parse_mbps("1gbps", "x") == 1000.0 and parse_mbps("300Mbit/s", "x") == 300.0
    assert parse_mbps("2GB/s", "x") == 16000.0 and parse_mbps(None, "x") is None
    assert parse_bytes("512MiB", "x") == 512 * 2**20 and parse_bytes("8GB", "x") == 8 * 10**9
    with pytest.raises(TpiError, match=r"bandwidth_mbps: cannot parse '3 furlongs'"):
        parse_mbps("3 furlongs", "bandwidth_mbps")
    topo = load_topology(PRESETS / "klonet.yaml", {"links.latency_ms": "5ms", "links.bandwidth_mbps": "1gbps",
                                                   "devices.count": 4})
    assert len(topo) == 4 and set(topo.links.values()) == {Link(latency_ms=5.0, bandwidth_mbps=1000.0)}
    p = write(tmp_path, {"devices": [{"name": "a", "cores": 1, "mem_bytes": 2**30},
                                     {"name": "b", "cores": 1, "mem_bytes": 2**30}],
                         "links": [{"src": "a", "dst": "b", "latency_ms": "2ms", "bandwidth_mbps": None}]})
    topo = load_topology(p, {"devices.1.cores": 4})
    assert topo.devices[1].cores == 4 and topo.route(1, 0) == ("b>a",) and topo.links["b>a"].latency_ms == 2.0


@pytest.mark.parametrize("doc_change, message", [
    (lambda d: d["links"].update(latency_ms=-1), r"x.yaml: links.latency_ms: must be >= 0, got -1"),
    (lambda d: d["links"].update(bandwidth_mbps=0), r"x.yaml: links.bandwidth_mbps: must be > 0 .*got 0"),
    (lambda d: d["links"].update(loss=1.5), r"x.yaml: links.loss: must be in \[0, 1\), got 1.5"),
    (lambda d: d["links"].update(per_device={"d7": {"latency_ms": 1}}), r"x.yaml: links.per_device.d7: unknown device 'd7'"),
    (lambda d: d["links"].update(latncy_ms=1), r"x.yaml: links.latncy_ms: unknown key"),
    (lambda d: d.update(colour="red"), r"x.yaml: colour: unknown key"),
    (lambda d: d["devices"]["template"].update(cores=0), r"devices.template.cores: must be an integer >= 1, got 0"),
    (lambda d: d["devices"]["template"].update(mem_bytes="8 elephants"), r"devices.template.mem_bytes: cannot parse"),
    (lambda d: d.update(devices=[{"name": "a", "cores": 1, "mem_bytes": 1}] * 2),
     r"x.yaml: devices\[1\].name: duplicate device name 'a'"),
    (lambda d: d["links"].update(shape="ring"), r"links.shape: expected one of star, klonet, full, got 'ring'"),
])
def test_bad_values_name_the_field(tmp_path, doc_change, message):
    doc = base_doc()
    doc_change(doc)
    with pytest.raises(TpiError, match=message):
        load_topology(write(tmp_path, doc))


def test_explicit_links_name_the_item(tmp_path):
    devices = [{"name": n, "cores": 1, "mem_bytes": 2**30} for n in ("a", "b", "c")]
    ok = {"src": "a", "dst": "b", "latency_ms": 1}
    cases = [
        ([ok, ok], r"x.yaml: links\[1\]: a link from 'a' to 'b'"),
        ([ok, {"src": "b", "dst": "c"}, {"src": "a", "dst": "c", "latency_ms": -1}],
         r"x.yaml: links\[2\].latency_ms: must be >= 0, got -1"),
        ([ok, {"src": "a", "dst": "zed"}], r"x.yaml: links\[1\].dst: unknown device 'zed'"),
        ([ok], r"x.yaml: paths: no route from 'a' to 'c'"),
    ]
    for links, message in cases:
        with pytest.raises(TpiError, match=message):
            load_topology(write(tmp_path, {"devices": devices, "links": links}))


def test_dataclasses_validate_directly():
    with pytest.raises(TpiError, match=r"latency_ms: must be >= 0, got -1"):
        Link(latency_ms=-1)
    with pytest.raises(TpiError, match=r"bandwidth_mbps: must be > 0"):
        Link(bandwidth_mbps=0)
    with pytest.raises(TpiError, match=r"speed: must be > 0"):
        Machine("a", cores=1, mem_bytes=1, speed=0)
    d = [Machine("a", 1, 1), Machine("b", 1, 1)]
    with pytest.raises(TpiError, match=r"paths\['a', 'b'\]: unknown link 'nope'"):
        Topology(devices=tuple(d), links={}, paths={("a", "b"): ("nope",), ("b", "a"): ("nope",)})
    with pytest.raises(TpiError, match=r"per_device: unknown device 'c'"):
        make_topology(d, "star", Link(), {"c": Link()})
    topo = topology_from_dict({"devices": [{"name": "a", "cores": 1, "mem_bytes": 1}], "links": {"shape": "full"}})
    assert len(topo) == 1 and topo.paths == {}
