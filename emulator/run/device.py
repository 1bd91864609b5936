"""What runs inside each forked device process of an emulation run, from its gate to its exit.

    device_main(setup, rank, gate, events, log)      (forked by emulator/run/supervisor.py)
      | stdout/stderr -> its log file; dies with the supervisor; ignores Ctrl-C (the supervisor reaps it)
      | waits at its gate until the supervisor has its limits in place
      | CPU limits: wall clock: affinity to its share of the host's cores and as many BLAS threads;
      |             virtual clock: 1 BLAS thread (thread CPU time counts the calling thread only)
      | its place on the network (the kernel backend: its namespace), before any socket
      | DeviceEnv: its clock (WallClock, or VirtualClock with the compute model of options.compute:
      |            measured, free or roofline), its disk model (disk_read_mbps, disk_latency_ms), the
      |            network's link hook on that clock
      | rank 0: master_main -- the mode's driver (baselines.open_driver) runs the prompt set and writes
      |         JSON lines to the events pipe: ready, start, token, run (one per run), error, done; at a
      |         fault point of the run config (faults: run, at_token) it waits for the supervisor's byte on
      |         the ack pipe (the fault is then in place: the next step sees it)
      | rank > 0: tpicore's tensor-parallel worker (with failover: the model folder as its own copy when
      |           options.slices is local, its re-shards in its own cache), or a pipeline stage
      |           (baselines.pipeline_worker); a link_down fault holds its frames (LinkDown)
      v os._exit(0) done, 2 error (one `error:` line in its log)

Layer: run. Must not fork, apply memory limits or write results.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sys
import time
import traceback

from emulator.config.compute_model import model_for
from emulator.config.run_config import RunConfig
from emulator.host.limits import apply_cores
from emulator.net.clock import SPIN_S, VirtualClock, WallClock
from emulator.results.record import LinkCounters, RunMeasurement, TokenTimings
from emulator.run.baselines import (
    DeviceSetup,
    failover_on,
    open_driver,
    open_store,
    pipeline_worker,
)
from tpicore.comm.channel import LinkHook
from tpicore.dist.failover import Recovery
from tpicore.dist.tensor_parallel import run_worker, set_blas_threads
from tpicore.errors import TpiError
from tpicore.runtime.env import DeviceEnv, DiskModel
from tpicore.runtime.generate import Sampling, generate
from tpicore.tokenizer import Tokenizer


def device_threads(cfg: RunConfig, rank: int) -> int:
    """BLAS threads (and cores pinned, wall clock) of one device."""
    if cfg.options.clock == "virtual":
        return 1
    host = len(os.sched_getaffinity(0))
    return max(1, min(cfg.topology.devices[rank].cores, host // cfg.world_size))


def make_clock(cfg: RunConfig, rank: int) -> VirtualClock | WallClock:
    if cfg.options.clock == "virtual":
        d = cfg.topology.devices[rank]
        return VirtualClock(d.speed, model=model_for(cfg.options.compute, d.speed, d.mem_bandwidth_gbytes_s,
                                                     d.peak_gflops))
    # spinning before deadlines starves other devices when there are more devices than cores
    spin = SPIN_S if cfg.world_size <= len(os.sched_getaffinity(0)) else 0.0
    return WallClock(spin_s=spin)


FAULT_ACK_TIMEOUT_S = 30.0  # the master's wait for the supervisor to strike a fault


class LinkDown:
    """A device's link hook while a link_down fault may come: every frame it sends or receives waits
    until its links are up again (the supervisor sets `until[rank]`, a perf_counter time shared by the
    processes). A send held past the peer's timeout is the silence that declares the device lost."""

    def __init__(self, inner: LinkHook, until, rank: int) -> None:
        self.inner, self.until, self.rank = inner, until, rank

    def _hold(self) -> None:
        left = self.until[self.rank] - time.perf_counter()
        if left > 0:
            time.sleep(left)

    def now(self) -> float:
        return self.inner.now()

    def on_send(self, src_rank: int, dst_rank: int, nbytes: int) -> float:
        self._hold()
        return self.inner.on_send(src_rank, dst_rank, nbytes)

    def on_wait(self, src_rank: int, dst_rank: int) -> None:
        self.inner.on_wait(src_rank, dst_rank)

    def on_recv(self, src_rank: int, dst_rank: int, nbytes: int, t_send: float, t_deliver: float) -> None:
        self._hold()
        self.inner.on_recv(src_rank, dst_rank, nbytes, t_send, t_deliver)

    def stats(self) -> dict:
        return self.inner.stats()


def make_env(setup: DeviceSetup, rank: int) -> DeviceEnv:
    """Device `rank`'s emulated world: clock, disk, and links (jitter/loss drawn from the workload seed)."""
    cfg = setup.cfg
    clock = make_clock(cfg, rank)
    setup.network.enter(rank)
    shaper = setup.network.hook(rank, clock, seed=cfg.workload.seed)
    if any(f.device == rank and f.kind == "link_down" for f in cfg.faults):
        shaper = LinkDown(shaper, setup.link_down_until, rank)
    d = cfg.topology.devices[rank]
    return DeviceEnv(clock=clock, disk=DiskModel(read_mbps=d.disk_read_mbps, latency_ms=d.disk_latency_ms),
                     link_hook=shaper)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process if the supervisor dies (even by SIGKILL), so devices never linger."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def device_main(setup: DeviceSetup, rank: int, gate_r: int, events_w: int, log_path: str) -> None:
    """Entry of device process `rank` (forked). Never returns: os._exit with 0 (done) or 2 (error)."""
    code = 2
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor handles Ctrl-C and reaps us
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if rank != 0:
            setup.listener.close()
            os.close(events_w)
            if setup.faults_ack_r is not None:
                os.close(setup.faults_ack_r)
        if os.read(gate_r, 1) != b"g":  # the supervisor gave up before our limits were in place
            os._exit(0)
        os.close(gate_r)
        cfg = setup.cfg
        threads = device_threads(cfg, rank)
        if cfg.options.clock == "wall":
            apply_cores(threads, first=rank * threads)
        else:
            os.environ.update({"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
            set_blas_threads(1)
        env = make_env(setup, rank)
        if rank == 0:
            master_main(setup, env, events_w)
        elif cfg.options.mode == "pipeline":
            pipeline_worker(setup, rank, env)
        else:
            copy = setup.model_dir if failover_on(cfg) and cfg.options.slices == "local" else None
            if setup.slice_cache(rank) is not None:  # slices it shards or receives: its own cache (cold)
                os.environ["TPI_CACHE_DIR"] = setup.slice_cache(rank)
            run_worker(rank, setup.addr, setup.shard_dirs[rank], setup.secret, cfg.options.timeout_s, env=env,
                       model=copy)
        code = 0
    except TpiError as e:
        print(f"error: {setup.cfg.topology.devices[rank].name} (rank {rank}): {e}", file=sys.stderr)
    except BaseException:  # noqa: BLE001 - a device must never unwind into the supervisor's code
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def master_main(setup: DeviceSetup, env: DeviceEnv, events_w: int) -> None:
    """Rank 0: open the mode's driver, run every prompt of the workload, report each run on the pipe."""
    clock, shaper = env.clock, env.link_hook

    def emit(obj: dict) -> None:
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(events_w, data):]

    cfg = setup.cfg
    fault_points = {(f.run, f.at_token) for f in cfg.faults}

    def struck(run: int, token: int) -> list[dict]:
        """At a fault point: wait until the supervisor has struck (its byte on the ack pipe)."""
        if (run, token) not in fault_points:
            return []
        ready, _, _ = select.select([setup.faults_ack_r], [], [], FAULT_ACK_TIMEOUT_S)
        if not ready or os.read(setup.faults_ack_r, 1) != b"f":
            raise TpiError(f"the supervisor did not strike the fault at run {run}, token {token} within "
                           f"{FAULT_ACK_TIMEOUT_S:.0f} s")
        return [f.model_dump() for f in cfg.faults if (f.run, f.at_token) == (run, token)]

    try:
        store = open_store(setup.shard_dirs[0])
        store.check()
        prompts, max_seq = setup.prompts, setup.max_seq
        if cfg.workload.prompt is not None:
            ids = Tokenizer.from_dir(setup.shard_dirs[0]).encode(cfg.workload.prompt)
            prompts = [ids] * len(prompts)
            max_seq = len(ids) + cfg.workload.new_tokens
        driver = open_driver(setup, store, max_seq, env)
        before = driver.collect()  # every rank has answered once (its first report sets up what it needs)
        emit({"ev": "ready"})
        for i, ((length, rep), prompt) in enumerate(zip(cfg.workload.runs, prompts)):
            emit({"ev": "start", "run": i, "prompt_len": len(prompt)})
            faults = struck(i, 0)
            count, n_rec = [0], len(driver.recoveries)

            def on_token(tok: int, i: int = i) -> None:
                count[0] += 1
                emit({"ev": "token", "run": i})
                faults.extend(struck(i, count[0]))

            t0 = time.perf_counter()
            gen = generate(driver.step, prompt, cfg.workload.new_tokens, Sampling(), (), max_seq,
                           on_token=on_token, now=clock.now, clock=clock)
            wall_s = time.perf_counter() - t0
            after = driver.collect()
            timings = TokenTimings.of(gen.tokens, gen.ttft_s, gen.token_latencies_s)
            recs = driver.recoveries[n_rec:]
            if recs:  # new devices (reports counted from the recovery on) under new ranks
                shares = tuple(after)
            else:
                shares = tuple(a.since(b) for b, a in zip(before, after))  # this run's share of each rank's report
            devices_now = driver.rank_devices()
            measured = RunMeasurement(i, len(prompt), rep, timings, wall_s, LinkCounters(**shaper.stats()), shares,
                                      rank_devices=tuple(devices_now) if devices_now != list(range(cfg.world_size))
                                      else None, faults=tuple(faults),
                                      recoveries=tuple({**r.to_json(), "token": recovery_token(r, len(prompt))}
                                                       for r in recs))
            emit({"ev": "run", **measured.to_json()})
            before = after
        driver.close()
        emit({"ev": "done"})
    except TpiError as e:
        emit({"ev": "error", "message": str(e)})
        raise



def recovery_token(rec: Recovery, prompt_len: int) -> int:
    """The token (1 = the first) whose latency includes a recovery: the step that failed fed position
    `replayed_tokens` (0: the prompt's step, token 1; else token replayed_tokens - prompt_len + 1 is fed
    there, producing the next one)."""
    return 1 if rec.replayed_tokens == 0 else rec.replayed_tokens - prompt_len + 2
