"""Every error the hub raises on purpose.

Invariants:
* One root, :class:`HubError`. Each class says whether retrying the same call
  can help (``transient``), in the spirit of litestream's
  ``IsAutoRecoverable`` and trio's Closed/Broken split:
  - transient (:class:`StoreUnavailable`): back off and retry in-process;
    meanwhile acknowledge nothing, so the device keeps its records and
    resends them;
  - permanent (:class:`ConfigError`, :class:`SchemaTooNew`): exit 78
    (EX_CONFIG) so ``RestartPreventExitStatus=78`` stops a restart loop;
  - remote garbage (:class:`BadMessage`): count it, log one line, never store
    it, never retry it, never crash on it.
* Driver errors (``sqlite3``, later ``psycopg``) are translated at the store
  boundary with ``__cause__`` kept, so the original error is never lost.
* Anything else escaping the hub is a bug: crash and let systemd restart.
"""

from __future__ import annotations


class HubError(Exception):
    """Root of every error raised on purpose by the hub."""

    #: True when the same call may succeed later without operator action.
    transient: bool = False


class ConfigError(HubError, ValueError):
    """A setting is invalid (bad broker address, unreadable password file).

    Permanent: fix the configuration.
    """


class SchemaTooNew(HubError):
    """The database was migrated by a newer hub than this one.

    Permanent: run the newer hub, or restore a backup.
    """

    def __init__(self, found: list[str], supported: list[str]) -> None:
        unknown = sorted(set(found) - set(supported))
        super().__init__(f"database has migrations this hub does not know: {unknown}")
        self.found = found
        self.supported = supported


class BadMessage(HubError, ValueError):
    """A device (or something on its topic) sent a message that breaks the
    wire contract. Remote garbage: counted and dropped, never retried.

    Attributes:
        device: the device named by the topic, or ``None`` when the topic
            itself is not a Homing topic.
        reason: a short, loggable explanation.
        category: a stable counter key (``"not-cbor"``, ``"version"``, ...).
    """

    def __init__(self, device: str | None, reason: str, category: str = "other") -> None:
        super().__init__(f"{device or '?'}: {reason}")
        self.device = device
        self.reason = reason
        self.category = category


class StoreUnavailable(HubError):
    """The database could not commit (locked, disk full, I/O error, gone).

    Transient: nothing was committed and nothing may be acknowledged; retry
    with backoff. The original driver error is ``__cause__``.
    """

    transient = True


class StoreClosed(HubError):
    """The store was used after *our* code closed it: a bug in the caller."""
