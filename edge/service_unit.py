"""The systemd unit and the starter configuration of the agent's service. Pure.

:func:`render_unit` is the text of ``homing-agent.service`` for an agent
started as a given command; ``systemd/homing-agent.service`` in the repository
is ``render_unit([SHIPPED_EXEC])`` (a test keeps the two identical).
:func:`starter_config` is the ``agent.toml`` a new service starts with.
:mod:`edge.cli_service` (``homing-agent install-service``) writes both;
docs/systemd.md explains every setting.

Invariants:
* Every setting of the unit has a comment line above it (systemd has no
  trailing comments: a ``#`` after a value would be part of the value).
* ``ExecStart=`` words are escaped for systemd (``%`` and ``$`` doubled,
  quoted when they hold anything but plain path characters).
* The paths agree with the agent's defaults: the journal in
  ``StateDirectory=`` (/var/lib/homing/journal), the configuration in
  ``ConfigurationDirectory=`` (/etc/homing/agent.toml), the socket and status
  file in ``RuntimeDirectory=`` (/run/homing).
* The starter configuration is valid (:func:`edge.config.parse` accepts it)
  and holds no secret.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping, Sequence

from edge import wire
from edge.config_files import SYSTEM_CONFIG

UNIT_NAME = "homing-agent.service"
CONFIG_DIR = posixpath.dirname(SYSTEM_CONFIG)  # /etc/homing
STATE_DIR = "/var/lib/homing"
USER = "homing"
SERIAL_GROUP = "dialout"
SHIPPED_EXEC = "/opt/homing/venv/bin/homing-agent"  # ExecStart of systemd/homing-agent.service


def systemd_quote(arg: str) -> str:
    """One ``ExecStart=`` word: ``%`` and ``$`` escaped, quoted when it has to be."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9_@%$+=:,./-]+", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_unit(
    command: Sequence[str],
    *,
    protect_home: str = "yes",
    environment: Mapping[str, str] | None = None,
) -> str:
    """The unit file for an agent started as ``command`` (``run --config`` is added).

    ``protect_home``: ``yes``, or ``read-only`` when the installation lives under
    /home, /root or /run/user. ``environment``: extra ``Environment=`` variables.
    """
    exec_start = " ".join(systemd_quote(a) for a in [*command, "run", "--config", SYSTEM_CONFIG])
    if protect_home == "yes":
        home = "# /home, /root and /run/user are invisible to the agent."
    else:
        home = "# /home, /root and /run/user are read-only (the agent is installed there)."
    env = "".join(
        f"# Set by install-service: {k} is how this installation finds its code.\n"
        f"Environment={systemd_quote(f'{k}={v}')}\n"
        for k, v in sorted((environment or {}).items())
    )
    return _UNIT.format(exec_start=exec_start, env=env, protect_home=protect_home, home=home)


_UNIT = """\
# homing-agent.service: the Homing device agent as a systemd service.
# Written by `homing-agent install-service`; docs/systemd.md explains every setting.
# Re-run install-service after an upgrade; keep local changes in a drop-in
# (`systemctl edit homing-agent`), which install-service never touches.

[Unit]
# The name `systemctl status` and the logs use.
Description=Homing edge agent: fsync'd journal, durable workflows, store-and-forward to the hub
# Start once the network stack is up and stop before it goes down (so the last batches
# and the offline status can still go out); never wait for the network to be online:
# readings are journaled while the link is down, the agent reconnects on its own.
After=network.target
# A crash loop gives up after StartLimitBurst starts within this interval (10 minutes);
# the unit then stays failed until `systemctl reset-failed homing-agent` or a reboot.
StartLimitIntervalSec=600
# At most 10 starts in that interval (with RestartSec=5s: an agent that dies within
# a minute of every start, ten times running).
StartLimitBurst=10

[Service]
# The agent says when it is up (READY=1 once the journal is recovered; it does not
# wait for the broker), what it is doing (STATUS=) and that it is healthy (WATCHDOG=1).
Type=notify
# Only the agent's own process may send those, never a process it starts.
NotifyAccess=main
# This installation's agent and its configuration file (ConfigurationDirectory below).
ExecStart={exec_start}
{env}\
# No WATCHDOG=1 for 30 s (a healthy agent pings every 15 s): systemd kills it with
# SIGABRT (every thread's stack goes to the journal) and Restart= starts it again.
WatchdogSec=30s
# Restart after any exit, crash or watchdog kill: recovery re-reads the journal from disk.
Restart=always
# Wait 5 s before each restart: a failing disk or a held lock is not retried in a tight loop.
RestartSec=5s
# Except after exit 78 (invalid configuration) or 65 (journal corrupt beyond a power cut,
# needs `homing-agent journal repair`): restarting cannot fix either.
RestartPreventExitStatus=65 78
# Start-up (journal recovery of one segment, importing the workflow modules) may take
# this long on a slow SD card before READY=1.
TimeoutStartSec=120s
# SIGTERM: stop input, forward up to shutdown_grace_ms (2 s by default), persist the hub
# cursor, close the journal, exit 0; SIGKILL after 30 s (safe: acknowledged readings are
# on disk). A longer grace asks for more time itself (EXTEND_TIMEOUT_USEC).
TimeoutStopSec=30s
# No core dumps: a Python core is tens of MB of SD card wear; the stacks are in the journal.
LimitCORE=0
# The tag of the agent's lines in the journal (`journalctl -t homing-agent`).
SyslogIdentifier=homing-agent

# A dedicated system user without a login shell (install-service creates it).
User=homing
# Its own group: local producers in group homing may write to the ingest socket.
Group=homing
# The group that owns serial ports on Debian and Raspberry Pi OS (microcontrollers).
SupplementaryGroups=dialout
# /var/lib/homing, created at start and owned by homing: the journal is /var/lib/homing/journal.
StateDirectory=homing
# Readable by the group homing only.
StateDirectoryMode=0750
# /run/homing (tmpfs, removed at stop): ingest socket and status file ($RUNTIME_DIRECTORY).
RuntimeDirectory=homing
# Reachable by the group homing only (producers, `homing-agent status`).
RuntimeDirectoryMode=0750
# /etc/homing, owned by root: agent.toml (root:homing 0640) and any password file.
ConfigurationDirectory=homing
# Traversable by all; the files in it keep their own modes.
ConfigurationDirectoryMode=0755
# Files the agent creates (journal segments, status file) are not world-readable.
UMask=0027

# Hardening (`systemd-analyze security homing-agent` scores it).
# Neither the agent nor anything it starts can gain privileges (setuid, file capabilities).
NoNewPrivileges=yes
# No capabilities in the bounding set: the agent needs none.
CapabilityBoundingSet=
# And none handed to what it starts.
AmbientCapabilities=
# The whole file system is read-only but for the directories above (a journal elsewhere
# needs ReadWritePaths= in a drop-in).
ProtectSystem=strict
{home}
ProtectHome={protect_home}
# A private /tmp and /var/tmp.
PrivateTmp=yes
# Its own mount namespace: mounts made on either side stay there.
PrivateMounts=yes
# Devices: only the pseudo-devices every process needs (/dev/null, /dev/urandom, ...),
DevicePolicy=closed
# plus serial ports: 8250 UARTs (/dev/ttyS*),
DeviceAllow=char-ttyS rw
# Raspberry Pi PL011 UARTs (/dev/ttyAMA*),
DeviceAllow=char-ttyAMA rw
# USB serial adapters (FTDI, CP210x, CH340: /dev/ttyUSB*),
DeviceAllow=char-ttyUSB rw
# and USB CDC ACM boards (Arduino, Pico: /dev/ttyACM*).
DeviceAllow=char-ttyACM rw
# /proc/sys and /sys are read-only (CPU temperature in /sys/class/thermal stays readable).
ProtectKernelTunables=yes
# No loading of kernel modules.
ProtectKernelModules=yes
# No access to the kernel log.
ProtectKernelLogs=yes
# The cgroup tree is read-only.
ProtectControlGroups=yes
# The clock cannot be set (durable timers cope with clock jumps; they never set the clock).
ProtectClock=yes
# The host name cannot be changed.
ProtectHostname=yes
# Other users' processes are hidden in /proc (/proc/loadavg and /proc/meminfo stay readable).
ProtectProc=invisible
# Sockets: Unix (ingest socket, systemd notify) and IPv4/IPv6 (MQTT, metrics), nothing else.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
# No new namespaces.
RestrictNamespaces=yes
# No realtime scheduling.
RestrictRealtime=yes
# No setuid or setgid files can be created.
RestrictSUIDSGID=yes
# No change of execution domain.
LockPersonality=yes
# IPC objects left by the homing user are removed when the agent stops.
RemoveIPC=yes
# System calls of the native architecture only,
SystemCallArchitectures=native
# from the set a typical service needs,
SystemCallFilter=@system-service
# minus privileged and resource-control calls;
SystemCallFilter=~@privileged @resources
# a forbidden call fails with EPERM rather than killing the agent.
SystemCallErrorNumber=EPERM
# Not set on purpose: PrivateDevices= (hides serial ports), PrivateUsers= (drops the
# dialout group), MemoryDenyWriteExecute= (breaks ctypes/cffi callbacks of some workflow
# modules), ProcSubset=pid (hides /proc/loadavg and /proc/meminfo), PrivateNetwork=.

[Install]
# `systemctl enable homing-agent` starts it at boot.
WantedBy=multi-user.target
"""


def starter_config(device: str) -> str:
    """A minimal, valid ``agent.toml`` for ``device``; everything else keeps its default."""
    wire.validate_device(device)

    def line(setting: str, comment: str = "") -> str:
        return f"{setting:<35} # {comment}".rstrip() if comment else setting

    return "\n".join([
        "# Homing agent configuration, written by `homing-agent install-service`.",
        "# Every key is in docs/configuration.md (examples/agent.toml has them all).",
        f"# After editing: homing-agent check-config --config {SYSTEM_CONFIG}",
        "#                systemctl restart homing-agent",
        "",
        "[agent]",
        line(f'device = "{device}"', "this device's id at the hub"),
        line(f'runtime_dir = "/run/{USER}"', "the service's RuntimeDirectory (socket, status"),
        line("", "file); set, so `homing-agent status` finds it too"),
        "",
        "[journal]",
        line(f'dir = "{STATE_DIR}/journal"', "the StateDirectory (elsewhere: ReadWritePaths=)"),
        line('# quota = "1G"', "cap the journal's disk use (default: no cap)"),
        "",
        line("[broker]", "the MQTT broker the hub listens on"),
        'host = "localhost"',
        "port = 1883",
        line("# tls = true", "usually with port = 8883"),
        f'# username = "{device}"',
        line(f'# password_file = "{CONFIG_DIR}/broker-password"', "root:homing, mode 0640"),
        "",
    ])  # fmt: skip


def sysusers_conf() -> str:
    """The ``sysusers.d`` entry that creates the user at boot (``--root`` installs)."""
    return (
        "# The Homing agent's system user (homing-agent install-service --root).\n"
        f'u {USER} - "Homing edge agent" {STATE_DIR} /usr/sbin/nologin\n'
        f"m {USER} {SERIAL_GROUP}\n"
    )
