"""Server-sent events: the tokens of a small GPT-2, generated greedily in a ProcessPool,
each sent to the client as soon as the worker produces it.

The model is built from a config with random weights (no download), inside each worker
from a ``ModuleSpec``. A client that disconnects stops the generation in the worker: the
``async for`` is cancelled, the stream closes the generator there, and the worker takes
the next request with its model still loaded.

Run it with ``uvicorn examples.sse_gpt2:app`` (``pip install transformers uvicorn``), then::

    curl -N -X POST localhost:8000/generate -d '{"ids": [1, 2, 3], "max_new_tokens": 20}'
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import aioforward as af

VOCAB = 1000


class GreedyGPT2(torch.nn.Module):
    """A GPT-2 whose forward yields the next token ids one by one (greedy, with a KV cache)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=VOCAB, n_positions=1024, n_embd=128, n_layer=4, n_head=4)
        self.lm = GPT2LMHeadModel(config).eval()

    def forward(self, ids: torch.Tensor, max_new_tokens: int = 32) -> Iterator[int]:
        past = None
        for _ in range(max_new_tokens):
            out = self.lm(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            ids = out.logits[:, -1:].argmax(-1)
            yield int(ids)


spec = af.ModuleSpec(GreedyGPT2, 0)  # each worker builds its own copy, once
pool: af.Pool | None = None


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global pool
    async with af.ProcessPool(workers=2, max_queued=32) as p:
        await p.warmup(spec)  # start the workers before the first request
        pool = p
        yield
    pool = None


async def generate(request: Request) -> StreamingResponse | JSONResponse:
    body = await request.json()
    ids = torch.tensor([body["ids"]], dtype=torch.long)
    if ids.numel() == 0 or int(ids.max()) >= VOCAB or int(ids.min()) < 0:
        return JSONResponse({"error": f"ids must be 0..{VOCAB - 1}"}, status_code=400)
    assert pool is not None
    try:
        tokens = pool.stream(spec, ids, max_new_tokens=int(body.get("max_new_tokens", 32)))
    except af.QueueFullError:
        return JSONResponse({"error": "busy"}, status_code=503)

    async def events() -> AsyncIterator[str]:
        # A disconnect cancels this generator; `async with` closes the stream, which
        # closes the generation in the worker.
        async with tokens:
            async for token in tokens:
                yield f"data: {json.dumps(token)}\n\n"
        yield "event: end\ndata: {}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def stats(request: Request) -> JSONResponse:
    assert pool is not None
    s = pool.stats()
    return JSONResponse({"busy": s.busy, "cancelled": s.cancelled, "restarts": s.restarts})


app = Starlette(
    routes=[Route("/generate", generate, methods=["POST"]), Route("/stats", stats)],
    lifespan=lifespan,
)
