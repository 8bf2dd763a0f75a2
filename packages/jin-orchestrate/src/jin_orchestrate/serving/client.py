"""A client of the embedding service that retries what a retry can fix, and nothing else.

Embedding is a pure function of the request, so a request may be sent again safely. Retried:
connection failures, timeouts, and 502/503/504 (a model replica that died mid-request answers 503,
see `jin_orchestrate.serving.app`), with exponential backoff and jitter, honouring
``Retry-After``. Not retried: 4xx (the request is wrong and will stay wrong), 500 (a server bug
that a retry would only repeat) and a request that cannot be sent as it is (a URL without
``http://``, an invalid header: `RequestFailed` at once). ::

    from jin_orchestrate.serving.client import EmbeddingClient

    with EmbeddingClient("http://127.0.0.1:8000") as client:
        vectors = client.embed([{"modality": "text", "data": "the number 42"}])

`AsyncEmbeddingClient` is the same for asyncio; ``post`` of either returns the final
``httpx.Response`` and how many attempts it took.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = ["AsyncEmbeddingClient", "EmbeddingClient", "RequestFailed", "RetryPolicy"]

RETRY_STATUS = frozenset({502, 503, 504})
# Transport errors a later attempt can escape; the others (httpx.UnsupportedProtocol,
# httpx.LocalProtocolError) are the request's own and would fail every attempt alike.
RETRY_ERRORS = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
    httpx.ProxyError,
)


class RequestFailed(RuntimeError):
    """A request that got no successful answer; ``status`` is ``None`` where none came back."""

    def __init__(self, message: str, status: int | None, attempts: int) -> None:
        super().__init__(message)
        self.status, self.attempts = status, attempts


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry; ``seed`` fixes the jitter (tests, benchmarks).

    ``attempts`` counts the first try, so it is at least 1; a ``ValueError`` names a field out of
    range.
    """

    attempts: int = 6
    backoff_s: float = 0.25
    max_backoff_s: float = 8.0
    timeout_s: float = 120.0
    seed: int | None = None

    def __post_init__(self) -> None:
        # Written as `not (x >= bound)` so NaN is refused too.
        if not self.attempts >= 1:
            raise ValueError(
                f"attempts: expected >= 1 (the first try counts), got {self.attempts!r}"
            )
        for name in ("backoff_s", "max_backoff_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected >= 0 seconds, got {getattr(self, name)!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: expected > 0 seconds, got {self.timeout_s!r}")

    def delay(self, attempt: int, response: httpx.Response | None, rng: random.Random) -> float:
        """Seconds before the next attempt: ``Retry-After``, else jittered exponential backoff."""
        after = response.headers.get("retry-after") if response is not None else None
        if after is not None and after.replace(".", "", 1).isdigit():
            return min(float(after), self.max_backoff_s)
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * rng.uniform(0.5, 1.0)


@dataclass
class Answer:
    """The final response of a request and the attempts it took."""

    response: httpx.Response
    attempts: int


def _not_sent(error: httpx.TransportError, attempts: int) -> RequestFailed:
    return RequestFailed(
        f"request not sent, and not retried (a retry cannot fix it): {error!r}", None, attempts
    )


def _body(payload: dict[str, Any] | bytes) -> dict[str, Any]:
    if isinstance(payload, bytes):
        return {"content": payload, "headers": {"content-type": "application/json"}}
    return {"json": payload}


def _vectors(answer: Answer) -> list[list[float]]:
    response = answer.response
    if response.status_code != 200:
        raise RequestFailed(
            f"HTTP {response.status_code} after {answer.attempts} attempt(s): {response.text}",
            response.status_code,
            answer.attempts,
        )
    return [d["embedding"] for d in response.json()["data"]]


class EmbeddingClient:
    """Blocking client with retries; use as a context manager or call :meth:`close`."""

    def __init__(self, base_url: str, policy: RetryPolicy | None = None, **httpx_kwargs: Any):
        self.policy = policy or RetryPolicy()
        self._rng = random.Random(self.policy.seed)
        self._http = httpx.Client(base_url=base_url, timeout=self.policy.timeout_s, **httpx_kwargs)

    def post(self, path: str, payload: dict[str, Any] | bytes) -> Answer:
        """POST ``payload`` (a JSON mapping or encoded bytes), retrying per the policy.

        Returns the first non-retryable response, or the last one; raises `RequestFailed` when the
        last attempt got no response at all, or at once when the request cannot be sent.
        """
        for attempt in range(self.policy.attempts):
            response = None
            try:
                response = self._http.post(path, **_body(payload))
                if response.status_code not in RETRY_STATUS:
                    return Answer(response, attempt + 1)
            except RETRY_ERRORS as exc:
                error = exc
            except httpx.TransportError as exc:
                raise _not_sent(exc, attempt + 1) from exc
            if attempt + 1 < self.policy.attempts:
                time.sleep(self.policy.delay(attempt, response, self._rng))
        if response is not None:
            return Answer(response, self.policy.attempts)
        raise RequestFailed(
            f"no answer after {self.policy.attempts} attempts: {error!r}",
            None,
            self.policy.attempts,
        )

    def embed(self, items: list[dict[str, Any]]) -> list[list[float]]:
        """The embeddings of ``items``; `RequestFailed` (with the server's detail) otherwise."""
        return _vectors(self.post("/v1/embed", {"items": items}))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEmbeddingClient:
    """The asyncio twin of :class:`EmbeddingClient` (one instance serves many coroutines)."""

    def __init__(self, base_url: str, policy: RetryPolicy | None = None, **httpx_kwargs: Any):
        self.policy = policy or RetryPolicy()
        self._rng = random.Random(self.policy.seed)
        self._http = httpx.AsyncClient(
            base_url=base_url, timeout=self.policy.timeout_s, **httpx_kwargs
        )

    async def post(self, path: str, payload: dict[str, Any] | bytes) -> Answer:
        """As :meth:`EmbeddingClient.post`."""
        for attempt in range(self.policy.attempts):
            response = None
            try:
                response = await self._http.post(path, **_body(payload))
                if response.status_code not in RETRY_STATUS:
                    return Answer(response, attempt + 1)
            except RETRY_ERRORS as exc:
                error = exc
            except httpx.TransportError as exc:
                raise _not_sent(exc, attempt + 1) from exc
            if attempt + 1 < self.policy.attempts:
                await asyncio.sleep(self.policy.delay(attempt, response, self._rng))
        if response is not None:
            return Answer(response, self.policy.attempts)
        raise RequestFailed(
            f"no answer after {self.policy.attempts} attempts: {error!r}",
            None,
            self.policy.attempts,
        )

    async def embed(self, items: list[dict[str, Any]]) -> list[list[float]]:
        """As :meth:`EmbeddingClient.embed`."""
        return _vectors(await self.post("/v1/embed", {"items": items}))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncEmbeddingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
