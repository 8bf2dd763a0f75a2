"""The Serve application for real: a local Ray, the app on a loopback port, HTTP with httpx.

One application serves the whole module (starting Ray and Serve takes most of its time).
"""

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from encoded import b64, png, wav

from jin_data import ShardDataset, list_shards
from jin_orchestrate.inference import EmbeddingModel

pytestmark = pytest.mark.slow

MAX_BYTES = 400_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def client(ray_local, checkpoint):
    from ray import serve

    from jin_orchestrate.serve import start
    from jin_orchestrate.serving import ServeConfig

    # A long batch wait, so concurrent requests surely meet in one batch.
    cfg = ServeConfig(
        checkpoint=str(checkpoint),
        max_batch_size=16,
        batch_wait_timeout_s=0.05,
        max_items=16,
        max_batch_items=24,
        max_request_bytes=MAX_BYTES,
    )
    url = start(cfg, port=_free_port())
    with httpx.Client(base_url=url, timeout=120) as http:
        yield http
    serve.shutdown()


def _items(seed: int = 0) -> list[dict]:
    """Items of every modality, of different sizes, so a batch of them is padded."""
    rng = np.random.default_rng(seed)
    return [
        {"modality": "text", "data": "the number 42"},
        {"modality": "text", "data": "seven"},
        {"modality": "image", "data": b64(png(64, 64, seed))},
        {"modality": "image", "data": b64(png(21, 37, seed + 1))},
        {"modality": "audio", "data": b64(wav(16000, seed))},
        {"modality": "audio", "data": b64(wav(3000, seed + 1))},
        {"modality": "points", "data": rng.normal(size=(256, 3)).tolist()},
        {"modality": "points", "data": rng.normal(size=(9, 3)).tolist()},
        {"modality": "seven_segment", "data": rng.random(14).tolist()},
    ]


def _post(http: httpx.Client, items: list[dict]) -> tuple[np.ndarray, int]:
    """The embeddings of ``items``, and how many requests shared their forward pass."""
    response = http.post("/v1/embed", json={"items": items})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [d["index"] for d in body["data"]] == list(range(len(items)))
    assert [d["modality"] for d in body["data"]] == [i["modality"] for i in items]
    vectors = np.array([d["embedding"] for d in body["data"]], np.float32)
    return vectors, int(response.headers["X-Jin-Batch-Requests"])


def _embed(http: httpx.Client, items: list[dict]) -> np.ndarray:
    return _post(http, items)[0]


def test_health_modalities_and_openapi(client, checkpoint):
    health = client.get("/healthz").json()
    card = client.get("/v1/modalities").json()
    assert health["status"] == "ok" and health["model_version"] == card["model"]["version"]
    names = [m["name"] for m in card["model"]["modalities"]]
    assert names == ["text", "image", "audio", "points", "seven_segment"]
    assert card["limits"]["max_items"] == 16
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/embed", "/v1/similarity", "/v1/modalities", "/healthz"} <= set(paths)
    assert "413" in paths["/v1/embed"]["post"]["responses"]
    assert "swagger" in client.get("/docs").text.lower()


def test_batched_response_equals_each_item_alone(client):
    items = _items()
    together = _embed(client, items)
    alone = np.concatenate([_embed(client, [item]) for item in items])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_concurrent_requests_batched_together_equal_each_alone(client):
    items = _items(seed=1)
    alone = [_embed(client, [item])[0] for item in items]
    with ThreadPoolExecutor(len(items)) as pool:
        answers = list(pool.map(lambda item: _post(client, [item]), items))
    np.testing.assert_allclose(np.stack([v[0] for v, _ in answers]), np.stack(alone), atol=1e-5)
    assert max(batch for _, batch in answers) > 1, "no two requests met in a batch"


def test_a_batch_over_max_batch_items_is_embedded_in_passes_of_whole_requests(client):
    # 9 text items per request (quick to decode, so concurrent requests meet in one batch);
    # max_batch_items is 24, so a pass holds at most two of them.
    requests = [[{"modality": "text", "data": f"{k} and {i}"} for i in range(9)] for k in range(4)]
    alone = [_embed(client, items) for items in requests]

    def post(items: list[dict]) -> tuple[np.ndarray, int, int]:
        response = client.post("/v1/embed", json={"items": items})
        assert response.status_code == 200, response.text
        vectors = np.array([d["embedding"] for d in response.json()["data"]], np.float32)
        headers = response.headers
        return vectors, int(headers["X-Jin-Batch-Requests"]), int(headers["X-Jin-Batch-Items"])

    shared = 0
    for _ in range(5):  # until two requests meet in a pass; every round checks the limit
        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(post, requests))
        for (vectors, _, _), expected in zip(answers, alone, strict=True):
            np.testing.assert_allclose(vectors, expected, atol=1e-5)
        assert all(items <= 24 and items == 9 * batch for _, batch, items in answers)
        shared = max(batch for _, batch, _ in answers)
        if shared == 2:
            break
    assert shared == 2, "no two requests met in a pass in 5 rounds"


def test_served_vectors_equal_the_training_path(client, checkpoint, corpus_url):
    """NumberWorld's own PNG, WAV, text and points: the vectors of model.embed on its batch."""
    modalities = ["text", "image", "audio", "points"]
    data = ShardDataset(
        corpus_url, batch_size=4, shuffle=False, modalities=modalities, rank=0, world_size=1
    )
    batch = next(iter(data))
    with torch.no_grad():
        expected = EmbeddingModel.from_checkpoint(checkpoint, device="cpu").model.embed(batch)
    fs, shards = list_shards(corpus_url)
    with fs.open(shards[0].path, "rb") as f:
        rows = {r["id"]: r for r in pq.read_table(f).to_pylist()}
    items = []
    for sample_id in batch["id"]:
        row = rows[sample_id]
        items += [
            {"modality": "text", "data": row["text"]},
            {"modality": "image", "data": b64(row["image"])},
            {"modality": "audio", "data": b64(row["audio"]["bytes"])},
            {"modality": "points", "data": row["points"]},
        ]
    served = _embed(client, items).reshape(len(batch["id"]), len(modalities), -1)
    for k, m in enumerate(modalities):
        np.testing.assert_allclose(served[:, k], expected[m].numpy(), atol=1e-5, err_msg=m)


def test_similarity_is_the_cosine_of_the_embeddings(client):
    queries, candidates = _items()[:2], _items()[2:5]
    response = client.post("/v1/similarity", json={"queries": queries, "candidates": candidates})
    assert response.status_code == 200, response.text
    scores = np.array(response.json()["scores"])
    expected = _embed(client, queries) @ _embed(client, candidates).T
    np.testing.assert_allclose(scores, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("body", "status", "loc", "message"),
    [
        (
            {"items": [{"modality": "smell", "data": "x"}]},
            422,
            ["body", "items", 0, "modality"],
            "unknown modality 'smell'",
        ),
        (
            {"items": [{"modality": "text", "data": "ok"}, {"modality": "image", "data": "%%%"}]},
            422,
            ["body", "items", 1, "data"],
            "not valid base64",
        ),
        (
            {"items": [{"modality": "image", "data": b64(b"\x89PNG\r\n\x1a\n broken")}]},
            422,
            ["body", "items", 0, "data"],
            "image",
        ),
        (
            {"items": [{"modality": "audio", "data": b64(b"not a sound file at all")}]},
            422,
            ["body", "items", 0, "data"],
            "audio",
        ),
        (
            {"items": [{"modality": "points", "data": [[1.0, 2.0]]}]},
            422,
            ["body", "items", 0, "data"],
            "rows of 3 numbers",
        ),
        (
            {"items": [{"modality": "seven_segment", "data": [1.0] * 3}]},
            422,
            ["body", "items", 0, "data"],
            "expected 14 numbers, received 3",
        ),
        (
            {
                "queries": [{"modality": "text", "data": "a"}],
                "candidates": [{"modality": "points", "data": [[1e39, 0.0, 0.0]]}],
            },
            422,
            ["body", "candidates", 0, "data"],
            "NaN, Inf or beyond",
        ),
        (
            {"items": [{"modality": "text", "data": "a"}] * 17},
            413,
            ["body", "items"],
            "17 items is over the limit of 16",
        ),
        (
            {"items": [{"modality": "text", "data": "a"}], "extra": 1},
            422,
            ["body", "extra"],
            "Extra inputs",
        ),
        ({"items": []}, 422, ["body", "items"], "at least 1"),
    ],
)
def test_a_bad_request_is_a_located_4xx_and_the_server_keeps_serving(
    client, body, status, loc, message
):
    route = "/v1/similarity" if "queries" in body else "/v1/embed"
    response = client.post(route, json=body)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert any(d["loc"] == loc and message in d["msg"] for d in detail), detail
    _embed(client, [{"modality": "text", "data": "still serving"}])


def test_non_finite_json_numbers_are_a_422(client):
    body = '{"items": [{"modality": "seven_segment", "data": [NaN' + ", 1.0" * 13 + "]}]}"
    response = client.post("/v1/embed", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "NaN, Inf" in response.json()["detail"][0]["msg"]
    response = client.post(
        "/v1/embed", content="{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422


def test_a_body_over_the_limit_is_a_413_declared_or_streamed(client):
    text = "x" * MAX_BYTES
    response = client.post("/v1/embed", json={"items": [{"modality": "text", "data": text}]})
    assert response.status_code == 413
    assert "max_request_bytes" in response.json()["detail"][0]["msg"]

    def chunks():
        payload = json.dumps({"items": [{"modality": "text", "data": text}]}).encode()
        for start in range(0, len(payload), 65536):
            yield payload[start : start + 65536]

    response = client.post(
        "/v1/embed", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    _embed(client, [{"modality": "text", "data": "still serving"}])
