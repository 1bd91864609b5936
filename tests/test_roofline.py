"""The roofline compute model: exact, deterministic charges per block; device profiles as data."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from emulator.config.compute_model import (
    PROFILES_PATH,
    Roofline,
    load_profiles,
    model_for,
)
from emulator.config.run_config import load_run_config
from emulator.config.topology import Machine, topology_from_dict
from emulator.net.clock import VirtualClock
from tpicore.errors import TpiError
from tpicore.model.cost import Work, block_work
from tpicore.runtime.device import Device, ResidentSource
from tpicore.runtime.generate import generate
from tpicore.weights.store import TensorStore

PROMPT = [1, 17, 42, 99, 5]
ROOF = Roofline(mem_bandwidth_gbytes_s=4.0, peak_gflops=20.0)


def roofline_device(model_dir: str) -> tuple[Device, VirtualClock]:
    store = TensorStore.from_model_dir(model_dir)
    clock = VirtualClock(model=ROOF, cpu_time=lambda: 1e9)  # the host's CPU time must not matter
    return Device(store, ResidentSource(store), 32, clock=clock), clock


def test_roofline_charges_exactly_the_blocks_work(hf_models):
    model_dir, _ = hf_models("gqa")
    dev, clock = roofline_device(model_dir)
    cfg, lay, T = dev.cfg, dev.store.layout, len(PROMPT)
    expected = ROOF.seconds(0, block_work(cfg, lay, "pre", T, 0))
    for _ in range(cfg.num_hidden_layers):
        expected += ROOF.seconds(0, block_work(cfg, lay, "attn", T, T)) + ROOF.seconds(0, block_work(cfg, lay, "ffn", T, T))
    expected += ROOF.seconds(0, block_work(cfg, lay, "post", 1, 0))  # the head at the last position only
    dev.step(np.asarray(PROMPT), 0)
    assert clock.now() == pytest.approx(expected, rel=1e-12)
    assert clock.compute_s == pytest.approx(expected, rel=1e-12)
    dev.close()


def test_block_work_from_the_tensor_table(hf_models):
    model_dir, _ = hf_models("gqa")
    store = TensorStore.from_model_dir(model_dir)
    cfg, lay = store.cfg, store.layout
    D, F, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    ffn = block_work(cfg, lay, "ffn", 1, 1)
    assert ffn.flops == 2 * 3 * D * F + D  # gate, up, down GEMVs + the norm
    attn = block_work(cfg, lay, "attn", 2, 10)
    mats = D * q + 2 * D * kv + q * D
    assert attn.flops == 2 * 2 * mats + 2 * D + 4 * 2 * 10 * q
    assert attn.nbytes == 4 * (mats + D) + 2 * 4 * 2 * D + 4 * 2 * kv * (10 + 2)


def test_roofline_is_deterministic(hf_models):
    model_dir, _ = hf_models("gqa")
    runs = []
    for _ in range(2):
        dev, clock = roofline_device(model_dir)
        gen = generate(dev.step, PROMPT, 4, max_seq=32, now=clock.now, clock=clock)
        runs.append((gen.ttft_s, tuple(gen.token_latencies_s), clock.now()))
        dev.close()
    assert runs[0] == runs[1]
    assert runs[0][0] > 0


def test_roofline_is_the_slower_of_memory_and_arithmetic():
    assert ROOF.seconds(5.0, Work(flops=2e9, nbytes=1e9)) == pytest.approx(0.25)  # 1 GB at 4 GB/s
    assert ROOF.seconds(5.0, Work(flops=20e9, nbytes=1e9)) == pytest.approx(1.0)  # 20 GFLOP at 20 GFLOP/s
    assert model_for("free", 1.0, None, None).seconds(3.0, Work(1, 1)) == 0.0
    assert model_for("measured", 2.0, None, None).seconds(3.0, Work(1, 1)) == 1.5
    with pytest.raises(TpiError, match="mem_bandwidth_gbytes_s and peak_gflops"):
        model_for("roofline", 1.0, None, 10.0)


# ---------------------------------------------------------------------------------------------------
# Profiles


def test_profiles_cite_their_sources():
    profiles = load_profiles(PROFILES_PATH)
    assert {"pi4", "pi5", "orin_nano", "laptop_i5", "laptop_i7", "m1"} <= set(profiles)
    for name, p in profiles.items():
        assert p.sources and all(s.startswith("https://") for s in p.sources), name
        assert p.mem_bandwidth_gbytes_s > 0 and p.peak_gflops > 0 and p.disk_read_mbps > 0


def test_machine_takes_its_profile_and_overrides_it():
    pi5 = load_profiles(PROFILES_PATH)["pi5"]
    m = Machine(name="a", profile="pi5")
    assert (m.cores, m.mem_bytes, m.peak_gflops) == (pi5.cores, pi5.mem_bytes, pi5.peak_gflops)
    assert m.disk_read_mbps == pytest.approx(90 * 8) and m.disk_latency_ms == pi5.disk_latency_ms
    m = Machine(name="a", profile="pi5", cores=2, peak_gflops=10)
    assert (m.cores, m.peak_gflops, m.mem_bandwidth_gbytes_s) == (2, 10.0, pi5.mem_bandwidth_gbytes_s)
    topo = topology_from_dict({"devices": {"count": 2, "template": {"profile": "pi4", "speed": 2}},
                               "links": {"shape": "star"}}, "t.yaml")
    assert topo.devices[1].peak_gflops == load_profiles(PROFILES_PATH)["pi4"].peak_gflops


def test_unknown_profile_names_the_file_and_field():
    with pytest.raises(TpiError, match=r"^t\.yaml: devices\.template\.profile: unknown profile 'pi9'"):
        topology_from_dict({"devices": {"count": 2, "template": {"profile": "pi9"}}, "links": {"shape": "star"}},
                           "t.yaml")


def test_bad_profile_field_names_the_profiles_file_and_field(tmp_path):
    text = PROFILES_PATH.read_text().replace("peak_gflops: 153.6", "peak_gflops: -1", 1)
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(TpiError, match=r"bad\.yaml: pi5\.peak_gflops: must be > 0"):
        load_profiles(bad)
    bad.write_text("pi5:\n  description: x\n  colour: red\n")
    with pytest.raises(TpiError, match=r"bad\.yaml: pi5\.colour: unknown key"):
        load_profiles(bad)


def test_roofline_needs_the_devices_numbers():
    doc = {"topology": {"devices": {"count": 2, "template": {"cores": 1, "mem_bytes": "1GiB"}},
                        "links": {"shape": "star"}},
           "model": {"synth": "tiny"}, "options": {"compute": "roofline"}}
    with pytest.raises(TpiError, match=r"topology\.devices\[0\]\.mem_bandwidth_gbytes_s: missing"):
        load_run_config(None, doc=doc, source="r.yaml")
    doc["topology"]["devices"]["template"] = {"profile": "orin_nano"}
    assert load_run_config(None, doc=doc, source="r.yaml").options.compute == "roofline"
    doc["options"]["clock"] = "wall"
    with pytest.raises(TpiError, match=r"options\.compute: 'roofline' needs clock: virtual"):
        load_run_config(None, doc=doc, source="r.yaml")


def test_cli_bad_profile_is_one_error_line_exit_2(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("topology:\n  devices: {count: 2, template: {profile: pi9}}\n  links: {shape: star}\n"
                   "model: {synth: tiny}\noptions: {compute: roofline}\n")
    r = subprocess.run([sys.executable, "-m", "emulator", "run", str(cfg)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "r.yaml" in lines[0]
    assert "devices.template.profile: unknown profile 'pi9'" in lines[0]
