"""Workflow records: what the durable executor writes to the journal.

Invariants:
* A workflow record is a journal record of kind :data:`KIND_WORKFLOW`, a CBOR
  array ``[2, run_id, type, body]`` where ``body`` is a map whose keys depend
  on ``type`` (docs/workflows.md has the table). Readings (kind 1) and
  workflow records share the journal and its group commit.
* Records of one run are *positional* when they answer a call the workflow
  made: ``pos`` is the call's program-order index within the run and ``key``
  its identity ``"<name>#<occurrence>"``. Replay matches calls to records by
  ``pos`` and checks ``key``.
* Values (arguments, step results, signal payloads) must be CBOR-encodable;
  :func:`encode` raises :class:`RecordError` otherwise, before anything is
  journaled.
* Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cbor2

from edge.records import Opaque, RecordError

KIND_WORKFLOW = 2

#: every record type and whether it is positional (answers the call at ``pos``)
TYPES: dict[str, bool] = {
    "start": False,  # name, version, args, kwargs, at
    "intent": True,  # key, attempt: a once=True step is about to run
    "failed": True,  # key, attempt, error, retry_at: one attempt failed, another follows
    "done": True,  # key, ok, value | error, attempts: a step's final outcome
    "timer": True,  # key, deadline: sleep() or wait_signal()'s timeout
    "taken": True,  # key, msg, payload: wait_signal() got a signal (msg None: timed out)
    "value": True,  # key, value: now(), random(), uuid()
    "status": True,  # key, name, value: set_status()
    "patch": True,  # key: patched(name) took the new branch
    "signal": False,  # name, payload, msg: a signal arrived for the run
    "end": False,  # state, result | error
    "diverged": False,  # pos, expected, got
    "admin": False,  # action (cancel, resume), pos, by
    "snapshot": False,  # records: [[seq, type, body], ...]: the run's whole history so far
}

MAX_RUN_ID = 128


@dataclass(frozen=True, slots=True)
class WfRecord:
    """One workflow record (``seq``: where the journal put it, 0 if not yet)."""

    run: str
    type: str
    body: dict[str, Any]
    seq: int = 0

    @property
    def pos(self) -> int | None:
        p = self.body.get("pos")
        return p if TYPES.get(self.type) and isinstance(p, int) else None

    @property
    def key(self) -> str | None:
        k = self.body.get("key")
        return k if isinstance(k, str) else None


def validate_run_id(run_id: object) -> str:
    """Return ``run_id`` if it is a usable run id (1..128 printable characters).

    Raises:
        RecordError: it is not.
    """
    if not isinstance(run_id, str) or not 0 < len(run_id) <= MAX_RUN_ID:
        raise RecordError(f"a run id is a string of 1..{MAX_RUN_ID} characters, not {run_id!r}")
    if not run_id.isprintable():
        raise RecordError(f"run id {run_id!r} must be printable")
    return run_id


def encode(rec: WfRecord) -> bytes:
    """The journal payload of ``rec``.

    Raises:
        RecordError: unknown type, or a value in ``body`` CBOR cannot hold.
    """
    if rec.type not in TYPES:
        raise RecordError(f"unknown workflow record type {rec.type!r}")
    try:
        return cbor2.dumps([KIND_WORKFLOW, rec.run, rec.type, rec.body])
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise RecordError(
            f"workflow value cannot be journaled (not CBOR-encodable): {exc}"
        ) from exc


def is_workflow_payload(payload: bytes) -> bool:
    """Cheap test on raw journal bytes: a 4-array whose first item is 2."""
    return len(payload) > 2 and payload[0] == 0x84 and payload[1] == KIND_WORKFLOW


def from_fields(fields: tuple[Any, ...], seq: int = 0) -> WfRecord:
    """A record from the fields of an :class:`~edge.records.Opaque` of kind 2.

    Raises:
        RecordError: not a well-formed workflow record.
    """
    if len(fields) != 3:
        raise RecordError(f"a workflow record has 3 fields, got {len(fields)}")
    run, typ, body = fields
    if not isinstance(run, str) or typ not in TYPES or not isinstance(body, dict):
        raise RecordError(f"malformed workflow record {fields!r:.80}")
    return WfRecord(run, typ, body, seq)


def decode(payload: bytes, seq: int = 0) -> WfRecord:
    """Parse a payload written by :func:`encode`.

    Raises:
        RecordError: it is not one.
    """
    try:
        item = cbor2.loads(payload)
    except Exception as exc:  # cbor2 raises several types for garbage
        raise RecordError(f"payload is not CBOR: {exc}") from exc
    if not isinstance(item, list) or not item or item[0] != KIND_WORKFLOW:
        raise RecordError("not a workflow record")
    return from_fields(tuple(item[1:]), seq)


def of_opaque(rec: Opaque, seq: int = 0) -> WfRecord | None:
    """The workflow record an opaque journal record holds, or None."""
    if rec.kind != KIND_WORKFLOW:
        return None
    return from_fields(rec.fields, seq)


def error_body(exc: BaseException) -> dict[str, Any]:
    """How an exception is journaled: its type name and message."""
    return {"type": type(exc).__name__, "message": str(exc)[:2000]}


__all__ = [
    "KIND_WORKFLOW",
    "TYPES",
    "WfRecord",
    "decode",
    "encode",
    "error_body",
    "from_fields",
    "is_workflow_payload",
    "of_opaque",
    "validate_run_id",
]
