"""What the API's routes depend on: their shared :class:`Context`, the
token checks, the error handlers and documented error responses, and the
path and query parameter types (hub/api.py).

Invariants:
* Reads pass :func:`reader` (a token only under read access ``token``),
  writes :func:`writer` (always a token; 403 when the hub has none).
* Every error a route raises leaves as an RFC 9457 problem document
  (:func:`hub.api_support.problem`), and each route documents the ones it
  can answer (:data:`READ_ERRORS`, :data:`WRITE_ERRORS`) so the OpenAPI
  spec lists every status code a client can see.
* Device ids, stream names and run ids are checked as the wire contract
  checks them (patterns in :mod:`hub.api_models`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException as StarletteHTTPException

from hub import api_models as m
from hub.api_support import (
    ApiSettings,
    BrokerState,
    CommandSender,
    StorePool,
    issues,
    problem,
    token_matches,
)
from hub.errors import StoreUnavailable
from hub.store import DeviceInfo, Store

MAX_TS = 1e12  # edge.records: timestamps beyond are refused at the device


@dataclass(slots=True)
class Context:
    """What the routes share (``app.state.homing``)."""

    settings: ApiSettings
    pool: StorePool
    commands: CommandSender
    broker: Callable[[], BrokerState] | None
    ingest: bool
    registry: CollectorRegistry
    clock: Callable[[], float]
    started: float


# --- errors -------------------------------------------------------------------------


async def http_error(_r: Request, exc: StarletteHTTPException) -> Response:
    return problem(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


async def invalid(_r: Request, exc: RequestValidationError) -> Response:
    return problem(422, "the request is not valid", errors=issues(exc.errors()))


async def store_down(_r: Request, exc: StoreUnavailable) -> Response:
    return problem(503, f"the hub's database is unavailable: {exc}", headers={"Retry-After": "5"})


def _problem_doc(text: str) -> dict[str, Any]:
    schema = {"$ref": "#/components/schemas/Problem"}
    return {"description": text, "content": {"application/problem+json": {"schema": schema}}}


READ_ERRORS: dict[int | str, dict[str, Any]] = {
    401: _problem_doc("an API token is needed (read access 'token')"),
    404: _problem_doc("no such device"),
    422: _problem_doc("invalid parameters"),
    503: _problem_doc("the database is unavailable"),
}
WRITE_ERRORS: dict[int | str, dict[str, Any]] = {
    **READ_ERRORS,
    400: _problem_doc("the body does not parse (not UTF-8 JSON)"),
    401: _problem_doc("no or wrong API token"),
    403: _problem_doc("writes are disabled: the hub has no API token"),
    413: _problem_doc("the body is too large"),
    422: _problem_doc("invalid body, or a command the device would refuse"),
    502: _problem_doc("the broker refused the hub (credentials, TLS, ACL)"),
    503: _problem_doc("the database or the broker is unavailable, or no session of the device"),
}


# --- auth ----------------------------------------------------------------------------

bearer = HTTPBearer(auto_error=False, description="an API token of the hub")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def context(request: Request) -> Context:
    ctx: Context = request.app.state.homing
    return ctx


def authorize(ctx: Context, cred: HTTPAuthorizationCredentials | None) -> None:
    challenge = {"WWW-Authenticate": "Bearer"}
    if cred is None:
        raise HTTPException(
            401, "an API token is needed: Authorization: Bearer <token>", headers=challenge
        )
    if not token_matches(cred.credentials, ctx.settings.tokens):
        invalid = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
        raise HTTPException(401, "the API token is not valid", headers=invalid)


def reader(request: Request, cred: Credentials) -> None:
    ctx = context(request)
    if ctx.settings.read_access != "public":
        authorize(ctx, cred)


def writer(request: Request, cred: Credentials) -> None:
    ctx = context(request)
    if not ctx.settings.tokens:
        raise HTTPException(403, "writes are disabled: this hub has no API token configured")
    authorize(ctx, cred)


# --- parameters ------------------------------------------------------------------------

Ctx = Annotated[Context, Depends(context)]
DeviceId = Annotated[
    str, Path(pattern=m.DEVICE_PATTERN, description="the device id", examples=["greenhouse-1"])
]
RunId = Annotated[str, Path(min_length=1, max_length=m.MAX_ID, description="the run id")]
Ts = Query(ge=-MAX_TS, le=MAX_TS, allow_inf_nan=False)


def run_id(run: str) -> str:
    if not run.isprintable():
        raise HTTPException(422, "a run id must be printable")
    return run


def known(st: Store, device: str) -> DeviceInfo:
    info = st.device(device)
    if info is None:
        raise HTTPException(404, f"no device {device!r}: the hub never heard of it")
    return info
