"""A Starlette model server with Prometheus metrics at ``/metrics``.

``POST /predict`` sends one sample through a Batcher (concurrent requests share
a forward pass) running in a thread pool; ``GET /metrics`` serves every open
pool's and Batcher's stats, ready for a Prometheus scrape job. Needs the extra:
``pip install 'aioforward[prometheus]'``. Run it with any ASGI server, e.g.
``uvicorn examples.metrics_app:app``, then::

    curl -s -X POST localhost:8000/predict -d '{"features": [0.1, ...64 numbers]}'
    curl -s localhost:8000/metrics | grep aioforward_
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import prometheus_client
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import aioforward as af
import aioforward.metrics

torch.manual_seed(0)
classifier = torch.nn.Sequential(
    torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
).eval()
batcher: af.Batcher | None = None

aioforward.metrics.register()  # on prometheus_client's default registry; idempotent


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global batcher
    # The pool's name becomes the `pool` label of its series.
    async with af.ThreadPool(workers=2, max_queued=64, name="classifier") as pool:
        async with af.Batcher(classifier, pool, max_batch_size=16) as b:
            batcher = b
            yield
    batcher = None


async def predict(request: Request) -> JSONResponse:
    body = await request.json()
    x = torch.tensor(body["features"], dtype=torch.float32)  # one sample: 64 features
    assert batcher is not None
    try:
        logits = await batcher(x, timeout=5.0)
    except af.QueueFullError:
        return JSONResponse({"error": "busy"}, status_code=503)
    return JSONResponse({"label": int(logits.argmax())})


async def metrics(request: Request) -> Response:
    # A plain route rather than Mount("/metrics", prometheus_client.make_asgi_app()):
    # a Mount answers /metrics with a redirect to /metrics/.
    body = prometheus_client.generate_latest(prometheus_client.REGISTRY)
    return Response(body, media_type=prometheus_client.CONTENT_TYPE_LATEST)


app = Starlette(
    routes=[Route("/predict", predict, methods=["POST"]), Route("/metrics", metrics)],
    lifespan=lifespan,
)
