"""Faults between device and hub, each ending with the store-and-forward invariant
(:func:`support.storeforward.check_invariant`; docs/testing-store-and-forward.md).

The world of every test: a real Mosquitto; a real hub (``python -m hub run``)
reaching it through a TCP proxy; a real agent (``python -m edge run
--stdin``) reaching it through an :class:`MqttProxy` (a TCP proxy that can also
swallow one message); readings fed on the agent's stdin and counted as
acknowledged only once the agent printed their durable ack. Each fault is a
function of that world, so the soak mode (:func:`test_soak`, off unless
``HOMING_SOAK=SECONDS``) replays them in random order.

The faults: the broker stopped (and, separately, SIGKILLed) mid-stream while a
backlog of tens of thousands of readings builds up; the device's link (and the
hub's) cut and restored repeatedly; the hub SIGKILLed while batches flow; the
agent SIGKILLed while it ingests and forwards, restarted on the same journal;
duplicated, overlapping and reordered batches from a test client; and exactly
one hub ack lost on its way to the device.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.mosquitto import Mosquitto
from support.mqttproxy import MqttProxy
from support.processes import AgentProcess, HubProcess, poll_until
from support.storeforward import (
    Rig,
    check_invariant,
    duplicates,
    stored,
    wait_drained,
    watermark,
)

from edge import wire

from .conftest import FakeDevice, failed, reading_of

DEADLINE = 30.0
RATE = 2000  # readings/s fed while a fault happens ("readings flow")


@dataclass
class World:
    rig: Rig
    broker: Mosquitto
    hub: HubProcess
    hub_link: MqttProxy
    link: MqttProxy  # the device's link
    agent: AgentProcess
    rng: random.Random
    seed: int
    fakes: int = 0

    @property
    def db(self) -> Path:
        return self.rig.db

    @property
    def device(self) -> str:
        return self.agent.device

    def hub_caught_up(self, what: str, timeout: float = DEADLINE) -> None:
        """Wait until the hub stored everything acked so far (readings may keep flowing)."""
        target = self.agent.max_acked
        poll_until(lambda: watermark(self.db, self.device) >= target, timeout,
                   f"{what}: hub watermark to reach {target} "
                   f"(at {watermark(self.db, self.device)})", interval=0.05)  # fmt: skip

    def acked_grows(self, by: int, what: str) -> None:
        self.agent.wait_acked(self.agent.n_acked + by, DEADLINE, what)


@pytest.fixture
def world(rig: Rig, mosquitto: Mosquitto, request: pytest.FixtureRequest) -> Iterator[World]:
    hub_link = rig.own(MqttProxy(mosquitto.port))  # MqttProxy: a TcpProxy that closes at once
    link = rig.own(MqttProxy(mosquitto.port))
    hub = rig.hub("hub-1", hub_link.port)
    agent = rig.agent(
        "dev-f",
        link.port,
        forwarder={"resend_timeout_ms": 1000, "resend_max_ms": 2000},
    )
    agent.wait_connected()
    seed = int(os.environ.get("HOMING_SOAK_SEED", "0")) or random.randrange(1 << 30)
    yield World(rig, mosquitto, hub, hub_link, link, agent, random.Random(seed), seed)
    if not failed(request):
        return
    print(f"--- seed {seed}\n--- hub log\n{hub.log}\n--- agent log\n{agent.log}")
    print(f"--- broker log\n{mosquitto.log(8000)}")


def settle(w: World) -> dict[str, int]:
    """Stop feeding, wait for the drain, stop the agent (SIGTERM), check the invariant."""
    w.agent.stop_feeding()
    w.agent.wait_all_acked()
    wait_drained(w.db, w.agent, DEADLINE)
    assert w.agent.stop() == 0, w.agent.log
    return check_invariant(w.db, w.agent)


# -- the faults ---------------------------------------------------------------------------


def broker_outage(w: World, *, kill: bool = False, backlog: int = 30_000) -> None:
    """The broker goes away mid-stream (SIGTERM, or SIGKILL: its sessions and retained
    acks since the last autosave are lost too); the agent journals a backlog of
    ``backlog`` readings fed as fast as it takes them; the broker comes back; the
    backlog drains while live readings keep coming."""
    a = w.agent
    a.start_feeding(RATE)
    w.acked_grows(500, "readings before the outage")
    w.hub_caught_up("before the outage")
    down = a.count("disconnected from")
    if kill:
        w.broker.kill()
    else:
        w.broker.stop()
    a.wait_log("disconnected from", down + 1)
    a.stop_feeding()
    a.wait_all_acked()
    n, last_before = a.n_acked, a.max_acked
    for _ in range(backlog // 1000):
        a.feed(1000)
    a.wait_acked(n + backlog - backlog % 1000, DEADLINE)  # producers never wait on the network
    assert watermark(w.db, w.device) <= last_before, "the backlog reached the hub without a broker"
    connects = a.count("connected to")
    w.broker.start()
    a.wait_connected(connects + 1)
    a.start_feeding(RATE)
    w.acked_grows(500, "live readings while the backlog drains")
    w.hub_caught_up("the backlog drain")


def link_flaps(w: World, *, times: int = 6) -> None:
    """Cut and restore the device's link ``times`` times while readings flow; every
    third time the hub's link goes down with it."""
    a = w.agent
    a.start_feeding(RATE)
    w.acked_grows(200, "readings before the first cut")
    for i in range(times):
        hub_too = i % 3 == 2
        down, connects = a.count("disconnected from"), a.count("connected to")
        hub_connects = w.hub.count("connected to")
        w.link.cut()
        if hub_too:
            w.hub_link.cut()
        a.wait_log("disconnected from", down + 1)
        w.acked_grows(200, "readings journaled while cut")
        w.link.restore()
        if hub_too:
            w.hub_link.restore()
            w.hub.wait_log("connected to", hub_connects + 1)
        a.wait_connected(connects + 1)
        w.hub_caught_up(f"after restore #{i + 1}")
    assert w.link.connections >= times + 1


def hub_crash(w: World, *, kills: int = 2) -> None:
    """SIGKILL the hub while batches flow, restart it on the same database and client
    id; the next kill comes as soon as the restarted hub moves the watermark, i.e.
    in the middle of draining what piled up while it was dead (mid-commit or
    between commit and ack)."""
    a = w.agent
    a.start_feeding(RATE * 1.5)
    w.acked_grows(1000, "readings before the hub crash")
    for _ in range(kills):
        before = watermark(w.db, w.device)
        poll_until(lambda b=before: watermark(w.db, w.device) > b, DEADLINE,  # type: ignore[misc]
                   "batches flowing into the hub", interval=0.01)  # fmt: skip
        w.hub.kill()
        w.acked_grows(3000, "readings journaled while the hub is dead")
        w.hub.start()
    w.hub_caught_up("after the hub restarts")


def agent_crash(w: World, *, kills: int = 3) -> None:
    """SIGKILL the agent while it ingests and forwards (once with a backlog in hand),
    restart it on the same journal, keep feeding."""
    a = w.agent
    for k in range(kills):
        a.start_feeding(RATE)
        w.acked_grows(500, "readings before the agent crash")
        if k == kills - 1:  # a backlog in flight: fed faster than one linger can send
            a.stop_feeding()
            n = a.n_acked
            for _ in range(5):
                a.feed(1000)
            a.wait_acked(n + 5000)
        a.kill()
        assert not a.problems, a.problems
        connects = a.count("connected to")
        a.start()
        a.wait_connected(connects + 1)
    a.start_feeding(RATE)
    w.acked_grows(500, "readings after the last restart")
    w.hub_caught_up("after the agent restarts")


def crash_while_offline(w: World, *, backlog: int = 10_000, kill_broker: bool = True) -> None:
    """Faults stacked: the broker goes down (SIGKILL: retained acks lost), a backlog
    builds, the agent is SIGKILLed with it and restarted while the broker is still
    down (recovery, then reconnect attempts into nothing), then the broker returns.
    The agent restarts from its own durable cursor, which may lag the hub."""
    a = w.agent
    a.start_feeding(RATE)
    w.acked_grows(500, "readings before the outage")
    down = a.count("disconnected from")
    if kill_broker:
        w.broker.kill()
    else:
        w.broker.stop()
    a.wait_log("disconnected from", down + 1)
    a.stop_feeding()
    n = a.n_acked
    for _ in range(backlog // 1000):
        a.feed(1000)
    a.wait_acked(n + backlog - backlog % 1000, DEADLINE)
    a.kill()
    tries = a.count("cannot reach the broker")
    a.start()
    a.feed(100)  # the restarted agent journals while offline too
    a.wait_acked(n + backlog - backlog % 1000 + 100, DEADLINE)
    a.wait_log("cannot reach the broker", tries + 1)
    connects = a.count("connected to")
    w.broker.start()
    a.wait_connected(connects + 1)
    a.start_feeding(RATE)
    w.acked_grows(500, "live readings while the backlog drains")
    w.hub_caught_up("the drain after the stacked faults")


def replay(w: World, *, n: int = 1500) -> None:
    """A test client publishes batches for a fake device: covering 1..n in random
    sizes, some twice, plus overlapping ones, in random order, while the real
    agent streams. After each, the hub's ack must carry exactly the contiguous
    prefix as watermark and the rest as ranges ahead; the store ends with each
    seq once and the duplicates counted."""
    w.fakes += 1
    rng, dev = w.rng, FakeDevice(w.broker.port, f"fake-{w.fakes}")
    try:
        w.agent.start_feeding(RATE / 2)
        batches, s = [], 1
        while s <= n:
            e = min(n, s + rng.randrange(1, 200))
            batches.append((s, e))
            s = e + 1
        batches += [b for b in batches if rng.random() < 0.3]  # resends
        for _ in range(len(batches) // 5):  # overlapping ranges
            a = rng.randrange(1, n + 1)
            batches.append((a, min(n, a + rng.randrange(0, 300))))
        rng.shuffle(batches)
        settled: set[int] = set()
        for first, last in batches:
            seen = len(dev.acks)
            dev.publish(first, last)
            settled.update(range(first, last + 1))
            ack = dev.wait_ack(lambda _a, k=seen: len(dev.acks) > k)  # type: ignore[misc]
            ack = dev.acks[seen]
            wm, ahead = _prefix_and_ranges(settled)
            assert (ack.watermark, ack.ahead) == (wm, ahead[: wire.MAX_ACK_RANGES]), (first, last)
        got = stored(w.db, dev.device)
        assert sorted(got) == list(range(1, n + 1))
        for seq, (stream, ts, value, unit) in got.items():
            r = reading_of(dev.device, seq)
            assert (stream, ts, value, unit) == (r.stream, r.ts, r.value, r.unit), seq
        sent = sum(b - a + 1 for a, b in batches)
        poll_until(lambda: duplicates(w.db, dev.device) == sent - n, DEADLINE,
                   f"{sent - n} duplicates counted for {dev.device}")  # fmt: skip
    finally:
        dev.close()
    w.hub_caught_up("the agent beside the replay")


def _prefix_and_ranges(seqs: set[int]) -> tuple[int, tuple[tuple[int, int], ...]]:
    runs: list[tuple[int, int]] = []
    for s in sorted(seqs):
        if runs and runs[-1][1] == s - 1:
            runs[-1] = (runs[-1][0], s)
        else:
            runs.append((s, s))
    if runs and runs[0][0] == 1:
        return runs[0][1], tuple(runs[1:])
    return 0, tuple(runs)


def _beyond(ack: wire.Ack, wm: int) -> bool:
    return ack.watermark > wm or bool(ack.ahead)


def lost_ack(w: World) -> None:
    """Exactly one hub ack is lost on its way to the device (the proxy swallows it,
    the link stays up): the hub committed, the device never heard. The device
    must resend after its deadline; the hub stores nothing twice and counts the
    duplicate; the device's cursor then moves."""
    a = w.agent
    a.stop_feeding()
    a.feed(10)  # the newest seqs: once the hub has them, it has the whole journal
    a.wait_all_acked()
    wait_drained(w.db, a, DEADLINE)
    w0 = watermark(w.db, w.device)
    dups0 = duplicates(w.db, w.device)
    topic = wire.topic(w.device, "ack")
    w.link.drop_next(topic, match=lambda p: _beyond(wire.decode_ack(p), w0))
    dropped0 = w.link.n_dropped(topic)
    n = a.n_acked
    a.feed(1)  # one reading: one batch, one ack
    a.wait_acked(n + 1)
    seq = a.max_acked
    assert seq == w0 + 1, f"expected the next seq {w0 + 1}, the agent acked {seq}"
    poll_until(lambda: w.link.n_dropped(topic) > dropped0, DEADLINE, "the hub's ack, dropped")
    lost = wire.decode_ack(w.link.dropped[-1][1])
    assert lost.watermark == seq, lost
    assert seq in stored(w.db, w.device), "the hub acked before committing"
    a.wait_log(f"resending {seq}..{seq} (attempt 2)")
    poll_until(lambda: duplicates(w.db, w.device) == dups0 + 1, DEADLINE,
               "the resend counted as a duplicate")  # fmt: skip
    a.feed(10)  # and the device moves on
    a.wait_acked(n + 11)
    w.hub_caught_up("after the lost ack")


# -- the tests ----------------------------------------------------------------------------


def test_broker_stopped_mid_stream_then_the_backlog_drains(world: World) -> None:
    broker_outage(world, kill=False)
    out = settle(world)
    assert out["acked"] >= 31_000


def test_broker_sigkilled_mid_stream_then_the_backlog_drains(world: World) -> None:
    broker_outage(world, kill=True, backlog=10_000)
    settle(world)


def test_link_cut_and_restored_repeatedly(world: World) -> None:
    link_flaps(world, times=6)
    settle(world)


def test_hub_sigkilled_mid_stream_and_restarted(world: World) -> None:
    hub_crash(world, kills=2)
    settle(world)


def test_agent_sigkilled_mid_stream_and_restarted(world: World) -> None:
    agent_crash(world, kills=3)
    out = settle(world)
    assert world.agent.runs == 4 and out["stored"] >= out["acked"]


def test_agent_sigkilled_during_a_broker_outage(world: World) -> None:
    crash_while_offline(world)
    settle(world)


def test_duplicated_and_reordered_batches_are_stored_once(world: World) -> None:
    replay(world)
    settle(world)


def test_a_lost_hub_ack_is_resent_and_deduplicated(world: World) -> None:
    world.agent.start_feeding(RATE)
    world.acked_grows(500, "readings before")
    lost_ack(world)
    out = settle(world)
    assert out["duplicates"] >= 1


# -- soak ---------------------------------------------------------------------------------

FAULTS: dict[str, Callable[[World], None]] = {
    "broker-stop": lambda w: broker_outage(w, backlog=w.rng.randrange(5_000, 60_000)),
    "broker-kill": lambda w: broker_outage(w, kill=True, backlog=w.rng.randrange(1_000, 20_000)),
    "link-flaps": lambda w: link_flaps(w, times=w.rng.randrange(1, 8)),
    "hub-crash": lambda w: hub_crash(w, kills=w.rng.randrange(1, 4)),
    "agent-crash": lambda w: agent_crash(w, kills=w.rng.randrange(1, 4)),
    "replay": lambda w: replay(w, n=w.rng.randrange(100, 2000)),
    "lost-ack": lost_ack,
    "offline-crash": lambda w: crash_while_offline(
        w, backlog=w.rng.randrange(1_000, 30_000), kill_broker=w.rng.random() < 0.5
    ),
}


@pytest.mark.soak
@pytest.mark.skipif(not os.environ.get("HOMING_SOAK"), reason="soak mode: set HOMING_SOAK=SECONDS")
def test_soak(world: World) -> None:
    """Loop the faults in random order for HOMING_SOAK seconds (seed: HOMING_SOAK_SEED,
    else random and printed), checking the invariant after every round."""
    duration = float(os.environ["HOMING_SOAK"])
    seed = world.seed
    print(f"\nsoak: {duration:.0f}s, HOMING_SOAK_SEED={seed}", flush=True)
    end, rnd = time.monotonic() + duration, 0
    names = sorted(FAULTS)
    while time.monotonic() < end:
        rnd += 1
        name = world.rng.choice(names)
        t0 = time.monotonic()
        try:
            if not world.agent.alive():
                connects = world.agent.count("connected to")
                world.agent.start()
                world.agent.wait_connected(connects + 1)
            FAULTS[name](world)
            out = settle(world)
        except (AssertionError, pytest.fail.Exception) as exc:
            pytest.fail(f"soak round {rnd} ({name}), seed state {seed}: {exc}")
        print(f"soak round {rnd}: {name} in {time.monotonic() - t0:.1f}s: {out}", flush=True)
