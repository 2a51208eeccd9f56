"""The FastAPI app: OpenAI's Files and Fine-tuning endpoints under ``/v1``, admin under ``/_emulator``.

Every ``/v1`` request passes one gateway: the API key is checked (401), an injected fault may
answer instead (or after performing the request, for ``after_effect``), and the request is
logged so tests can count attempts. Admin endpoints need no key and are never faulted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from openai_emulator import models, tokens
from openai_emulator.errors import DEFAULT_MESSAGES, APIError, bad_request
from openai_emulator.faults import Fault, FaultBook, FaultSpec
from openai_emulator.schemas import Clock, Deprecation, FailJob, JobCreate, RefuseJobs, StageSeconds
from openai_emulator.settings import Settings
from openai_emulator.store import FILE_PURPOSES, Store, paginate

log = logging.getLogger("openai_emulator")

API_PREFIX = "/v1"
# Azure OpenAI's URL shape: the same API under /openai, with ?api-version= and an api-key header.
AZURE_PREFIX = "/openai"
ADMIN_PREFIX = "/_emulator"
_TYPE_TAGS = {"int", "float", "str", "bool", "none", "dict", "list", "function-after", "lax-or-strict"}


# ------------------------------------------------------------------------------ error mapping


def _param_of(loc: Sequence[Any]) -> str | None:
    """``('body', 'method', 'type')`` -> ``'method.type'``; union-member tags are dropped."""
    parts = [str(p) for p in loc if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    return ".".join(parts) or None


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """The first pydantic/FastAPI validation problem as OpenAI's 400."""
    first = errors[0] if errors else {"type": "value_error", "loc": (), "msg": "invalid request"}
    param = _param_of(first.get("loc", ()))
    kind = first.get("type")
    if kind == "json_invalid":
        return bad_request(
            "We could not parse the JSON body of your request. The API expects a JSON payload "
            "(Content-Type: application/json), but what was sent was not valid JSON.",
        )
    if kind == "missing":
        return bad_request(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    if kind == "extra_forbidden":
        return bad_request(
            f"Unrecognized request argument supplied: {param}", param=param, code="unknown_parameter"
        )
    # A union reports one error per member: say them together.
    reasons = [e.get("msg", "invalid") for e in errors if _param_of(e.get("loc", ())) == param]
    shown = repr(first["input"]) if "input" in first and not isinstance(first["input"], dict | list) else None
    got = f" (got {shown})" if shown else ""
    return bad_request(
        f"Invalid value for '{param}': {'; or '.join(dict.fromkeys(reasons))}{got}.",
        param=param,
        code="invalid_value",
    )


def _mask(key: str) -> str:
    return key if len(key) <= 8 else f"{key[:3]}{'*' * min(20, len(key) - 7)}{key[-4:]}"


def _auth_error(header: str | None, settings: Settings) -> APIError | None:
    """The 401 for a missing or wrong ``Authorization: Bearer`` key, or None if it is good."""
    scheme, _, key = (header or "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return APIError(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization "
            "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )
    good = key == settings.api_key if settings.api_key is not None else key.startswith("sk-")
    if good:
        return None
    expected = "the key the emulator was started with" if settings.api_key else "any key starting with 'sk-'"
    return APIError(
        401,
        f"Incorrect API key provided: {_mask(key)}. The emulator accepts {expected}.",
        code="invalid_api_key",
    )


def _azure_error(request: Request, settings: Settings) -> APIError | None:
    """Azure's checks: an ``api-version`` query parameter, and an ``api-key`` header (or an Entra
    ID ``Authorization: Bearer`` token). The emulator accepts any non-empty key, or exactly
    ``--api-key``."""
    if not request.query_params.get("api-version"):
        # What Azure answers for a data-plane call without api-version.
        return APIError(404, "Resource not found", code="404")
    key = request.headers.get("api-key")
    if key is None:
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else None
    if key and (settings.api_key is None or key == settings.api_key):
        return None
    return APIError(
        401,
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide "
        "a valid key for an active subscription and use a correct regional API endpoint for your resource.",
        code="401",
    )


def _fault_response(fault: Fault) -> Response:
    spec = fault.spec
    status = spec.status or 500
    code = spec.default_code()
    if spec.message:
        message = spec.message
    elif code == "insufficient_quota":
        message = "You exceeded your current quota, please check your plan and billing details."
    elif status == 429 and spec.retry_after is not None:
        message = f"Rate limit reached for requests. Please try again in {spec.retry_after:g}s."
    else:
        message = DEFAULT_MESSAGES.get(status, f"Injected error {status}.")
    headers: dict[str, str] = {}
    if spec.retry_after is not None:
        headers["retry-after"] = f"{spec.retry_after:g}"
    if spec.should_retry is not None:
        headers["x-should-retry"] = "true" if spec.should_retry else "false"
    return APIError(status, message, code=code, headers=headers).response()


async def _drain(response: Response) -> None:
    """Consume a response we discard, so the performed request really completes."""
    body_iterator = getattr(response, "body_iterator", None)
    if body_iterator is not None:
        async for _chunk in body_iterator:
            pass


# ------------------------------------------------------------------------------------ the app


def create_app(settings: Settings | None = None) -> FastAPI:
    """A fresh emulator (its own in-memory state) with ``settings``."""
    settings = settings or Settings()
    store = Store(settings)
    faults = FaultBook()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.preload_tokenizers:
            threading.Thread(target=tokens.preload, name="tokenizer-preload", daemon=True).start()
        yield

    app = FastAPI(
        title="OpenAI emulator",
        version="1.0",
        lifespan=lifespan,
        docs_url="/_emulator/docs",
        redoc_url=None,
        openapi_url="/_emulator/openapi.json",
    )
    app.state.store = store
    app.state.faults = faults
    app.state.settings = settings

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_invalid(_request: Request, exc: RequestValidationError) -> Response:
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path})"
        else:
            message = str(exc.detail)
        return APIError(exc.status_code, message).response()

    @app.exception_handler(Exception)
    async def _crash(_request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return APIError(500, f"The emulator had an internal error: {type(exc).__name__}: {exc}").response()

    @app.middleware("http")
    async def gateway(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        azure = path.startswith(AZURE_PREFIX + "/")
        if azure:  # served by the /v1 routes: same store, same faults (matched on the /v1 path)
            path = API_PREFIX + path[len(AZURE_PREFIX) :]
            request.scope["path"] = path
            request.scope["raw_path"] = path.encode()
        request.state.azure = azure
        if not path.startswith(API_PREFIX + "/") and path != API_PREFIX:
            return await call_next(request)
        started = time.monotonic()
        entry: dict[str, Any] = {
            "method": request.method,
            "path": path,
            "query": str(request.url.query),
            "retry_count": request.headers.get("x-stainless-retry-count"),
            "at": store.now(),
            "fault": None,
            "azure": azure,
        }
        if azure:
            auth_error = _azure_error(request, settings)
        else:
            auth_error = _auth_error(request.headers.get("authorization"), settings)
        if auth_error is not None:
            return _logged(auth_error.response(), entry, started)
        fault = faults.take(request.method, path)
        if fault is not None:
            entry["fault"] = fault.id
            log.info("fault %s hits %s %s", fault.id, request.method, path)

        async def perform() -> Response:
            return _logged(await _perform(request, call_next, fault), entry, started)

        # A real API server finishes a request whose client has gone (timed out): the file or
        # job is made all the same. Shielded, the client's disconnect does not cancel the work.
        return await asyncio.shield(asyncio.ensure_future(perform()))

    def _logged(response: Response, entry: dict[str, Any], started: float) -> Response:
        entry["status"] = response.status_code
        with store.lock:
            store.requests.append(entry)
        response.headers["x-request-id"] = f"req_{secrets.token_hex(16)}"
        response.headers["openai-organization"] = settings.organization_id
        response.headers["openai-version"] = "2020-10-01"
        response.headers["openai-processing-ms"] = str(int((time.monotonic() - started) * 1000))
        return response

    async def _perform(
        request: Request, call_next: Callable[[Request], Awaitable[Response]], fault: Fault | None
    ) -> Response:
        if fault is None:
            return await call_next(request)
        spec = fault.spec
        # Read the whole request now, as a server does before it works on it: a client that
        # times out during the delay must not take the body of its request away with it.
        await request.body()
        if not spec.after_effect:
            if spec.delay_seconds:
                await asyncio.sleep(spec.delay_seconds)
            return await call_next(request) if spec.status is None else _fault_response(fault)
        # "Reply lost": do the work, then (after any delay) answer with the error instead.
        real = await call_next(request)
        if spec.delay_seconds:
            await asyncio.sleep(spec.delay_seconds)
        if spec.status is None:
            return real
        await _drain(real)
        return _fault_response(fault)

    _add_files_routes(app, store, settings)
    _add_jobs_routes(app, store, settings)
    _add_models_routes(app, store)
    _add_admin_routes(app, store, faults)
    return app


def _add_files_routes(app: FastAPI, store: Store, settings: Settings) -> None:
    @app.post("/v1/files")
    async def create_file(
        file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
    ) -> dict[str, Any]:
        """Upload a file; fine-tune files must be ``.jsonl`` and at most 512 MB."""
        if purpose not in FILE_PURPOSES:
            raise bad_request(f"'{purpose}' is not one of {list(FILE_PURPOSES)} - 'purpose'", param="purpose")
        filename = file.filename or "upload"
        if file.size is not None and file.size > settings.max_file_bytes:
            raise _too_large(file.size, settings.max_file_bytes)
        data = await file.read()
        if len(data) > settings.max_file_bytes:
            raise _too_large(len(data), settings.max_file_bytes)
        if purpose == "fine-tune" and not filename.lower().endswith(".jsonl"):
            raise bad_request(
                f"Invalid file format for Fine-Tuning API. Must be .jsonl (got {filename!r}).", param="file"
            )
        if not data:
            raise bad_request("The file is empty.", param="file")
        stored = store.add_file(filename, purpose, data)
        log.info("file %s uploaded (%s, %d bytes, %s)", stored.id, filename, len(data), purpose)
        return stored.to_api()

    @app.get("/v1/files")
    def list_files(
        purpose: str | None = None,
        limit: int = Query(10_000, ge=1, le=10_000),
        after: str | None = None,
        order: Literal["asc", "desc"] = "desc",
    ) -> dict[str, Any]:
        """Files, newest first by default, with cursor pagination."""
        page, has_more = paginate(store.list_files(purpose, order), after, limit)
        return _list(page, has_more, with_ids=True)

    @app.get("/v1/files/{file_id}")
    def retrieve_file(file_id: str) -> dict[str, Any]:
        return store.get_file(file_id).to_api()

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str) -> Response:
        return Response(store.get_file(file_id).data, media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str) -> dict[str, Any]:
        return store.delete_file(file_id)


def _too_large(size: int, limit: int) -> APIError:
    return bad_request(
        f"File is too large: {size:,} bytes; the limit is {limit:,} bytes ({limit / 2**20:g} MB).",
        param="file",
        code="file_too_large",
    )


def _list(items: Sequence[Any], has_more: bool, *, with_ids: bool = False) -> dict[str, Any]:
    """OpenAI's list envelope, which the client's cursor page reads."""
    data = [item if isinstance(item, dict) else item.to_api() for item in items]
    body: dict[str, Any] = {"object": "list", "data": data, "has_more": has_more}
    if with_ids:
        body["first_id"] = data[0]["id"] if data else None
        body["last_id"] = data[-1]["id"] if data else None
    return body


def _metadata_filter(request: Request) -> tuple[dict[str, str], bool]:
    """``metadata[k]=v`` query pairs (deepObject, as the client sends them), and ``metadata=null``."""
    pairs: dict[str, str] = {}
    null = False
    for key, value in request.query_params.multi_items():
        if key.startswith("metadata[") and key.endswith("]"):
            pairs[key[len("metadata[") : -1]] = value
        elif key == "metadata":
            if value != "null":
                raise bad_request(
                    "metadata must be sent as metadata[key]=value pairs, or metadata=null.", param="metadata"
                )
            null = True
    if pairs and null:
        raise bad_request("Do not combine metadata=null with metadata[key]=value filters.", param="metadata")
    return pairs, null


def _add_jobs_routes(app: FastAPI, store: Store, settings: Settings) -> None:
    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request) -> dict[str, Any]:
        """Create a job: refusal mode first, then the body's checks, then the job (validating_files)."""
        try:
            raw = json.loads(await request.body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise validation_error([{"type": "json_invalid", "loc": ()}]) from None
        if store.fine_tuning_closed():
            body = JobCreate.model_construct(model="", training_file="")  # refused before it is looked at
        else:
            if not isinstance(raw, dict):
                raise bad_request("The request body must be a JSON object.")
            try:
                body = JobCreate.model_validate(raw)
            except ValidationError as exc:
                raise validation_error(list(exc.errors())) from None
        job = await run_in_threadpool(store.create_job, body)
        log.info("job %s created (%s, file %s)", job.id, job.model, job.training_file)
        return job.to_api(settings)

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(
        request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100)
    ) -> dict[str, Any]:
        """Jobs newest first, optionally filtered by metadata, with cursor pagination."""
        pairs, null = _metadata_filter(request)
        page, has_more = paginate(store.list_jobs(pairs, null), after, limit)
        return {"object": "list", "data": [job.to_api(settings) for job in page], "has_more": has_more}

    @app.get("/v1/fine_tuning/jobs/{fine_tuning_job_id}")
    def retrieve_job(fine_tuning_job_id: str) -> dict[str, Any]:
        return store.get_job(fine_tuning_job_id).to_api(settings)

    @app.post("/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel")
    def cancel_job(fine_tuning_job_id: str) -> dict[str, Any]:
        return store.cancel_job(fine_tuning_job_id).to_api(settings)

    @app.post("/v1/fine_tuning/jobs/{fine_tuning_job_id}/pause")
    def pause_job(fine_tuning_job_id: str) -> dict[str, Any]:
        return store.pause_job(fine_tuning_job_id).to_api(settings)

    @app.post("/v1/fine_tuning/jobs/{fine_tuning_job_id}/resume")
    def resume_job(fine_tuning_job_id: str) -> dict[str, Any]:
        return store.resume_job(fine_tuning_job_id).to_api(settings)

    @app.get("/v1/fine_tuning/jobs/{fine_tuning_job_id}/events")
    def list_events(
        fine_tuning_job_id: str, after: str | None = None, limit: int = Query(20, ge=1, le=1000)
    ) -> dict[str, Any]:
        """Events newest first: lifecycle messages and per-step metrics."""
        page, has_more = paginate(store.job_events(fine_tuning_job_id), after, limit)
        return _list(page, has_more)

    @app.get("/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints")
    def list_checkpoints(
        fine_tuning_job_id: str, after: str | None = None, limit: int = Query(10, ge=1, le=100)
    ) -> dict[str, Any]:
        """Checkpoints of the last epochs, newest first (after success)."""
        page, has_more = paginate(store.job_checkpoints(fine_tuning_job_id), after, limit)
        return _list(page, has_more, with_ids=True)


def _model_object(store: Store, name: str, azure: bool) -> dict[str, Any]:
    """A model as ``GET /v1/models`` lists it; Azure's Models API adds its lifecycle fields."""
    body: dict[str, Any] = {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "system"}
    if azure:
        deprecation = store.deprecations.get(name, {})
        retired = "inference" in deprecation and store.now() >= deprecation["inference"]
        closed = "fine_tune" in deprecation and store.now() >= deprecation["fine_tune"]
        body.update(
            {
                "status": "succeeded",
                "lifecycle_status": "deprecated" if retired else "generally-available",
                "capabilities": {"fine_tune": not closed, "inference": not retired, "chat_completion": True},
                "deprecation": dict(deprecation),
                "created_at": body["created"],
            }
        )
    return body


def _add_models_routes(app: FastAPI, store: Store) -> None:
    @app.get("/v1/models")
    def list_models(request: Request) -> dict[str, Any]:
        """The fine-tunable snapshots (on the Azure path with ``deprecation`` dates, as Azure's
        ``GET {endpoint}/openai/models`` reports them)."""
        azure = bool(getattr(request.state, "azure", False))
        return {
            "object": "list",
            "data": [_model_object(store, name, azure) for name in sorted(models.SNAPSHOTS)],
        }

    @app.get("/v1/models/{model}")
    def retrieve_model(model: str, request: Request) -> dict[str, Any]:
        if model not in models.SNAPSHOTS:
            raise bad_request(f"The model '{model}' does not exist", param="model", code="model_not_found")
        return _model_object(store, model, bool(getattr(request.state, "azure", False)))


def _add_admin_routes(app: FastAPI, store: Store, faults: FaultBook) -> None:
    @app.post(ADMIN_PREFIX + "/clock")
    def set_clock(body: Clock) -> dict[str, Any]:
        """Move the emulator's clock: to ``now`` (Unix seconds), or by ``advance_seconds``."""
        with store.lock:
            if body.now is not None:
                store.clock_offset = body.now - store.settings.clock()
            store.clock_offset += body.advance_seconds
            return {"now": store.now(), "offset_seconds": store.clock_offset}

    @app.post(ADMIN_PREFIX + "/deprecations")
    def set_deprecation(body: Deprecation) -> dict[str, Any]:
        """Set what Azure's Models API reports for one model (Unix seconds; None removes)."""
        with store.lock:
            dates = store.deprecations.setdefault(body.model, {})
            for kind, value in (("fine_tune", body.fine_tune), ("inference", body.inference)):
                if value is None:
                    dates.pop(kind, None)
                else:
                    dates[kind] = value
            return {"model": body.model, "deprecation": dict(dates)}

    @app.get(ADMIN_PREFIX + "/health")
    def health() -> dict[str, Any]:
        return {"ok": True}

    @app.get(ADMIN_PREFIX + "/state")
    def state() -> dict[str, Any]:
        """Files, result files, jobs (current status), the request log, faults."""
        return {**store.state(), "faults": faults.as_list()}

    @app.post(ADMIN_PREFIX + "/reset")
    def reset() -> dict[str, Any]:
        """Forget all files, jobs, logged requests and faults; refusal back to its start value."""
        store.reset()
        faults.clear()
        return {"reset": True}

    @app.post(ADMIN_PREFIX + "/faults")
    def add_fault(spec: FaultSpec) -> dict[str, Any]:
        fault = faults.add(spec)
        log.info("fault %s added: %s", fault.id, spec.model_dump())
        return fault.as_dict()

    @app.get(ADMIN_PREFIX + "/faults")
    def list_faults() -> dict[str, Any]:
        return {"faults": faults.as_list()}

    @app.delete(ADMIN_PREFIX + "/faults")
    def clear_faults() -> dict[str, Any]:
        return {"cleared": faults.clear()}

    @app.post(ADMIN_PREFIX + "/stage_seconds")
    def set_stage_seconds(body: StageSeconds) -> dict[str, Any]:
        """How long each job stage lasts from now on (a test that needs a job to stay live)."""
        with store.lock:
            store.settings.stage_seconds = body.seconds
            return {"stage_seconds": store.settings.stage_seconds}

    @app.post(ADMIN_PREFIX + "/refuse_jobs")
    def refuse_jobs(body: RefuseJobs) -> dict[str, Any]:
        """Turn on/off the mode in which job creation is refused as after OpenAI's shutdown."""
        with store.lock:
            store.refuse_jobs = body.refuse
            if body.status is not None:
                store.refuse_status = body.status
            store.refuse_message = body.message
            return {"refuse_jobs": store.refuse_jobs, "status": store.refuse_status}

    @app.post(ADMIN_PREFIX + "/jobs/{job_id}/fail")
    def fail_job(job_id: str, body: FailJob | None = None) -> dict[str, Any]:
        """End a live job as failed with ``{code, message, param}``."""
        body = body or FailJob()
        return store.fail_job(job_id, body.code, body.message, body.param).to_api(store.settings)
