"""The search service: one shared `Retriever` behind HTTP, and a page to try queries at `/`.

    python -m pipeline.serve [--run DIR] [--host 127.0.0.1] [--port 8000] [--config configs/mini.yaml]
    curl 'http://127.0.0.1:8000/search?q=what+is+the+capital+of+australia&k=3'
    curl -X POST http://127.0.0.1:8000/search -H 'content-type: application/json' \\
         -d '{"queries": ["do goldfish grow", "wifi vs bluetooth"], "k": 3}'

Endpoints: GET/POST /search, GET /health (run, fingerprints, corpus size, serving settings), GET /docs
(OpenAPI). A client error is answered 4xx with {"error": ..., "field": ...}; a server fault is logged with
its traceback and answered 500 without it. The limits (k, depth, query length, batch, body size) come from
the `serve` section of the config.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any, Sequence

try:
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel, ConfigDict, StrictInt
    from starlette.exceptions import HTTPException
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(f"pipeline.serve needs the serve extra: pip install -e '.[serve]' ({exc})") from exc

from irbase.artifacts import ArtifactError
from irbase.config import ConfigError, add_config_args, load_section

LOG = logging.getLogger("pipeline.serve")


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_k: int = 100               # results per query
    max_depth: int = 200           # candidates a request may ask to rerank
    max_query_chars: int = 1000    # longer queries are refused (the models truncate far earlier)
    max_batch: int = 16            # queries in one POST
    max_body_bytes: int = 65536    # a larger request body is refused before it is read in full
    warmup: int = 3                # searches before the first request, so it is not the slow one


class SearchBody(BaseModel):
    """POST /search: one query (`query`) or a batch (`queries`); unknown fields are refused."""
    model_config = ConfigDict(extra="forbid")
    query: Any = None
    queries: list[Any] | None = None
    k: StrictInt = 10
    depth: StrictInt | None = None


class ClientError(Exception):
    """Bad input: answered with `status` and a message that names the field."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


def check_request(queries: list[Any], k: Any, depth: Any, config: ServeConfig, field: str) -> None:
    """The service's limits on top of the Retriever's own checks; `field` names the query field."""
    if not queries:
        raise ClientError(field, "no query given")
    if len(queries) > config.max_batch:
        raise ClientError(field, f"{len(queries)} queries in one request; at most {config.max_batch}")
    for i, query in enumerate(queries):
        where = field if len(queries) == 1 and field != "queries" else f"{field}[{i}]"
        if not isinstance(query, str):
            raise ClientError(where, f"must be a string, got {type(query).__name__}")
        if not query.strip():
            raise ClientError(where, "is empty or whitespace only")
        if len(query) > config.max_query_chars:
            raise ClientError(where, f"{len(query)} characters; at most {config.max_query_chars}")
    _check_int("k", k, 1, config.max_k)
    if depth is not None:
        _check_int("depth", depth, 0, config.max_depth)


def _check_int(field: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ClientError(field, f"must be an integer, got {json.dumps(value) if _jsonable(value) else value!r}")
    if not low <= value <= high:
        raise ClientError(field, f"must be between {low} and {high}, got {value}")


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def answer(retriever, query: str, k: int, depth: int | None) -> dict:
    response = retriever.search_detailed(query, k, depth)
    return {"results": [asdict(r) for r in response.results], "timings_ms": response.timings_ms,
            "reranked": response.reranked, "depth": response.depth, "cut_by_deadline": response.cut_by_deadline}


def health(retriever) -> dict:
    record = retriever.record
    return {"status": "ok", "run_dir": str(retriever.run_dir), "fingerprints": record.fingerprints,
            "corpus": {"passages": len(retriever.store) if retriever.store is not None else 0,
                       "collection": (record.corpus or {}).get("collection")},
            "serving": asdict(retriever.serving)}


def page() -> str:
    return resources.files("pipeline").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(retriever, config: ServeConfig):
    """The FastAPI application over one `Retriever` (thread-safe: requests run in the thread pool)."""
    app = FastAPI(title="msmarco-rerank search", description=__doc__.split("\n\n")[0])
    app.add_middleware(RequestLog)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    @app.exception_handler(ClientError)
    def client_error(request: Request, exc: ClientError):
        return JSONResponse({"error": exc.message, "field": exc.field}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        field = ".".join(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc) or "body"
        if first.get("type") == "json_invalid":
            return JSONResponse({"error": f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                                 "field": "body"}, status_code=400)
        return JSONResponse({"error": first["msg"], "field": field}, status_code=422)

    @app.exception_handler(HTTPException)
    def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail), "field": None}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    def server_fault(request: Request, exc: Exception):
        LOG.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal server error (logged on the server)", "field": None},
                            status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page()

    @app.get("/health")
    def get_health() -> dict:
        return health(retriever)

    @app.get("/search")
    def get_search(q: str = Query(..., description="the query"), k: int = 10,
                   depth: int | None = Query(None, description="candidates to rerank (default: the run's)")) -> dict:
        check_request([q], k, depth, config, "q")
        return answer(retriever, q, k, depth)

    @app.post("/search")
    def post_search(body: SearchBody) -> dict:
        if (body.query is None) == (body.queries is None):
            raise ClientError("query", "give exactly one of `query` (a string) or `queries` (a list)")
        field, queries = ("query", [body.query]) if body.queries is None else ("queries", body.queries)
        check_request(queries, body.k, body.depth, config, field)
        if body.queries is None:
            return answer(retriever, body.query, body.k, body.depth)
        return {"responses": [answer(retriever, q, body.k, body.depth) for q in queries]}

    return app


class RequestLog:
    """One log line per request: method, path, status, latency."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            LOG.info("%s %s %d %.1f ms", scope["method"], scope["path"], status[0],
                     (time.perf_counter() - start) * 1000.0)


class BodyLimit:
    """Refuse a request body over `max_bytes` with 413, by its Content-Length or while it streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send)
        # Read the body here (at most max_bytes of it) and replay it: an exception raised while the
        # application reads would be turned into its own 400 by FastAPI's body parser.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send)
            more = message.get("more_body", False)
        replayed = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return replayed.pop() if replayed else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send):
        body = json.dumps({"error": f"request body over {self.max_bytes} bytes", "field": "body"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="run directory (default: $MSMARCO_RERANK_RUN or runs/mini)")
    parser.add_argument("--host", help="default: serve.host")
    parser.add_argument("--port", type=int, help="default: serve.port (0: any free port)")
    add_config_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_section(args.config, "serve", ServeConfig, args.overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    import uvicorn

    from pipeline.retriever import Retriever

    try:
        retriever = Retriever(args.run)
    except (ArtifactError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    retriever.warmup(config.warmup)
    app = create_app(retriever, config)
    host = args.host or config.host
    port = config.port if args.port is None else args.port
    # uvicorn stops taking requests on SIGTERM/SIGINT and finishes those in flight, then re-raises the
    # signal to the handler it found: this one, so the process exits 0 after a clean stop.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, frame: LOG.info("stopping on %s", signal.Signals(number).name))
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="info", workers=1)
    LOG.info("shut down cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
