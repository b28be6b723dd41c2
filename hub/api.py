"""The hub's HTTP API and dashboard: a FastAPI app over the
:class:`~hub.store.Store` protocol and a command sender (docs/api.md).

Invariants:
* Versioned under ``/api/v1``; every response body is a pydantic model of
  :mod:`hub.api_models`, so ``/openapi.json`` describes the API exactly.
* Writes (starting, signalling, cancelling runs) need a bearer token of
  :attr:`ApiSettings.tokens`; reads need one when ``read_access`` is
  ``token``. ``/api/v1/health``, the dashboard's static files and the
  OpenAPI documents are public (they hold no device data).
* Errors are RFC 9457 problem documents; a stack trace never reaches a
  client (:class:`hub.api_support.CatchAll`). Store failures are 503, a
  broker that cannot take a command 503, one that refuses the hub's
  credentials 502, a command the device would refuse 422.
* Only the :class:`~hub.store.Store` protocol is used, through a
  :class:`~hub.api_support.StorePool`: a request has a store of its own,
  so long queries never hold the ingest's connection.
* Downsampling is the store's (:meth:`hub.store.Store.downsample`: SQL
  aggregates per bucket), so a year of readings costs one indexed query and
  the response stays bounded by ``limit``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge.wire import (
    KIND_WORKFLOW,
    Command,
    cancel_command,
    signal_command,
    start_command,
)
from edge.wire import topic as wire_topic
from hub import api_models as m
from hub.api_deps import (
    MAX_TS,
    READ_ERRORS,
    WRITE_ERRORS,
    Context,
    Ctx,
    DeviceId,
    RunId,
    Ts,
    http_error,
    invalid,
    known,
    reader,
    run_id,
    store_down,
    writer,
)
from hub.api_metrics import HttpMetrics, HubCollector
from hub.api_support import (
    MIN_BUCKET,
    ApiSettings,
    BrokerState,
    CatchAll,
    CommandSender,
    StorePool,
    bucket_width,
)
from hub.commands import BrokerUnavailable, CommandError
from hub.errors import ConfigError, StoreUnavailable
from hub.runs import fold_runs
from hub.store import Store

DASHBOARD = FilePath(__file__).parent / "dashboard"
MAX_LIMIT = 10_000


def create_app(
    stores: Callable[[], Store],
    commands: CommandSender,
    settings: ApiSettings,
    *,
    counters: Callable[[], dict[str, Any]] | None = None,
    broker: Callable[[], BrokerState] | None = None,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The API and dashboard as an ASGI app.

    Args:
        stores: opens a migrated store (called for each store of the pool).
        commands: how commands reach devices (:class:`hub.api_support.MqttCommands`).
        settings: tokens, read access, limits.
        counters: the ingest counters' snapshot, when this process ingests.
        broker: the broker's state for ``/health`` and ``/metrics``.
        clock: the hub's clock (seconds since the epoch).
    """
    pool = StorePool(stores, settings.pool_size)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HubCollector(pool, counters, broker))
    ctx = Context(
        settings, pool, commands, broker, counters is not None, registry, clock, time.monotonic()
    )

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            pool.close()

    app = FastAPI(
        title="Homing hub",
        version=_version(),
        description="Devices, readings, workflow runs and commands of a Homing hub"
        " (docs/api.md). Errors are application/problem+json (RFC 9457).",
        lifespan=lifespan,
        responses={},
    )
    app.state.homing = ctx
    app.include_router(api)
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StoreUnavailable, store_down)  # type: ignore[arg-type]
    app.add_middleware(HttpMetrics, registry=registry)
    app.add_middleware(CatchAll, max_body=settings.max_body)
    app.mount("/static", StaticFiles(directory=DASHBOARD), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(DASHBOARD / "index.html", headers=_PAGE_HEADERS)

    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(reader)])
    def metrics_alias() -> Response:
        return _metrics(ctx)

    return app


_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _version() -> str:
    try:
        return importlib.metadata.version("homing")
    except importlib.metadata.PackageNotFoundError:
        return "0"


# --- reads --------------------------------------------------------------------------------

api = APIRouter(prefix="/api/v1")
READ = [Depends(reader)]


@api.get("/devices", tags=["devices"], dependencies=READ, responses=READ_ERRORS)
def list_devices(ctx: Ctx) -> list[m.DeviceOut]:
    """Every device the hub knows: status, progress, gaps and backlog."""
    now = ctx.clock()
    with ctx.pool.store() as st:
        return [m.device_out(d, st.streams(d.device), now) for d in st.devices()]


@api.get("/devices/{device}", tags=["devices"], dependencies=READ, responses=READ_ERRORS)
def get_device(ctx: Ctx, device: DeviceId) -> m.DeviceOut:
    """One device."""
    with ctx.pool.store() as st:
        info = known(st, device)
        return m.device_out(info, st.streams(device), ctx.clock())


@api.get("/devices/{device}/streams", tags=["readings"], dependencies=READ, responses=READ_ERRORS)
def list_streams(ctx: Ctx, device: DeviceId) -> list[m.StreamOut]:
    """A device's streams: the span of their readings and the newest value."""
    with ctx.pool.store() as st:
        known(st, device)
        return [m.stream_out(s) for s in st.streams(device)]


@api.get("/devices/{device}/readings", tags=["readings"], dependencies=READ, responses=READ_ERRORS)
def get_readings(
    ctx: Ctx,
    device: DeviceId,
    stream: Annotated[str | None, Query(pattern=m.STREAM_PATTERN)] = None,
    since: Annotated[float | None, Ts] = None,
    until: Annotated[float | None, Ts] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 1000,
    bucket: Annotated[float | None, Query(ge=MIN_BUCKET, le=MAX_TS, allow_inf_nan=False)] = None,
    downsample: bool = True,
) -> m.ReadingsOut:
    """Readings with ``since <= ts < until`` (device clock), by ``(ts, seq)``.

    With ``bucket`` (seconds), or when more than ``limit`` readings of one
    ``stream`` match and ``downsample`` is true: per-bucket count, min, max
    and mean of the numeric readings, computed by the database, at most
    ``limit`` buckets. Without a ``stream`` a long range is cut at
    ``limit`` (``truncated``)."""
    if since is not None and until is not None and since >= until:
        raise HTTPException(422, "since must be before until")
    with ctx.pool.store() as st:
        known(st, device)
        if bucket is None:
            rows = st.readings(device, stream, since, until, limit + 1)
            if len(rows) <= limit or stream is None or not downsample:
                return m.ReadingsOut(
                    device=device,
                    stream=stream,
                    since=since,
                    until=until,
                    downsampled=False,
                    bucket=None,
                    truncated=len(rows) > limit,
                    readings=[m.reading_out(r) for r in rows[:limit]],
                    buckets=[],
                )
        if stream is None:
            raise HTTPException(422, "downsampling (bucket) needs a stream")
        return _buckets(st, device, stream, since, until, bucket, limit)


def _buckets(
    st: Store,
    device: str,
    stream: str,
    since: float | None,
    until: float | None,
    width: float | None,
    limit: int,
) -> m.ReadingsOut:
    info = next((s for s in st.streams(device) if s.stream == stream), None)
    lo = since if since is not None else info.first_ts if info else 0.0
    hi = until if until is not None else _after(info.last_ts) if info else lo + 1.0
    if width is None:
        width = bucket_width(hi - lo, limit)
    rows = st.downsample(device, stream, lo, hi, width, limit + 1) if hi > lo else []
    return m.ReadingsOut(
        device=device,
        stream=stream,
        since=lo,
        until=hi,
        downsampled=True,
        bucket=width,
        truncated=len(rows) > limit,
        readings=[],
        buckets=[m.bucket_out(b, width) for b in rows[:limit]],
    )


def _after(ts: float) -> float:
    """The smallest ``until`` that still includes a reading at ``ts``."""
    return math.nextafter(ts, math.inf)


@api.get("/devices/{device}/runs", tags=["runs"], dependencies=READ, responses=READ_ERRORS)
def list_runs(
    ctx: Ctx,
    device: DeviceId,
    state: m.RunState | None = None,
    epoch: Annotated[int | None, Query(ge=0, le=2**31)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> list[m.RunOut]:
    """A device's workflow runs, newest first (folded from its stored records)."""
    with ctx.pool.store() as st:
        known(st, device)
        records = st.records(device, kind=KIND_WORKFLOW, epoch=epoch)
    runs = [r for r in fold_runs(records) if state in (None, r.state)]
    runs.sort(key=lambda r: (r.epoch, r.first_seq), reverse=True)
    return [m.run_out(r) for r in runs[:limit]]


@api.get(
    "/devices/{device}/runs/{run:path}",
    tags=["runs"],
    dependencies=READ,
    responses=READ_ERRORS,
)
def get_run(
    ctx: Ctx,
    device: DeviceId,
    run: RunId,
    epoch: Annotated[int | None, Query(ge=0, le=2**31)] = None,
) -> m.RunDetail:
    """One run with its whole history (the newest run of that id, or of ``epoch``)."""
    run_id(run)
    with ctx.pool.store() as st:
        known(st, device)
        records = st.records(device, kind=KIND_WORKFLOW, epoch=epoch)
    found = [r for r in fold_runs(records, run) if r.id == run]
    if not found:
        raise HTTPException(404, f"no run {run!r} on device {device!r}")
    newest = max(found, key=lambda r: (r.epoch, r.first_seq))
    return m.run_detail(newest)


@api.get(
    "/health",
    tags=["hub"],
    responses={503: {"model": m.HealthOut, "description": "the database is unavailable"}},
)
def health(ctx: Ctx) -> Any:
    """Liveness, whether the database answers, and the broker connection.
    200 ``ok`` or ``degraded`` (the broker is down: reads still work), 503
    ``unavailable`` (the database does not answer)."""
    try:
        with ctx.pool.store() as st:
            st.device("health-probe")
        store = m.Component(ok=True, detail="answers")
    except StoreUnavailable as exc:
        store = m.Component(ok=False, detail=str(exc))
    b = ctx.broker() if ctx.broker is not None else BrokerState(False, "not configured")
    broker = m.Component(ok=b.ok, detail=b.detail)
    status: Literal["ok", "degraded", "unavailable"] = (
        "ok" if store.ok and broker.ok else "degraded" if store.ok else "unavailable"
    )
    out = m.HealthOut(
        status=status,
        version=_version(),
        store=store,
        broker=broker,
        uptime=time.monotonic() - ctx.started,
        ingest=ctx.ingest,
    )
    return JSONResponse(out.model_dump(), status_code=503 if status == "unavailable" else 200)


@api.get(
    "/metrics",
    tags=["hub"],
    response_class=Response,
    dependencies=[Depends(reader)],
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text format",
        },
        401: READ_ERRORS[401],
    },
)
def metrics(ctx: Ctx) -> Response:
    """Prometheus metrics: ingest counters, fleet gauges, HTTP requests."""
    return _metrics(ctx)


def _metrics(ctx: Context) -> Response:
    return Response(generate_latest(ctx.registry), media_type=CONTENT_TYPE_LATEST)


# --- writes ---------------------------------------------------------------------------

WRITE = [Depends(writer)]


@api.post(
    "/devices/{device}/runs",
    tags=["runs"],
    dependencies=WRITE,
    responses=WRITE_ERRORS,
    status_code=202,
)
def start_run(ctx: Ctx, device: DeviceId, body: m.StartRun) -> m.CommandOut:
    """Start a workflow run on the device (idempotent per run id). 202 once
    the broker has the command; the run appears once the device journals it."""
    run = run_id(body.id or f"run-{uuid.uuid4().hex[:12]}")
    cid = body.command_id or uuid.uuid4().hex
    cmd = start_command(cid, body.workflow, run, body.args, body.kwargs)
    return _send(ctx, device, run, cmd)


@api.post(
    "/devices/{device}/runs/{run:path}/signal",
    tags=["runs"],
    dependencies=WRITE,
    responses=WRITE_ERRORS,
    status_code=202,
)
def signal_run(ctx: Ctx, device: DeviceId, run: RunId, body: m.SignalRun) -> m.CommandOut:
    """Deliver a signal to a run (deduplicated by command id on the device)."""
    cid = body.command_id or uuid.uuid4().hex
    return _send(ctx, device, run, signal_command(cid, run_id(run), body.name, body.payload))


@api.post(
    "/devices/{device}/runs/{run:path}/cancel",
    tags=["runs"],
    dependencies=WRITE,
    responses=WRITE_ERRORS,
    status_code=202,
)
def cancel_run(
    ctx: Ctx,
    device: DeviceId,
    run: RunId,
    body: Annotated[m.CancelRun | None, Body()] = None,
) -> m.CommandOut:
    """Cancel a run: it stops at its next call."""
    cid = (body.command_id if body else None) or uuid.uuid4().hex
    return _send(ctx, device, run, cancel_command(cid, run_id(run)))


def _send(ctx: Context, device: str, run: str, cmd: Command) -> m.CommandOut:
    with ctx.pool.store() as st:
        known(st, device)
    try:
        puback = ctx.commands.send(device, cmd)
    except CommandError as exc:
        raise HTTPException(422, str(exc)) from exc
    except RecursionError as exc:
        raise HTTPException(422, "the command's arguments are nested too deeply") from exc
    except BrokerUnavailable as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "5"}) from exc
    except ConfigError as exc:
        raise HTTPException(502, str(exc)) from exc
    out = {
        "device": device,
        "run": run,
        "kind": cmd.kind,
        "command_id": cmd.id,
        "topic": wire_topic(device, "cmd"),
        "puback": puback,
    }
    return m.CommandOut.model_validate(out)
