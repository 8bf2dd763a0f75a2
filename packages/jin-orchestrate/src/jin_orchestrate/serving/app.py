"""The Ray Serve application: a FastAPI ingress in front of a batching model deployment.

    HTTP -> Ingress (FastAPI; validates and decodes, CPU) -> Embedder (@serve.batch; the model)

``Ingress`` turns each request's items into a decoded Arrow table (`jin_orchestrate.serving.items`)
and answers client mistakes itself, so a bad request never reaches, or fails, a batch. ``Embedder``
merges the tables of up to ``max_batch_size`` concurrent requests (waiting at most
``batch_wait_timeout_s`` for them), embeds each modality once over the merged rows and hands every
request its own rows back; with ``max_batch_items`` a batch holding more items is embedded in
consecutive passes of whole requests (`forward_passes`), which bounds a pass's memory. The two
scale apart: many CPU ingress replicas can feed one GPU model replica. ``build_app`` is the
application builder that ``serve run`` / ``serve deploy`` import.

No ``from __future__ import annotations`` here: FastAPI reads the route methods' annotations at
run time, and Serve's ingress wrapper hides the module namespace it would resolve strings in.
"""

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from jin_data import Decoder
from jin_orchestrate import __version__
from jin_orchestrate.inference import EmbeddingModel, ModelCard, card_decoder
from jin_orchestrate.serving.api import (
    Embedding,
    EmbedRequest,
    EmbedResponse,
    ErrorDetail,
    ErrorResponse,
    Health,
    Item,
    Limits,
    ServiceCard,
    SimilarityRequest,
    SimilarityResponse,
    TooManyItems,
    set_max_items,
)
from jin_orchestrate.serving.config import ServeConfig
from jin_orchestrate.serving.items import InputError, items_table

__all__ = ["BodyLimit", "Embedder", "Ingress", "RequestEmbeddings", "build_app", "forward_passes"]

ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "too many items, or an item or body too large"},
    422: {"model": ErrorResponse, "description": "an item that does not fit the model"},
    503: {"model": ErrorResponse, "description": "a model replica was lost; retry the request"},
}

app = FastAPI(
    title="Jin embeddings",
    version=__version__,
    description="L2-normalised embeddings of text, images, audio, point clouds and runtime "
    "modalities in Jin's joint space. Client errors name the item and the field.",
)


@app.exception_handler(InputError)
async def _input_error(request: Request, exc: InputError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _too_many(loc: list[str | int], count: int, limit: int) -> InputError:
    detail = ErrorDetail(
        loc=loc,
        msg=f"{count} items is over the limit of {limit} per request (max_items)",
        type="too_large",
    )
    return InputError(413, [detail])


@app.exception_handler(TooManyItems)
async def _too_many_items(request: Request, exc: TooManyItems) -> JSONResponse:
    # Raised while the body validates, before any of the list's items is looked at.
    error = _too_many(["body", exc.field], exc.count, exc.limit)
    return JSONResponse(error.body(), status_code=error.status)


def _unavailable(msg: str) -> JSONResponse:
    detail = ErrorDetail(loc=[], msg=msg, type="unavailable")
    return JSONResponse(
        {"detail": [detail.model_dump()]}, status_code=503, headers={"Retry-After": "1"}
    )


@app.exception_handler(RayActorError)  # ActorUnavailableError and ActorDiedError included
async def _replica_lost(request: Request, exc: Exception) -> JSONResponse:
    # A model replica died or restarted while holding this request: the request was fine, and
    # Serve routes a retry to a live replica, so say so (clients retry 503) instead of a 500.
    return _unavailable(
        f"the model replica was lost during the request; retry ({type(exc).__name__})"
    )


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default echoes each bad input back, which can be megabytes of base64.
    details = [
        ErrorDetail(loc=list(e["loc"]), msg=e["msg"], type=e["type"]).model_dump()
        for e in exc.errors()
    ]
    return JSONResponse({"detail": details}, status_code=422)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # FastAPI's own answers (404, 405, a body its JSON parser raised on other than a syntax
    # error: invalid UTF-8, a 5000-digit integer, deep nesting) carry a plain string: give them
    # the shape of every other error. A body that does not parse is malformed JSON: a 422.
    if exc.status_code == 400 and exc.__cause__ is not None:
        detail = ErrorDetail(
            loc=["body"],
            msg=f"JSON decode error: {type(exc.__cause__).__name__}: {exc.__cause__}",
            type="json_invalid",
        )
        return JSONResponse({"detail": [detail.model_dump()]}, status_code=422)
    detail = ErrorDetail(loc=[], msg=str(exc.detail), type="http_error")
    return JSONResponse(
        {"detail": [detail.model_dump()]}, status_code=exc.status_code, headers=exc.headers
    )


class BodyLimit:
    """ASGI middleware: 413 for a body over ``app.state.max_request_bytes``, before it is parsed.

    A declared ``Content-Length`` over the limit is refused unread; a chunked body is read up to
    the limit and refused as soon as it passes it, else handed on as it came.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        limit = getattr(scope["app"].state, "max_request_bytes", None) if "app" in scope else None
        if scope["type"] != "http" or limit is None:
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit():  # the server answers a malformed one
            if int(declared) > limit:
                return await _too_large(scope, send, f"{int(declared)} bytes", limit)
            return await self.app(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > limit:
                return await _too_large(scope, send, f"more than {limit} bytes", limit)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> dict[str, Any]:
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)


async def _too_large(scope: dict[str, Any], send: Any, size: str, limit: int) -> None:
    detail = ErrorDetail(
        loc=["body"],
        msg=f"request body of {size} is over the limit of {limit} bytes (max_request_bytes)",
        type="too_large",
    )
    response = JSONResponse({"detail": [detail.model_dump()]}, status_code=413)
    await response(scope, _no_body, send)


async def _no_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


app.add_middleware(BodyLimit)


@dataclass
class RequestEmbeddings:
    """One request's answer from the model: ``(N, R)`` vectors and the rows it rejected.

    ``batch_requests`` and ``batch_items`` size the forward pass it shared (``X-Jin-Batch-*``).
    """

    vectors: np.ndarray
    errors: dict[int, str]
    batch_requests: int
    batch_items: int


def forward_passes(sizes: list[int], max_items: int | None) -> list[slice]:
    """Consecutive runs of whole requests (of ``sizes`` items) of at most ``max_items`` items.

    In arrival order, so no request waits behind a later one; a request alone over the limit gets
    a pass of its own (the ingress's ``max_items`` keeps requests under it).
    """
    if max_items is None:
        return [slice(0, len(sizes))]
    passes, start, items = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and items + size > max_items:
            passes.append(slice(start, i))
            start, items = i, 0
        items += size
    passes.append(slice(start, len(sizes)))
    return passes


@serve.deployment
class Embedder:
    """The model replica: batches concurrent requests with ``@serve.batch`` into one pass."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.model = EmbeddingModel.from_checkpoint(
            cfg.checkpoint, tracking_uri=cfg.mlflow_tracking_uri
        )
        self.embed.set_max_batch_size(cfg.max_batch_size)
        self.embed.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.max_batch_items = cfg.max_batch_items

    def card(self) -> ModelCard:
        """The loaded checkpoint's identity and modalities."""
        return self.model.card

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)  # reset from the config
    async def embed(self, tables: list[pa.Table]) -> list[RequestEmbeddings]:
        """Each request's decoded items (a table) -> its embeddings; one forward per modality
        and pass (`forward_passes`)."""
        answers = []
        for run in forward_passes([t.num_rows for t in tables], self.max_batch_items):
            answers += await self._embed_pass(tables[run])
        return answers

    async def _embed_pass(self, tables: list[pa.Table]) -> list[RequestEmbeddings]:
        merged = pa.concat_tables(tables)
        # The forward runs in a thread so the replica keeps queueing the next batch meanwhile.
        result = await asyncio.to_thread(self.model.embed_table, merged)
        vectors = np.zeros((merged.num_rows, self.model.card.dim), np.float32)
        for name, present in result.present.items():
            vectors[present] = result.vectors[name][present]
        answers, start = [], 0
        for table in tables:
            stop = start + table.num_rows
            errors = {i - start: m for i, m in result.errors.items() if start <= i < stop}
            answers.append(
                RequestEmbeddings(vectors[start:stop], errors, len(tables), merged.num_rows)
            )
            start = stop
        return answers


@serve.deployment
@serve.ingress(app)
class Ingress:
    """The HTTP front: request models, limits, decoding; the model sits behind ``embedder``."""

    def __init__(self, embedder: DeploymentHandle, cfg: ServeConfig) -> None:
        self.embedder = embedder
        self.limits = Limits(
            max_items=cfg.max_items,
            max_request_bytes=cfg.max_request_bytes,
            max_image_pixels=cfg.max_image_pixels,
            max_audio_seconds=cfg.max_audio_seconds,
        )
        app.state.max_request_bytes = cfg.max_request_bytes  # read by BodyLimit
        set_max_items(cfg.max_items)  # each list of items, before its items validate
        self.health_timeout_s = cfg.health_timeout_s
        self._card: ModelCard | None = None
        self._decoder: Decoder | None = None

    async def card(self) -> ModelCard:
        """The model replica's card, asked once."""
        if self._card is None:
            self._card = await self.embedder.card.remote()
            self._decoder = card_decoder(self._card, on_error="skip")
        return self._card

    async def _embed(
        self, lists: Mapping[str, list[Item]], response: Response
    ) -> dict[str, np.ndarray]:
        """Vectors ``(N, R)`` of each named list of items; every bad item is reported at once."""
        count = sum(len(items) for items in lists.values())
        if count > self.limits.max_items:
            loc: list[str | int] = ["body", *lists] if len(lists) == 1 else ["body"]
            raise _too_many(loc, count, self.limits.max_items)
        card = await self.card()
        tables, failures = {}, []
        for field, items in lists.items():
            try:
                tables[field] = items_table(items, card, self.limits, self._decoder, field)
            except InputError as exc:
                failures.append(exc)
        if failures:
            status = 413 if any(f.status == 413 for f in failures) else 422
            raise InputError(status, [d for f in failures for d in f.details])
        answer: RequestEmbeddings = await self.embedder.embed.remote(
            pa.concat_tables(list(tables.values()))
        )
        bounds = np.cumsum([0, *(len(items) for items in lists.values())])
        if answer.errors:
            details = []
            for row, msg in sorted(answer.errors.items()):
                k = int(np.searchsorted(bounds, row, side="right")) - 1
                details.append(
                    ErrorDetail(
                        loc=["body", list(lists)[k], row - int(bounds[k]), "data"],
                        msg=msg,
                        type="value_error",
                    )
                )
            raise InputError(422, details)
        response.headers["X-Jin-Batch-Requests"] = str(answer.batch_requests)
        response.headers["X-Jin-Batch-Items"] = str(answer.batch_items)
        return {field: answer.vectors[bounds[k] : bounds[k + 1]] for k, field in enumerate(lists)}

    @app.post("/v1/embed", responses=ERRORS)
    async def embed(self, request: EmbedRequest, response: Response) -> EmbedResponse:
        """Embed every item; the vectors are L2-normalised, in the order of ``items``.

        ``X-Jin-Batch-Requests`` / ``X-Jin-Batch-Items`` tell how many requests and items shared
        the forward pass.
        """
        vectors = (await self._embed({"items": request.items}, response))["items"]
        card = await self.card()
        return EmbedResponse(
            model_version=card.version,
            dim=card.dim,
            data=[
                Embedding(index=i, modality=item.modality, embedding=vector.tolist())
                for i, (item, vector) in enumerate(zip(request.items, vectors, strict=True))
            ],
        )

    @app.post("/v1/similarity", responses=ERRORS)
    async def similarity(
        self, request: SimilarityRequest, response: Response
    ) -> SimilarityResponse:
        """Cosine similarity of every query with every candidate, from one batched pass."""
        lists = {"queries": request.queries, "candidates": request.candidates}
        vectors = await self._embed(lists, response)
        # Unit vectors: the dot product is the cosine, clipped where rounding passes 1.
        scores = np.clip(vectors["queries"] @ vectors["candidates"].T, -1.0, 1.0)
        card = await self.card()
        return SimilarityResponse(model_version=card.version, scores=scores.tolist())

    @app.get("/v1/modalities")
    async def modalities(self) -> ServiceCard:
        """The model, the modalities it embeds and what each takes, and the request limits."""
        return ServiceCard(model=await self.card(), limits=self.limits)

    @app.get(
        "/healthz",
        response_model=Health,  # else FastAPI reads the annotation, which its JSONResponse fails
        responses={503: {"model": ErrorResponse, "description": "no model replica answers"}},
    )
    async def healthz(self) -> Health | JSONResponse:
        """OK while a model replica answers, asked anew each time (its card: no forward pass).

        503 naming the failure when none answers within ``health_timeout_s``: the replica is
        dead, restarting, still loading, or too busy to answer.
        """
        call = self.embedder.card.remote()
        try:
            card: ModelCard = await asyncio.wait_for(call, self.health_timeout_s)
        except TimeoutError:
            call.cancel()  # not left queued for a replica that may never come
            return _unavailable(
                f"the model deployment (Embedder) did not answer within "
                f"{self.health_timeout_s:g} s (health_timeout_s)"
            )
        except Exception as exc:  # the model replica is down or failed to load
            return _unavailable(
                f"the model deployment (Embedder) is not reachable: {type(exc).__name__}: {exc}"
            )
        return Health(status="ok", model_version=card.version)


def build_app(args: Mapping[str, Any] | ServeConfig) -> serve.Application:
    """The application from a :class:`ServeConfig` (or its mapping: a Serve config's ``args``)."""
    from jin_orchestrate.cluster import use_gpu

    cfg = args if isinstance(args, ServeConfig) else ServeConfig.model_validate(dict(args))
    gpus = 1 if use_gpu(cfg.use_gpu) else 0
    embedder = Embedder.options(**cfg.model_options(gpus)).bind(cfg)
    return Ingress.options(**cfg.ingress_options()).bind(embedder, cfg)
