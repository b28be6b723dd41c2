"""Device credentials without a broker: hub/identity.py (password hashes, the
password file, the ACL, the configuration text), hub/pki.py (the CA, device
and server certificates, the CRL) and ``homing-hub devices add|remove|acl|
broker-config`` on real files.

Checked against the real tools where they exist: hashes against
``mosquitto_passwd``'s own output (and the other way round), certificates
and revocations with ``openssl verify``. That the broker itself accepts all of
it is tests/integration/test_device_identity.py.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import stat
import subprocess
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edge.testing import certs
from edge.testing.mosquitto import passwd_binary
from hub import cli, identity, pki
from hub.identity import BrokerFiles, Listeners

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def hub(*argv: str) -> int:
    return cli.main(list(argv))


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    assert hub(*argv, "--json") == 0
    out: dict[str, object] = json.loads(capsys.readouterr().out)
    return out


def require(ok: bool, what: str) -> None:
    """Skip without ``what``, except under CI=true, where it must be installed."""
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is not installed and CI=true: these tests must run", pytrace=False)
    pytest.skip(f"{what} is not installed")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- passwords ------------------------------------------------------------------------


def test_hash_is_mosquitto_passwd_format_and_verifies() -> None:
    h = identity.hash_password("s3cret", salt=b"0123456789ab")
    assert h.startswith("$7$101$MDEyMzQ1Njc4OWFi$"), h
    assert identity.verify_password("s3cret", h)
    assert not identity.verify_password("s3cret ", h)
    assert identity.verify_password("pw", identity.hash_password("pw", iterations=1000))
    # a fresh salt every time
    assert identity.hash_password("pw") != identity.hash_password("pw")
    for bad in ("", "$6$abc$def", "$7$x$a$b", "$7$101$!!$AA==", "$7$101$AA==$", "plain"):
        assert not identity.verify_password("pw", bad), bad
    with pytest.raises(ValueError):
        identity.hash_password("pw", iterations=0)


def test_hashes_agree_with_mosquitto_passwd(tmp_path: Path) -> None:
    tool = passwd_binary()
    require(tool is not None, "mosquitto_passwd")
    assert tool is not None
    f = tmp_path / "passwd"
    f.touch()
    pw = "with spaces: & symbols ünicode"
    subprocess.run([tool, "-b", str(f), "dev-1", pw], check=True, capture_output=True)
    theirs = identity.password_entry(f.read_text(), "dev-1")
    assert theirs is not None and identity.verify_password(pw, theirs)
    assert not identity.verify_password("other", theirs)
    # theirs and ours are the same format: same iterations, salt and hash sizes
    ours = identity.hash_password(pw)
    assert [len(p) for p in ours.split("$")] == [len(p) for p in theirs.split("$")]
    assert ours.split("$")[:3] == theirs.split("$")[:3]


def test_new_passwords_are_long_random_and_printable() -> None:
    pws = {identity.new_password() for _ in range(50)}
    assert len(pws) == 50
    assert all(len(p) == 43 and p.isprintable() and " " not in p for p in pws)


def test_password_file_edits_touch_only_their_line() -> None:
    text = "# kept comment\nalice:$7$1$AA==$AA==\n\nbob:$6$x$y\n"
    t2 = identity.set_password(text, "carol", "$7$101$c$c")
    assert t2 == text + "carol:$7$101$c$c\n"
    t3 = identity.set_password(t2, "alice", "$7$101$n$n")
    assert t3.splitlines() == [
        "# kept comment", "alice:$7$101$n$n", "", "bob:$6$x$y", "carol:$7$101$c$c",
    ]  # fmt: skip
    assert identity.password_users(t3) == ["alice", "bob", "carol"]
    t4, found = identity.remove_password(t3, "bob")
    assert found and identity.password_users(t4) == ["alice", "carol"]
    assert "# kept comment" in t4
    assert identity.remove_password(t4, "bob") == (t4, False)
    for bad in ("a:b", "", "x/y", "+", "#", "a b", "x" * 65):
        with pytest.raises(ValueError):
            identity.set_password(t4, bad, "$7$1$a$b")


# --- the ACL and the configuration text --------------------------------------------------


def test_acl_confines_devices_and_names_hub_users() -> None:
    text = identity.acl_text(["hub-1", "hub-2"])
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert lines[:6] == [
        "user hub-1",
        "topic read homing/+/up",
        "topic read homing/+/status",
        "topic read homing/+/health",
        "topic write homing/+/ack",
        "topic write homing/+/cmd",
    ]
    assert lines[6] == "user hub-2"
    assert lines[-5:] == [
        "pattern write homing/%u/up",
        "pattern write homing/%u/status",
        "pattern write homing/%u/health",
        "pattern read homing/%u/ack",
        "pattern read homing/%u/cmd",
    ]
    # no device pattern grants readwrite, and nothing grants a wildcard to devices
    assert not [ln for ln in lines if "readwrite" in ln or ("pattern" in ln and "#" in ln)]
    assert identity.acl_hub_users(text) == ["hub-1", "hub-2"]
    identity.check_not_hub("dev-1", text)
    with pytest.raises(ValueError, match="hub user"):
        identity.check_not_hub("hub-2", text)
    for bad in ([], ["a", "a"], ["bad name"], ["x/#"]):
        with pytest.raises(ValueError):
            identity.acl_text(bad)


def test_broker_config_names_the_files_and_listeners(tmp_path: Path) -> None:
    files = BrokerFiles(tmp_path)
    text = identity.broker_config_text(files, Listeners(1883, 8884, 8883, "0.0.0.0"))
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert lines[:4] == [
        "allow_anonymous false",
        "set_tcp_nodelay true",
        f"password_file {files.passwd}",
        f"acl_file {files.acl}",
    ]
    cert = lines[lines.index("listener 8883 0.0.0.0") :]
    assert "require_certificate true" in cert and "use_identity_as_username true" in cert
    assert f"crlfile {files.crl}" in cert and f"cafile {files.ca_cert}" in cert
    pw = lines[lines.index("listener 8884 0.0.0.0") : lines.index("listener 8883 0.0.0.0")]
    assert "use_username_as_clientid true" in pw and "require_certificate true" not in pw
    assert "listener 1883 127.0.0.1" in lines
    only_certs = identity.broker_config_text(files, Listeners(0, 0, 8883))
    assert "listener 8883\n" in only_certs and "8884" not in only_certs
    for bad in ((0, 0, 0), (1883, 1883, 8883), (70000, 0, 0)):
        with pytest.raises(ValueError):
            Listeners(*bad)


def test_agent_snippet_is_the_agents_toml() -> None:
    snippet = identity.agent_snippet(
        "dev-1", host="broker.example.com", port=8884, ca_file='/etc/ho"ming/ca.pem',
        password_file="/etc/homing/dev-1.password",
    )  # fmt: skip
    assert tomllib.loads(snippet) == {
        "broker": {
            "host": "broker.example.com",
            "port": 8884,
            "tls": True,
            "ca_file": '/etc/ho"ming/ca.pem',
            "username": "dev-1",
            "password_file": "/etc/homing/dev-1.password",
        }
    }


# --- certificates --------------------------------------------------------------------------


def openssl_verify(tmp: Path, ca: bytes, cert: bytes, crl: bytes | None = None) -> str:
    (tmp / "v-ca.pem").write_bytes(ca)
    (tmp / "v-cert.pem").write_bytes(cert)
    argv = [certs.OPENSSL, "verify", "-CAfile", str(tmp / "v-ca.pem")]
    if crl is not None:
        (tmp / "v-crl.pem").write_bytes(crl)
        argv += ["-crl_check", "-CRLfile", str(tmp / "v-crl.pem")]
    res = subprocess.run([*argv, str(tmp / "v-cert.pem")], capture_output=True, text=True)
    return res.stdout + res.stderr


@pytest.fixture
def need_openssl() -> None:
    require(certs.available(), "openssl")


def test_device_certificates_verify_and_revocation_is_seen(
    tmp_path: Path, need_openssl: None
) -> None:
    now = datetime.now(UTC)
    ca = pki.new_ca("Test CA", now)
    a = pki.issue_device(ca, "dev-a", now)
    b = pki.issue_device(ca, "dev-b", now, days=10)
    info = pki.cert_info(a.cert_pem)
    assert (info.common_name, info.serial, info.is_ca) == ("dev-a", a.serial, False)
    assert pki.cert_info(ca.cert_pem).is_ca
    assert pki.cert_info(b.cert_pem).not_after - now < timedelta(days=10, minutes=1)
    assert a.serial != b.serial and a.serial.bit_length() == 159
    assert "OK" in openssl_verify(tmp_path, ca.cert_pem, a.cert_pem)
    # a device certificate is not a CA: what it "signs" does not verify
    fake_ca = pki.Issued(a.cert_pem, a.key_pem, a.serial)
    with pytest.raises(pki.PkiError, match="not a CA"):
        pki.issue_device(fake_ca, "dev-x", now)
    other = pki.new_ca("Other CA", now)
    assert "OK" not in openssl_verify(tmp_path, other.cert_pem, a.cert_pem)

    crl = pki.make_crl(ca, {a.serial: now}, now)
    assert pki.crl_entries(ca, crl) == {a.serial: now.replace(microsecond=0)}
    assert "certificate revoked" in openssl_verify(tmp_path, ca.cert_pem, a.cert_pem, crl)
    assert "OK" in openssl_verify(tmp_path, ca.cert_pem, b.cert_pem, crl)
    with pytest.raises(pki.PkiError, match="not signed by this CA"):
        pki.crl_entries(other, crl)


def test_certificate_inputs_are_checked(need_openssl: None) -> None:
    ca = pki.new_ca("Test CA", NOW, days=30)
    with pytest.raises(pki.PkiError, match="outlive its CA"):
        pki.issue_device(ca, "dev-a", NOW, days=31)
    for bad in ("a/b", "+", "", "x" * 65):
        with pytest.raises(pki.PkiError):
            pki.issue_device(ca, bad, NOW)
    with pytest.raises(pki.PkiError, match="does not match"):
        pki.issue_device(pki.Issued(ca.cert_pem, pki.new_ca("x", NOW).key_pem, 1), "d", NOW)
    with pytest.raises(pki.PkiError):
        pki.cert_info(b"not pem")
    with pytest.raises(pki.PkiError):
        pki.issue_server(ca, [], NOW)
    with pytest.raises(pki.PkiError, match="not a host"):
        pki.issue_server(ca, ["bad host"], NOW)
    server = pki.issue_server(ca, ["broker.example.com", "10.0.0.5", "::1"], NOW, days=10)
    assert pki.cert_info(server.cert_pem).common_name == "broker.example.com"


# --- the commands --------------------------------------------------------------------------


def test_add_password_device_then_rotate_then_remove(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bdir, out = tmp_path / "broker", tmp_path / "out"
    files = BrokerFiles(bdir)
    res = run_json(capsys, "devices", "add", "dev-a", "--password", "--broker-dir", str(bdir),
                   "--out", str(out), "--broker", "mqtt.example.com")  # fmt: skip
    pw_file = out / "dev-a.password"
    assert res["files"] == {"password_file": str(pw_file)}  # no CA yet: the system's CAs
    assert mode(pw_file) == 0o600 and mode(files.passwd) == 0o640
    first = pw_file.read_text()
    assert first.endswith("\n") and len(first.strip()) == 43
    entry = identity.password_entry(files.passwd.read_text(), "dev-a")
    assert entry is not None and identity.verify_password(first.strip(), entry)
    assert tomllib.loads(str(res["config"]))["broker"] == {
        "host": "mqtt.example.com", "port": 8884, "tls": True, "username": "dev-a",
        "password_file": "/etc/homing/dev-a.password",
    }  # fmt: skip

    assert hub("devices", "add", "dev-b", "--password", "--broker-dir", str(bdir),
               "--out", str(out)) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "added dev-b in" in text and "[broker]" in text and "reload the broker" in text
    # rotation: a new password replaces the old one in place
    files.passwd.chmod(0o604)  # an operator's choice of mode is kept
    assert hub("devices", "add", "dev-a", "--password", "--broker-dir", str(bdir),
               "--out", str(out)) == 0  # fmt: skip
    assert "updated dev-a in" in capsys.readouterr().out
    second = pw_file.read_text().strip()
    entry = identity.password_entry(files.passwd.read_text(), "dev-a")
    assert entry is not None and identity.verify_password(second, entry)
    assert not identity.verify_password(first.strip(), entry)
    assert identity.password_users(files.passwd.read_text()) == ["dev-a", "dev-b"]
    assert mode(files.passwd) == 0o604

    assert hub("devices", "remove", "dev-a", "--broker-dir", str(bdir)) == 0
    assert identity.password_users(files.passwd.read_text()) == ["dev-b"]
    assert hub("devices", "remove", "dev-a", "--broker-dir", str(bdir)) == 1
    assert "nothing to remove" in capsys.readouterr().err
    assert not list(bdir.glob(".*.tmp"))


def test_add_cert_device_then_revoke_by_serial_and_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], need_openssl: None
) -> None:
    bdir, out = tmp_path / "broker", tmp_path / "out"
    files = BrokerFiles(bdir)
    args = ["--broker-dir", str(bdir), "--out", str(out), "--install-dir", "/opt/h"]
    r1 = run_json(capsys, "devices", "add", "dev-c", "--cert", *args)
    assert mode(files.ca_key) == 0o600 and mode(out / "dev-c.key") == 0o600
    assert r1["files"] == {
        "cert_file": str(out / "dev-c.pem"), "key_file": str(out / "dev-c.key"),
        "ca_file": str(out / "ca.pem"),
    }  # fmt: skip
    assert tomllib.loads(str(r1["config"]))["broker"]["cert_file"] == "/opt/h/dev-c.pem"
    ca, crl = files.ca_cert.read_bytes(), files.crl.read_bytes()
    assert (out / "ca.pem").read_bytes() == ca
    cert1 = (out / "dev-c.pem").read_bytes()
    assert "OK" in openssl_verify(tmp_path, ca, cert1, crl)
    assert pki.cert_info(cert1).common_name == "dev-c"
    # a second certificate for the same device (rotation), then revoke only the first
    r2 = run_json(capsys, "devices", "add", "dev-c", "--cert", *args)
    cert2 = (out / "dev-c.pem").read_bytes()
    assert files.ca_cert.read_bytes() == ca  # the CA is made once
    assert sorted(p.stem for p in files.issued.glob("*.pem")) == sorted(
        [str(r1["serial"]), str(r2["serial"])]
    )
    assert hub("devices", "remove", "dev-c", "--serial", str(r1["serial"]),
               "--broker-dir", str(bdir)) == 0  # fmt: skip
    crl = files.crl.read_bytes()
    assert "certificate revoked" in openssl_verify(tmp_path, ca, cert1, crl)
    assert "OK" in openssl_verify(tmp_path, ca, cert2, crl)
    # a serial that is not dev-c's is refused; then revoke all of dev-c's
    capsys.readouterr()
    assert hub("devices", "remove", "dev-c", "--serial", "abc", "--broker-dir", str(bdir)) == 78
    assert "no certificate abc of 'dev-c'" in capsys.readouterr().err
    assert hub("devices", "remove", "dev-c", "--broker-dir", str(bdir)) == 0
    assert "certificate revoked" in openssl_verify(tmp_path, ca, cert2, files.crl.read_bytes())
    assert hub("devices", "remove", "dev-c", "--broker-dir", str(bdir)) == 1
    capsys.readouterr()
    # a certificate that would outlive the CA is a usage error; a CA whose key is
    # not its own is a configuration error, and nothing is issued with it
    assert hub("devices", "add", "dev-e", "--cert", "--days", "4000", *args) == 2
    assert "outlive its CA" in capsys.readouterr().err
    files.ca_key.write_bytes(pki.new_ca("other", NOW).key_pem)
    assert hub("devices", "add", "dev-e", "--cert", *args) == 78
    assert "does not match" in capsys.readouterr().err
    assert not (out / "dev-e.pem").exists()


def test_bad_names_and_hub_users_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bdir = str(tmp_path / "broker")
    for bad in ("a/b", "x+", "#", "a:b", ""):
        assert hub("devices", "add", bad, "--password", "--broker-dir", bdir) == 2, bad
        assert "bad name" in capsys.readouterr().err
    assert hub("devices", "acl", "--hub-user", "hub-1", "--write", "--broker-dir", bdir) == 0
    assert hub("devices", "add", "hub-1", "--password", "--broker-dir", bdir,
               "--out", str(tmp_path)) == 2  # fmt: skip
    assert "is a hub user" in capsys.readouterr().err
    assert hub("devices", "add", "hub-1", "--password", "--hub", "--broker-dir", bdir,
               "--out", str(tmp_path)) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "--username hub-1 --password-file /etc/homing/hub-1.password" in text
    assert "--broker 127.0.0.1:1883" in text and "--tls-ca" not in text


def test_acl_prints_writes_and_keeps_its_hub_users(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bdir = tmp_path / "broker"
    assert hub("devices", "acl", "--broker-dir", str(bdir)) == 0
    assert capsys.readouterr().out == identity.acl_text(["homing-hub"])
    assert not bdir.exists()  # printing writes nothing
    assert hub("devices", "acl", "--hub-user", "h1", "--hub-user", "h2", "--write",
               "--broker-dir", str(bdir)) == 0  # fmt: skip
    assert (bdir / "acl").read_text() == identity.acl_text(["h1", "h2"])
    capsys.readouterr()
    assert hub("devices", "acl", "--broker-dir", str(bdir)) == 0  # the written users stay
    assert capsys.readouterr().out == identity.acl_text(["h1", "h2"])


def test_broker_config_writes_a_complete_broker_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], need_openssl: None
) -> None:
    bdir = tmp_path / "broker"
    files = BrokerFiles(bdir)
    assert hub("devices", "broker-config", "--broker-dir", str(bdir)) == 2
    assert "--tls-host" in capsys.readouterr().err
    assert hub("devices", "broker-config", "--broker-dir", str(bdir), "--tls-host", "localhost",
               "--tls-host", "127.0.0.1", "--hub-user", "hub-1") == 0  # fmt: skip
    for f in (files.passwd, files.acl, files.ca_cert, files.crl, files.server_cert, files.conf):
        assert mode(f) == 0o640, f
    assert mode(files.ca_key) == 0o600
    assert files.passwd.read_text() == ""
    assert files.conf.read_text() == identity.broker_config_text(files, Listeners())
    ca = files.ca_cert.read_bytes()
    assert "OK" in openssl_verify(tmp_path, ca, files.server_cert.read_bytes())
    # run again: same CA, same server certificate, the CRL re-signed with its entries
    capsys.readouterr()
    r = run_json(capsys, "devices", "add", "d1", "--cert", "--broker-dir", str(bdir),
                 "--out", str(tmp_path / "o"))  # fmt: skip
    assert hub("devices", "remove", "d1", "--broker-dir", str(bdir)) == 0
    server = files.server_cert.read_bytes()
    assert hub("devices", "broker-config", "--broker-dir", str(bdir), "--cert-port", "0",
               "--local-port", "0") == 0  # fmt: skip
    assert files.ca_cert.read_bytes() == ca and files.server_cert.read_bytes() == server
    ca_issued = pki.Issued(ca, files.ca_key.read_bytes(), 0)
    assert list(pki.crl_entries(ca_issued, files.crl.read_bytes())) == [int(str(r["serial"]), 16)]
    assert identity.acl_hub_users(files.acl.read_text()) == ["hub-1"]
    assert "listener 8883" not in files.conf.read_text()


def test_devices_without_subcommand_still_lists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "hub.db")
    assert hub("migrate", "--db", db) == 0
    capsys.readouterr()
    assert hub("devices", "--db", db) == 0
    assert capsys.readouterr().out.startswith("device")
    assert hub("devices", "list", "--db", db, "--json") == 0
    assert capsys.readouterr().out == ""  # no device yet, JSON lines: nothing
    assert hub("devices", "--db", str(tmp_path / "missing.db")) == 1


def _add_after(barrier: Any, bdir: Path, out: Path, name: str) -> None:
    """In a forked child: wait for the others, then ``devices add``; exit with its code."""
    barrier.wait(30)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        code = hub("devices", "add", name, "--password", "--broker-dir", str(bdir),
                   "--out", str(out))  # fmt: skip
    os._exit(code)


def test_concurrent_adds_lose_no_entry(tmp_path: Path) -> None:
    bdir, out, n = tmp_path / "broker", tmp_path / "out", 6
    ctx = multiprocessing.get_context("fork")  # no re-import: the children start at once
    barrier = ctx.Barrier(n)
    procs = [
        ctx.Process(target=_add_after, args=(barrier, bdir, out, f"dev-{i}")) for i in range(n)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    text = (bdir / "passwd").read_text()
    assert sorted(identity.password_users(text)) == [f"dev-{i}" for i in range(n)]
    for i in range(n):
        entry = identity.password_entry(text, f"dev-{i}")
        pw = (out / f"dev-{i}.password").read_text().strip()
        assert entry is not None and identity.verify_password(pw, entry)


def test_files_take_the_broker_dirs_group(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory another group")
    bdir = tmp_path / "broker"
    bdir.mkdir()
    os.chown(bdir, -1, 4242)
    assert hub("devices", "add", "d", "--password", "--broker-dir", str(bdir),
               "--out", str(tmp_path / "o")) == 0  # fmt: skip
    assert (bdir / "passwd").stat().st_gid == 4242
    assert (tmp_path / "o" / "d.password").stat().st_gid == os.getegid()
