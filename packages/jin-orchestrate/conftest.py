"""Fixtures for the Python examples of README.md, run as tests by pytest-markdown-docs."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import httpx
import pytest

from jin_orchestrate.serving.api import Embedding, EmbedRequest, EmbedResponse


@pytest.fixture
def espeak_ng() -> None:
    """For an example that synthesises speech: skip where espeak-ng is missing, as jin-data's
    NumberWorld tests do; CI installs it (scripts/setup.sh), so there a missing one fails."""
    if shutil.which("espeak-ng") is None and not os.environ.get("CI"):
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")


@pytest.fixture
def embedding_service(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every ``httpx.Client`` made in the example talks to a stand-in for ``POST /v1/embed``.

    The stand-in parses the request and builds its answer with the service's own request and
    response models (`jin_orchestrate.serving.api`), and answers the first attempt 503 with
    ``Retry-After: 0``, as a replica lost mid-request does, so the client's retry runs too.
    """
    attempts = []

    def answer(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        if request.method != "POST" or request.url.path != "/v1/embed":
            return httpx.Response(404, json={"detail": []})
        if len(attempts) == 1:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"detail": []})
        items = EmbedRequest.model_validate_json(request.content).items
        data = [
            Embedding(index=i, modality=item.modality, embedding=[1.0, 0.0, 0.0, 0.0])
            for i, item in enumerate(items)
        ]
        body = EmbedResponse(model_version="000000000000", dim=4, data=data)
        return httpx.Response(200, json=body.model_dump())

    class StandInClient(httpx.Client):
        def __init__(self, **kwargs):
            super().__init__(transport=httpx.MockTransport(answer), **kwargs)

    monkeypatch.setattr(httpx, "Client", StandInClient)
    yield
    assert len(attempts) == 2, "the example should have sent one request and one retry"
