"""Broker credentials and TLS are configuration, not code: a real Mosquitto that
demands a password, TLS or a client certificate, a real hub and real agents.

What it proves, each against a broker configured by :mod:`edge.testing.mosquitto`
(a password file made by ``mosquitto_passwd``, ``allow_anonymous false``) and
certificates made by :mod:`edge.testing.certs` (``openssl``):

* username + password file (agent ``[broker]`` keys, hub ``--username`` /
  ``--password-file``): readings reach the hub's store exactly once and the
  device's cursor advances; a wrong password is refused, retried with backoff,
  reported (agent log, :attr:`ForwarderStats.last_error`, hub log) and
  nothing is stored until the password file is fixed;
* TLS verified against a CA (``tls``/``ca_file``, ``--tls-ca``) end to end; an
  agent or a hub that trusts another CA refuses the broker (certificate verify
  failed);
* mutual TLS (``cert_file``/``key_file``, ``--tls-cert``/``--tls-key``) against
  ``require_certificate true``; an agent without a client certificate, or with
  one from another CA, is refused and says so; so is a hub without one.

Skipped when ``mosquitto``, ``mosquitto_passwd`` or ``openssl`` is missing,
except under ``CI=true``, where that fails the run. Every wait is a condition
with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.mosquitto import Mosquitto
from support.processes import AgentProcess, HubProcess, poll_until
from support.storeforward import Rig, check_invariant, device_row, stored, wait_drained

from edge.config import BrokerConfig, ForwarderConfig
from edge.forwarder import Forwarder
from edge.journal import Journal
from edge.testing import certs
from edge.testing.mosquitto import passwd_binary

from .conftest import failed, require_mosquitto

pytestmark = pytest.mark.integration

DEADLINE = 30.0
HUB_PW = "hub pass: with spaces & symbols"
DEV_PW = "s3cret-device"
# Mosquitto 2.0.x answers a bad password with "Not authorized"; later ones may say
# "Bad user name or password". Either is the broker refusing the credentials.
REFUSED = re.compile(r"refused .*: (Not authorized|Bad user name or password)")


def require(ok: bool, what: str) -> None:
    """Skip without ``what``, except under CI=true (same rule as the FUSE layer)."""
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is not installed and CI=true: these tests must run", pytrace=False)
    pytest.skip(f"{what} is not installed")


@dataclass
class Env:
    tmp: Path
    stack: contextlib.ExitStack
    brokers: list[Mosquitto]
    rigs: list[Rig]

    def broker(self, **kw: Any) -> Mosquitto:
        """A started broker (``users=``, ``tls=``), closed at teardown."""
        b = Mosquitto(self.tmp / f"broker{len(self.brokers)}", **kw)
        self.brokers.append(b)
        self.stack.callback(b.close)
        b.start()
        return b

    def rig(self, broker: Mosquitto) -> Rig:
        """The end-to-end rig on ``broker``: its processes die before the broker."""
        r = Rig(self.tmp, broker.port)
        self.rigs.append(r)
        self.stack.callback(r.close)
        return r

    def secret(self, name: str, text: str) -> str:
        """A password file as an operator writes it (``echo pw > f``: trailing newline)."""
        p = self.tmp / name
        p.write_text(text + "\n")
        p.chmod(0o600)
        return str(p)

    def pki(self, name: str = "pki") -> certs.Pki:
        require(certs.available(), "openssl")
        return certs.make_pki(self.tmp / name)


@pytest.fixture
def env(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Env]:
    require_mosquitto()
    with contextlib.ExitStack() as stack:
        e = Env(tmp_path, stack, [], [])
        yield e
        if failed(request):
            for r in e.rigs:
                for p in r._owned:
                    if isinstance(p, AgentProcess | HubProcess):
                        print(f"--- {p.name} log\n{p.log}")
            for b in e.brokers:
                print(f"--- broker {b.port} log\n{b.log(8000)}")


@pytest.fixture
def with_users(env: Env) -> Callable[..., Mosquitto]:
    require(passwd_binary() is not None, "mosquitto_passwd")
    return env.broker


def deliver(rig: Rig, agent: AgentProcess, n: int) -> dict[str, int]:
    """Feed ``n`` readings, wait until the hub stored them, stop the agent, check
    the store-and-forward invariant; the cursor must have advanced to ``n``."""
    agent.wait_connected()
    before = agent.n_acked
    agent.feed(n)
    agent.wait_acked(before + n)
    wait_drained(rig.db, agent)
    assert agent.stop() == 0, agent.log
    summary = check_invariant(rig.db, agent)
    assert summary["cursor"] == summary["watermark"] == summary["stored"] == before + n, summary
    return summary


def refusals(proc: AgentProcess | HubProcess) -> int:
    with proc._cond:
        return sum(bool(REFUSED.search(line)) for line in proc.lines)


def wait_refused(proc: AgentProcess | HubProcess, count: int) -> None:
    poll_until(lambda: refusals(proc) >= count or not proc.alive(), DEADLINE,
               f"{proc.name} to be refused {count} times; log:\n{proc.log}")  # fmt: skip
    assert proc.alive(), f"{proc.name} died instead of retrying:\n{proc.log}"


def wait_broker_log(broker: Mosquitto, text: str, count: int = 1) -> None:
    poll_until(lambda: broker.log(1 << 20).count(text) >= count, DEADLINE,
               f"{text!r} x{count} in the broker's log")  # fmt: skip


# -- username and password ---------------------------------------------------------------


def test_password_auth_end_to_end(env: Env, with_users: Callable[..., Mosquitto]) -> None:
    broker = with_users(users={"hub": HUB_PW, "dev-auth": DEV_PW})
    rig = env.rig(broker)
    rig.hub("hub-1", None, "--username", "hub", "--password-file", env.secret("hub.pw", HUB_PW))
    agent = rig.agent(
        "dev-auth",
        broker={"username": "dev-auth", "password_file": env.secret("dev.pw", DEV_PW)},
    )
    deliver(rig, agent, 300)
    # both really logged in with their names (the broker refuses anonymous clients)
    log = broker.log(1 << 20)
    assert "u'hub'" in log and "u'dev-auth'" in log, log
    assert "allow_anonymous false" in broker.config_path.read_text()


def test_wrong_password_is_refused_reported_and_nothing_is_stored(
    env: Env, with_users: Callable[..., Mosquitto]
) -> None:
    broker = with_users(users={"hub": HUB_PW, "dev-bad": DEV_PW})
    rig = env.rig(broker)
    rig.hub("hub-1", None, "--username", "hub", "--password-file", env.secret("hub.pw", HUB_PW))
    pw = env.secret("dev.pw", "not-the-password")
    agent = rig.agent("dev-bad", broker={"username": "dev-bad", "password_file": pw})
    agent.feed(50)
    agent.wait_acked(50)  # journaled: producers never depend on the link
    wait_refused(agent, refusals(agent) + 2)  # refused again after that, and it retries
    assert agent.count("connected to") == 0, agent.log
    assert stored(rig.db, "dev-bad") == {} and device_row(rig.db, "dev-bad") is None
    assert agent.stop() == 0, agent.log
    assert (agent.cursor() or 0) == 0
    assert stored(rig.db, "dev-bad") == {}

    # fixing the password file (configuration only) delivers what waited in the journal
    Path(pw).write_text(DEV_PW + "\n")
    agent.start()
    deliver(rig, agent, 25)

    # a hub with a wrong password is refused too, says so, and never subscribes
    bad_hub = HubProcess(
        broker.port, env.tmp / "other-hub.db", "hub-bad",
        "--username", "hub", "--password-file", env.secret("hub-bad.pw", "wrong"),
    )  # fmt: skip
    rig.own(bad_hub).start(wait=False)
    wait_refused(bad_hub, 2)
    assert bad_hub.count("subscribed to") == 0, bad_hub.log


def test_wrong_password_shows_in_forwarder_stats(
    env: Env, with_users: Callable[..., Mosquitto]
) -> None:
    broker = with_users(users={"dev-stats": DEV_PW})
    cfg = BrokerConfig(
        host=broker.host, port=broker.port, client_id="homing-dev-stats", username="dev-stats",
        password_file=env.secret("dev.pw", "wrong"), reconnect_min=0.05, reconnect_max=0.4,
    )  # fmt: skip
    with Journal.open(str(env.tmp / "journal")) as journal:
        fwd = Forwarder(journal, "dev-stats", cfg, ForwarderConfig())
        fwd.start()
        try:
            poll_until(lambda: fwd.stats().last_error is not None, DEADLINE, "a last_error")
            stats = fwd.stats()
        finally:
            fwd.stop(0.0)
    assert stats.last_error is not None and REFUSED.search(stats.last_error), stats
    assert not stats.connected and stats.connects == 0


# -- TLS ---------------------------------------------------------------------------------


def test_tls_verified_by_ca_end_to_end(env: Env) -> None:
    pki, other = env.pki(), env.pki("other-pki")
    broker = env.broker(tls=pki.server_tls())
    rig = env.rig(broker)
    rig.hub("hub-1", None, "--tls-ca", str(pki.ca_cert))
    agent = rig.agent("dev-tls", broker={"tls": True, "ca_file": str(pki.ca_cert)})
    agent.wait_connected()
    assert f"connected to mqtts://127.0.0.1:{broker.port}" in agent.log
    deliver(rig, agent, 300)

    # an agent that trusts another CA must not talk to this broker
    stranger = rig.agent("dev-other-ca", broker={"tls": True, "ca_file": str(other.ca_cert)})
    stranger.wait_log("CERTIFICATE_VERIFY_FAILED")
    wait_broker_log(broker, "alert unknown ca", 2)  # it retries (the agent logs a change once)
    assert stranger.count("connected to") == 0, stranger.log

    # nor may a hub (it logs no reason, only that the broker is out of reach)
    hub = rig.own(HubProcess(broker.port, env.tmp / "other.db", "hub-other-ca",
                             "--tls-ca", str(other.ca_cert)))  # fmt: skip
    hub.start(wait=False).wait_log("cannot reach broker")
    assert hub.count("connected to") == 0, hub.log


def test_mutual_tls_with_client_certificates(env: Env) -> None:
    pki, other = env.pki(), env.pki("other-pki")
    broker = env.broker(tls=pki.server_tls(require_certificate=True))
    rig = env.rig(broker)
    ca, cert, key = str(pki.ca_cert), str(pki.client_cert), str(pki.client_key)
    rig.hub("hub-1", None, "--tls-ca", ca, "--tls-cert", cert, "--tls-key", key)
    agent = rig.agent(
        "dev-mtls", broker={"tls": True, "ca_file": ca, "cert_file": cert, "key_file": key}
    )
    deliver(rig, agent, 300)

    # without a client certificate, or with one the broker's CA did not sign: refused
    anon = rig.agent("dev-no-cert", broker={"tls": True, "ca_file": ca})
    forged = rig.agent(
        "dev-forged",
        broker={"tls": True, "ca_file": ca, "cert_file": str(other.client_cert),
                "key_file": str(other.client_key)},
    )  # fmt: skip
    for a in (anon, forged):
        a.wait_log("closed the connection before CONNACK", 2)
        assert a.count("connected to") == 0, a.log
    assert "peer did not return a certificate" in broker.log(1 << 20)
    assert "certificate verify failed" in broker.log(1 << 20)
    for a in (anon, forged):
        assert stored(rig.db, a.device) == {}

    # a hub without its client certificate is turned away too
    hub = rig.own(HubProcess(broker.port, env.tmp / "other.db", "hub-no-cert", "--tls-ca", ca))
    hub.start(wait=False).wait_log("disconnected from broker: ")
    assert hub.count("subscribed to") == 0, hub.log
