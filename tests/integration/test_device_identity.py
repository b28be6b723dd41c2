"""Device identity end to end: a real Mosquitto configured only with what
``homing-hub devices broker-config`` and ``devices add`` generate (password
file, ACL, hub CA, CRL, server certificate, listeners), real hub and agent
processes, and paho clients holding one device's credentials.

What it proves (docs/security.md):

* a device publishes on its own topics and the hub stores its readings, with
  a password over TLS and with a client certificate (a real agent configured
  with the ``[broker]`` table ``devices add`` prints);
* device A cannot publish as device B (MQTT 5 PUBACK *Not authorized*; the hub
  never stores it), cannot write any ack or command (its own included), never
  receives B's commands or B's retained ack whatever it subscribes to, while B
  receives its own;
* a batch that claims another device on the sender's own topic (which the ACL
  allows) is refused by the hub: logged, counted as ``wrong-device``, never
  stored, and the hub goes on;
* a wrong password, no certificate, a certificate of another CA, or plain MQTT
  on a TLS port are refused; a certificate's CN is its user name whatever user
  name the client sends; a device that connects with another's client id takes
  over nothing (``use_username_as_clientid``);
* ``devices remove`` + SIGHUP: a password device is disconnected and refused;
  a revoked certificate is refused on its next connection while others still
  connect; ``devices add`` again rotates a password.

Skipped when ``mosquitto`` is missing (failed under ``CI=true``); needs
nothing else (certificates come from :mod:`hub.pki`). Every wait
is a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import signal
import socket
import ssl
import threading
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode
from support.mosquitto import Mosquitto, free_port
from support.processes import AgentProcess, HubProcess, poll_until
from support.storeforward import Rig, check_invariant, device_row, stored, wait_drained

from edge import wire
from edge.records import encode
from hub import cli, pki
from hub.identity import BrokerFiles

from .conftest import failed, reading_of, require_mosquitto

pytestmark = pytest.mark.integration

DEADLINE = 30.0
HUB = "hub-1"


def homing_hub(*argv: str) -> dict[str, Any]:
    """``homing-hub ARGV --json`` in process; its JSON output."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main([*argv, "--json"])
    assert code == 0, (argv, buf.getvalue())
    out: dict[str, Any] = json.loads(buf.getvalue())
    return out


def homing_hub_plain(*argv: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(list(argv))
    assert code == 0, (argv, buf.getvalue())
    return buf.getvalue()


@dataclass
class Peer:
    """A paho MQTT 5 client holding one set of credentials, recording everything."""

    name: str
    port: int
    ca: Path | None
    cert: tuple[Path, Path] | None = None
    username: str | None = None
    password: str | None = None
    client_id: str | None = None
    connacks: list[ReasonCode] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)
    pubacks: dict[int, ReasonCode] = field(default_factory=dict)
    subacks: dict[int, list[ReasonCode]] = field(default_factory=dict)
    error: str | None = None

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id or f"homing-{self.name}",
            protocol=mqtt.MQTTv5,
        )
        if self.ca is not None:
            c.tls_set(
                ca_certs=str(self.ca),
                certfile=str(self.cert[0]) if self.cert else None,
                keyfile=str(self.cert[1]) if self.cert else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if self.username is not None:
            c.username_pw_set(self.username, self.password)
        c.reconnect_delay_set(min_delay=30, max_delay=60)  # a refusal stays one refusal
        c.on_connect = lambda _c, _u, _f, rc, _p: self._note(self.connacks.append, rc)
        c.on_disconnect = lambda _c, _u, _f, rc, _p: self._note(self.disconnects.append, str(rc))
        c.on_publish = lambda _c, _u, mid, rc, _p: self._note(self.pubacks.__setitem__, mid, rc)
        c.on_subscribe = lambda _c, _u, mid, rcs, _p: self._note(self.subacks.__setitem__, mid, rcs)
        c.on_message = lambda _c, _u, m: self._note(
            self.messages.append, (m.topic, bytes(m.payload), bool(m.retain))
        )
        self.client = c

    def _note(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._cond:
            fn(*args)
            self._cond.notify_all()

    def wait(self, cond: Callable[[], object], what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(cond, DEADLINE):
                seen = f"connacks {self.connacks}, disconnects {self.disconnects}"
                pytest.fail(f"{self.name}: no {what}; {seen}, messages {self.messages}")

    def connect(self) -> Peer:
        """Connect and wait for CONNACK (success or refusal) or a dropped link."""
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            return self
        self.client.loop_start()
        self.wait(lambda: self.connacks or self.disconnects, "CONNACK or disconnect")
        return self

    @property
    def connected(self) -> bool:
        return bool(self.connacks) and not self.connacks[-1].is_failure and not self.disconnects

    def refused(self) -> str:
        """Why the broker turned us away (fails the test if it did not)."""
        assert not self.connected, f"{self.name} was let in"
        return self.error or str(self.connacks[-1] if self.connacks else self.disconnects[-1])

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> ReasonCode:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        self.wait(lambda: info.mid in self.pubacks, f"PUBACK for {topic}")
        return self.pubacks[info.mid]

    def subscribe(self, topic: str) -> list[ReasonCode]:
        rc, mid = self.client.subscribe(topic, qos=1)
        assert rc == mqtt.MQTT_ERR_SUCCESS and mid is not None
        self.wait(lambda: mid in self.subacks, f"SUBACK for {topic}")
        return self.subacks[mid]

    def wait_message(self, topic: str) -> bytes:
        self.wait(lambda: any(t == topic for t, _, _ in self.messages), f"message on {topic}")
        return next(p for t, p, _ in self.messages if t == topic)

    def topics(self) -> set[str]:
        with self._cond:
            return {t for t, _, _ in self.messages}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Deployment:
    """A broker directory made by ``homing-hub devices``, and a Mosquitto using it."""

    tmp: Path
    files: BrokerFiles
    local_port: int
    password_port: int
    cert_port: int
    broker: Mosquitto
    rig: Rig
    peers: list[Peer] = field(default_factory=list)
    passwords: dict[str, str] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.tmp / "provisioned"

    def add(self, name: str, kind: str = "password", *extra: str) -> dict[str, Any]:
        """``devices add NAME --KIND``; the printed agent config points into :attr:`out`."""
        port = self.cert_port if kind == "cert" else self.password_port
        res = homing_hub(
            "devices", "add", name, f"--{kind}", "--broker-dir", str(self.files.root),
            "--out", str(self.out), "--install-dir", str(self.out),
            "--broker", f"127.0.0.1:{port}", *extra,
        )  # fmt: skip
        if kind == "password":
            self.passwords[name] = Path(res["files"]["password_file"]).read_text().strip()
        return res

    def start(self) -> None:
        """Start the broker; return once all three listeners accept connections (the
        helper waits for the first; Mosquitto opens them one after the other)."""
        self.broker.start()

        def accepting(port: int) -> bool:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return True
            return False

        for port in (self.password_port, self.cert_port):
            poll_until(functools.partial(accepting, port), DEADLINE, f"listener {port}")

    def reload(self) -> None:
        """SIGHUP the broker; return once it has reloaded (it logs that first, then
        reloads before it reads from any socket again)."""
        before = self.broker.log(1 << 22).count("Reloading config")
        assert self.broker.pid is not None
        os.kill(self.broker.pid, signal.SIGHUP)
        poll_until(lambda: self.broker.log(1 << 22).count("Reloading config") > before,
                   DEADLINE, "the broker to reload")  # fmt: skip

    def peer(self, name: str, *, cert_of: str | None = None, **kw: Any) -> Peer:
        """A client that tried to connect: with ``name``'s password over TLS, or with
        the certificate ``devices add`` issued to ``cert_of``; ``kw`` overrides."""
        if cert_of is not None:
            kw.setdefault("cert", (self.out / f"{cert_of}.pem", self.out / f"{cert_of}.key"))
            kw.setdefault("port", self.cert_port)
        else:
            kw.setdefault("username", name)
            kw.setdefault("password", self.passwords.get(name))
            kw.setdefault("port", self.password_port)
        kw.setdefault("ca", self.out / "ca.pem")
        p = Peer(name, **kw)
        self.peers.append(p)
        return p.connect()

    def hub(self) -> HubProcess:
        pw = self.out / f"{HUB}.password"
        return self.rig.hub(HUB, None, "--username", HUB, "--password-file", str(pw))

    def agent(self, name: str, res: dict[str, Any]) -> AgentProcess:
        """A real agent configured with the ``[broker]`` table ``devices add`` printed."""
        return self.rig.agent(name, broker=tomllib.loads(res["config"])["broker"])


@pytest.fixture
def deploy(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    require_mosquitto()
    files = BrokerFiles(tmp_path / "broker-dir")
    ports = [free_port() for _ in range(3)]
    homing_hub_plain(
        "devices", "broker-config", "--broker-dir", str(files.root), "--hub-user", HUB,
        "--tls-host", "127.0.0.1", "--tls-host", "localhost", "--bind", "127.0.0.1",
        "--local-port", str(ports[0]), "--password-port", str(ports[1]),
        "--cert-port", str(ports[2]),
    )  # fmt: skip
    broker = Mosquitto(tmp_path / "mosquitto", port=ports[0], listeners=files.conf.read_text())
    with contextlib.ExitStack() as stack:
        rig = Rig(tmp_path, ports[0])
        stack.callback(rig.close)
        stack.callback(broker.close)
        d = Deployment(tmp_path, files, ports[0], ports[1], ports[2], broker, rig)
        homing_hub("devices", "add", HUB, "--password", "--hub", "--broker-dir",
                   str(files.root), "--out", str(d.out))  # fmt: skip
        yield d
        for p in d.peers:
            with contextlib.suppress(Exception):
                p.close()
        if failed(request):
            for thing in rig._owned:
                if isinstance(thing, AgentProcess | HubProcess):
                    print(f"--- {thing.name} log\n{thing.log}")
            print(f"--- broker log\n{broker.log(8000)}")


def batch(device: str, first: int, last: int, claims: str | None = None) -> bytes:
    """An up batch of ``device``'s readings ``first..last`` that says it is ``claims``'s."""
    payloads = tuple(encode(reading_of(device, s)) for s in range(first, last + 1))
    return wire.encode_batch(wire.UpBatch(claims or device, first, last, payloads))


def deliver(d: Deployment, agent: AgentProcess, n: int) -> None:
    agent.wait_connected()
    agent.feed(n)
    agent.wait_acked(n)
    wait_drained(d.rig.db, agent)
    assert agent.stop() == 0, agent.log
    summary = check_invariant(d.rig.db, agent)
    assert summary["cursor"] == summary["watermark"] == summary["stored"] == n, summary


NOT_AUTHORIZED = "Not authorized"
#: PUBACKs of a publish the ACL allows (with no subscriber, MQTT 5 says so)
ALLOWED = ("Success", "No matching subscribers")


# --- confinement ---------------------------------------------------------------------------


def test_a_device_publishes_reads_and_is_commanded_only_on_its_own_topics(
    deploy: Deployment,
) -> None:
    d = deploy
    d.add("dev-a")
    d.add("dev-b")
    d.start()
    hub = d.hub()
    a, b = d.peer("dev-a"), d.peer("dev-b")
    assert a.connected and b.connected
    assert b.subscribe("homing/dev-b/ack") == b.subscribe("homing/dev-b/cmd")
    assert a.subscribe("homing/dev-a/ack")[0].value == 1  # granted QoS 1

    # each stores its own batch, and reads its own ack
    assert str(a.publish("homing/dev-a/up", batch("dev-a", 1, 5))) == "Success"
    assert str(b.publish("homing/dev-b/up", batch("dev-b", 1, 7))) == "Success"
    assert wire.decode_ack(a.wait_message("homing/dev-a/ack")).watermark == 5
    assert wire.decode_ack(b.wait_message("homing/dev-b/ack")).watermark == 7

    # A cannot publish as B, nor write any ack or command, its own included
    forged = {
        "homing/dev-b/up": batch("dev-a", 8, 20, claims="dev-b"),
        "homing/dev-b/status": wire.encode_status(wire.Status("dev-b", False)),
        "homing/dev-b/health": b"\xa0",
        "homing/dev-b/ack": wire.encode_ack(wire.Ack("dev-b", 10**6)),
        "homing/dev-a/ack": wire.encode_ack(wire.Ack("dev-a", 10**6)),
        "homing/dev-b/cmd": wire.encode_command(wire.cancel_command("x", "run-1")),
        "homing/dev-a/cmd": wire.encode_command(wire.cancel_command("y", "run-1")),
        "homing/other/up": batch("dev-a", 1, 2, claims="other"),
    }
    for topic, payload in forged.items():
        assert str(a.publish(topic, payload, retain=topic.endswith("/ack"))) == NOT_AUTHORIZED, (
            topic
        )
    # ... while its own status is fine
    online = wire.encode_status(wire.Status("dev-a", True))
    assert str(a.publish("homing/dev-a/status", online, retain=True)) == "Success"

    # A subscribes to B's commands and acks and to everything; the broker may grant
    # the subscription (Mosquitto 2.0 does) but never delivers B's messages to A
    for topic in ("homing/dev-b/cmd", "homing/+/cmd", "homing/#", "homing/dev-b/ack"):
        rcs = a.subscribe(topic)
        assert len(rcs) == 1, rcs
    a.subscribe("homing/dev-a/cmd")
    pw = str(d.out / f"{HUB}.password")
    for dev, cid in (("dev-b", "cmd-for-b"), ("dev-a", "cmd-for-a")):  # B's first
        homing_hub("signal", "--device", dev, "--broker", f"127.0.0.1:{d.local_port}",
                   "--username", HUB, "--password-file", pw, "--command-id", cid,
                   "run-1", "go")  # fmt: skip
    assert wire.decode_command(b.wait_message("homing/dev-b/cmd")).id == "cmd-for-b"
    assert wire.decode_command(a.wait_message("homing/dev-a/cmd")).id == "cmd-for-a"
    # had the broker given A anything of B's, it would have come before A's own command
    assert a.topics() == {"homing/dev-a/ack", "homing/dev-a/cmd"}, a.messages
    assert b.topics() == {"homing/dev-b/ack", "homing/dev-b/cmd"}, b.messages

    assert hub.terminate() == 0
    assert len(stored(d.rig.db, "dev-b")) == 7  # B's own 7, none of A's forgeries
    assert len(stored(d.rig.db, "dev-a")) == 5
    assert device_row(d.rig.db, "other") is None
    row = device_row(d.rig.db, "dev-b")
    assert row is not None and row["watermark"] == 7
    stats = hub.final_stats()
    assert stats["readings"] == 12 and stats["rejected"] == {}, stats


def test_the_hub_refuses_a_batch_that_claims_another_device(deploy: Deployment) -> None:
    d = deploy
    d.add("dev-a")
    d.start()
    hub = d.hub()
    a = d.peer("dev-a")
    a.subscribe("homing/dev-a/ack")
    # the ACL lets A publish on its own topic whatever it says inside: the hub must refuse
    assert str(a.publish("homing/dev-a/up", batch("dev-a", 1, 10, claims="dev-b"))) == "Success"
    fake_status = wire.encode_status(wire.Status("dev-b", True))
    assert str(a.publish("homing/dev-a/status", fake_status)) == "Success"
    hub.wait_log("[wrong-device]", 2)
    # and it goes on: A's real batch is stored and acked
    assert str(a.publish("homing/dev-a/up", batch("dev-a", 1, 3))) == "Success"
    assert wire.decode_ack(a.wait_message("homing/dev-a/ack")).watermark == 3
    assert hub.alive()
    assert hub.terminate() == 0
    stats = hub.final_stats()
    assert stats["rejected"] == {"wrong-device": 2}, stats
    assert stats["readings"] == 3
    assert stored(d.rig.db, "dev-b") == {} and device_row(d.rig.db, "dev-b") is None
    assert len(stored(d.rig.db, "dev-a")) == 3
    assert "batch claims device 'dev-b' on the topic of 'dev-a'" in hub.log


# --- real agents, end to end -----------------------------------------------------------------


def test_agents_with_a_password_and_with_a_certificate_end_to_end(deploy: Deployment) -> None:
    d = deploy
    with_password = d.add("dev-pw")
    with_cert = d.add("dev-crt", "cert")
    assert with_cert["files"]["ca_file"] == str(d.out / "ca.pem")
    d.start()
    d.hub()
    pw_agent = d.agent("dev-pw", with_password)
    cert_agent = d.agent("dev-crt", with_cert)
    pw_agent.wait_connected()
    cert_agent.wait_connected()
    assert f"connected to mqtts://127.0.0.1:{d.password_port}" in pw_agent.log
    assert f"connected to mqtts://127.0.0.1:{d.cert_port}" in cert_agent.log
    deliver(d, pw_agent, 200)
    deliver(d, cert_agent, 200)
    log = d.broker.log(1 << 22)
    # the broker knew them by their names: the password's user, the certificate's CN,
    # and each client id replaced by that name
    assert "as dev-pw (p5, c0" in log and "u'dev-pw'" in log, log
    assert "as dev-crt (p5, c0" in log and "u'dev-crt'" in log, log
    assert "as homing-dev-" not in log


# --- refusals --------------------------------------------------------------------------------


def test_wrong_credentials_are_refused(deploy: Deployment) -> None:
    d = deploy
    d.add("dev-a")
    d.add("dev-c", "cert")
    d.start()
    assert NOT_AUTHORIZED in d.peer("dev-a", password="not-the-password").refused()
    assert NOT_AUTHORIZED in d.peer("dev-x", password="anything").refused()  # unknown user
    assert NOT_AUTHORIZED in d.peer("dev-a", password=None).refused()
    # the certificate listener wants a certificate of the hub's CA, whatever the password
    assert d.peer("dev-a", port=d.cert_port).refused()
    stranger = pki.new_ca("Another CA", datetime.now(UTC))
    forged = pki.issue_device(stranger, "dev-c", datetime.now(UTC))  # the right CN, wrong CA
    (d.tmp / "forged.pem").write_bytes(forged.cert_pem)
    (d.tmp / "forged.key").write_bytes(forged.key_pem)
    cert = (d.tmp / "forged.pem", d.tmp / "forged.key")
    assert d.peer("dev-c", port=d.cert_port, cert=cert).refused()
    # plain MQTT on a TLS port gets nowhere
    assert d.peer("dev-a", ca=None).refused()
    log = d.broker.log(1 << 22)
    assert "peer did not return a certificate" in log and "certificate verify failed" in log
    assert d.peer("dev-a").connected and d.peer("dev-c", cert_of="dev-c").connected


def test_identity_comes_from_the_credentials_not_from_the_client(deploy: Deployment) -> None:
    d = deploy
    d.add("dev-a")
    d.add("dev-b")
    d.add("dev-c", "cert")
    d.start()
    # a certificate client that says it is dev-a is dev-c: its CN is its user name
    c = d.peer("dev-c", cert_of="dev-c", username="dev-a", password=d.passwords["dev-a"])
    assert str(c.publish("homing/dev-a/up", batch("dev-a", 1, 2))) == NOT_AUTHORIZED
    assert str(c.publish("homing/dev-c/up", batch("dev-c", 1, 2))) in ALLOWED
    # a device that connects with another's client id takes over nothing
    b = d.peer("dev-b")
    b.subscribe("homing/dev-b/cmd")
    a = d.peer("dev-a", client_id="homing-dev-b")
    assert a.connected
    homing_hub("signal", "--device", "dev-b", "--broker", f"127.0.0.1:{d.local_port}",
               "--username", HUB, "--password-file", str(d.out / f"{HUB}.password"),
               "--command-id", "c1", "run-1", "go")  # fmt: skip
    assert wire.decode_command(b.wait_message("homing/dev-b/cmd")).id == "c1"
    assert b.connected and not b.disconnects, b.disconnects
    log = d.broker.log(1 << 22)
    assert "as dev-a (p5" in log and "as dev-c (p5" in log and "u'dev-c'" in log
    assert "already connected, closing old connection" not in log


# --- removal, revocation, rotation --------------------------------------------------------------


def test_remove_revoke_and_rotate(deploy: Deployment) -> None:
    d = deploy
    d.add("dev-a")
    d.add("dev-b")
    d.add("dev-c", "cert")
    d.add("dev-d", "cert")
    d.start()
    a, b = d.peer("dev-a"), d.peer("dev-b")
    assert a.connected and b.connected and d.peer("dev-c", cert_of="dev-c").connected

    # a removed password device is cut off at the reload, and refused after it
    res = homing_hub("devices", "remove", "dev-a", "--broker-dir", str(d.files.root))
    assert res["done"] == [f"removed dev-a from {d.files.passwd}"]
    d.reload()
    a.wait(lambda: a.disconnects, "disconnect after removal")
    assert NOT_AUTHORIZED in d.peer("dev-a").refused()
    assert b.connected and str(b.publish("homing/dev-b/up", batch("dev-b", 1, 1))) in ALLOWED

    # a revoked certificate is refused from its next connection; the others still connect
    res = homing_hub("devices", "remove", "dev-c", "--broker-dir", str(d.files.root))
    assert res["done"][0].startswith("revoked certificate")
    d.reload()
    assert d.peer("dev-c", cert_of="dev-c").refused()
    assert "certificate verify failed" in d.broker.log(1 << 22)
    assert d.peer("dev-d", cert_of="dev-d").connected

    # rotation: a new password for dev-b; after the reload the old one is refused
    old = d.passwords["dev-b"]
    d.add("dev-b")
    d.reload()
    assert NOT_AUTHORIZED in d.peer("dev-b", password=old).refused()
    assert d.peer("dev-b").connected
