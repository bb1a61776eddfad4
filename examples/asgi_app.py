"""A Starlette endpoint that awaits run_parallel and stays responsive meanwhile.

Run it with any ASGI server, e.g. ``uvicorn examples.asgi_app:app``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import aioforward as af

torch.manual_seed(0)
text_tower = torch.nn.Sequential(
    torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 64)
)
image_tower = torch.nn.Sequential(
    torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 64)
)
pool: af.Pool | None = None


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global pool
    async with af.ThreadPool(workers=2, max_queued=64) as p:  # back-pressure: 503 past 64 waiting
        pool = p
        yield
    pool = None


async def similarity(request: Request) -> JSONResponse:
    body = await request.json()
    x = torch.tensor(body["features"], dtype=torch.float32).reshape(1, 256)
    assert pool is not None
    try:
        a, b = await af.run_parallel(text_tower, image_tower, x, pool=pool, timeout=5.0)
    except af.QueueFullError:
        return JSONResponse({"error": "busy"}, status_code=503)
    return JSONResponse({"similarity": float(torch.cosine_similarity(a, b).item())})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


app = Starlette(
    routes=[Route("/similarity", similarity, methods=["POST"]), Route("/health", health)],
    lifespan=lifespan,
)
