"""The HTTP routes: Starlette on uvicorn.

Starlette rather than FastAPI's layer on top of it: the request bodies are checked by openai_compat.py so
that every mistake gets OpenAI's error shape and names its field, which leaves FastAPI's pydantic
validation nothing to do. A route reads the body, asks openai_compat for a native request, hands it to
the worker as a Job and turns the Job's events back into JSON or server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pocketlm import named, registry
from pocketlm.errors import PocketLMError
from pocketlm.serve import openai_compat as oa
from pocketlm.serve import ollama_compat, openapi
from pocketlm.serve.config import ServerConfig
from pocketlm.serve.guard import Guard
from pocketlm.serve.metrics import Metrics
from pocketlm.serve.protocol import Done, Embedded, Failed, Finished, Started
from pocketlm.serve.scheduler import Job, ModelPool, QueueFull, Scheduler

STATIC = Path(__file__).parent / "static"
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics", "/api/ps",
          "/openapi.json", "/", "/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/tags", "/api/show",
          "/api/version", "/api/pull", "/api/create", "/api/copy", "/api/delete")


class SafeJSONResponse(JSONResponse):
    """JSON in ASCII (\\u escapes): a string the client sent, quoted back in a message, cannot fail to encode;
    and a NaN is written as NaN (Python's json reads it) rather than failing the response, as Starlette's would."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def served_models(config: ServerConfig) -> dict[str, tuple[str, str]]:
    """name -> (what to load: a registry name or a path, kind: "chat", "base" or "embed")."""
    if config.adapters and not config.models:
        raise PocketLMError("--lora serves adapters over a base model: name it first (pocketlm serve MODEL --lora NAME=PATH)")
    if not config.models:
        out = {e.name: (e.name, e.kind) for e in registry.ENTRIES if registry.is_installed(e)}
        for record in named.all_named():  # created models (pocketlm create) whose base is installed
            try:
                base = registry.lookup(named.base_of(record.name))
            except PocketLMError:  # records that point to each other: `pocketlm run` names the loop
                continue
            if base is not None and base.name in out:
                out[record.name] = (record.name, base.kind)
        return out
    out = {}
    for ref in config.models:
        name, _ = registry.resolve(ref)  # fails now, with the usual message, for a model that is not there
        entry = registry.lookup(named.base_of(ref))  # a created model's kind is its base's
        out[name] = (ref, entry.kind if entry else "chat")
    return with_adapters(out, config.adapters)


def with_adapters(models: dict[str, tuple[str, str]], adapters: dict[str, str]) -> dict[str, tuple[str, str]]:
    """models plus --lora's adapters, each a model of its own over the first one (ModelPool loads them with it).
    Every adapter is checked now against its base's shapes: one that is not there, or is for another model, fails
    here in one line rather than at its first request."""
    if not adapters:
        return models
    from pocketlm.load import check_adapters

    base, (ref, kind) = next(iter(models.items()))
    if kind == "embed":
        raise PocketLMError(f"--lora: {base} is an embedding model; LoRA adapters are served over a generative model")
    out = dict(models)
    for name, path in adapters.items():
        if name in out:
            raise PocketLMError(f"--lora {name}={path}: {name} is already the name of a served model; give the adapter another")
        out[name] = (ref, kind)
    check_adapters(ref, adapters)
    return out


class ClientGone(Exception):
    pass


class Outbox:
    """The worker's events on their way to the event loop: handed over once per turn of the worker's loop (one
    wake-up of the event loop per decode step, not one per event), after which the worker waits, WAIT_S at most,
    until the streams it woke have written their chunks, before it starts its next step.

    Why wait: on 2 cores the step's two threads meet at a barrier about 150 times a step. The event loop's work for
    a chunk (about 0.2 ms of CPU) done during a step takes a core from one of them, and the other then waits at the
    next barrier: it cost the step about twice its own time. Done between steps, it runs beside the client's
    reading of the chunks it sends, on the core the step leaves idle while the worker samples."""

    WAIT_S = 0.01

    def __init__(self):
        self.loop: asyncio.AbstractEventLoop | None = None  # set by the first request, in the event loop
        self.pending: list[tuple[Job, asyncio.Queue, object]] = []
        self.lock = threading.Lock()
        self.written = threading.Event()

    def put(self, job: Job, events: asyncio.Queue, event) -> None:  # the worker thread
        with self.lock:
            self.pending.append((job, events, event))

    def hand_over(self) -> None:  # the worker thread, at the end of each turn of its loop
        with self.lock:
            if not self.pending:
                return
        self.written.clear()
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            with self.lock:
                jobs, self.pending = {job for job, _, _ in self.pending}, []
            for job in jobs:
                job.cancel()
            return
        self.written.wait(self.WAIT_S)

    def _deliver(self) -> None:  # the event loop
        with self.lock:
            batch, self.pending = self.pending, []
        for _, events, event in batch:
            events.put_nowait(event)
        self.loop.call_soon(self.written.set)  # queued behind the streams just woken: runs once they have written


def create_app(config: ServerConfig) -> Starlette:
    models = served_models(config)
    if config.draft:
        registry.resolve(config.draft)  # a draft that is not there fails now, with the usual message
    names = list(models)
    if config.threads:  # `pocketlm serve` chose them (pocketlm/threads.py: fewer than the cores when others are busy)
        import torch

        torch.set_num_threads(config.threads)
    default_generate = next((n for n, (_, kind) in models.items() if kind != "embed"), None)
    default_embed = next((n for n, (_, kind) in models.items() if kind == "embed"), None)
    metrics = Metrics()
    pool = ModelPool(config, {name: ref for name, (ref, _) in models.items()})
    outbox = Outbox()
    scheduler = Scheduler(config, pool, metrics, hand_over=outbox.hand_over)
    metrics.queue_depth.set_function(scheduler.depth)
    described = openapi.spec(config)

    # ------------------------------------------------------------------------------------ plumbing

    async def read_json(request: Request) -> dict:  # the API key, Host and Origin were checked by guard.Guard
        limit = config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise oa.APIError(413, f"request body is {int(declared)} bytes; this server takes at most {limit}")
        body = bytearray()
        async for part in request.stream():  # a chunked upload has no content-length: count as it comes
            body += part
            if len(body) > limit:
                raise oa.APIError(413, f"request body is over {limit} bytes, the most this server takes")
        return oa.parse_body(bytes(body))

    def observe(event) -> None:  # runs in the worker thread; prometheus_client is thread-safe
        if isinstance(event, Started):
            metrics.prompt_tokens.labels(event.model).inc(event.prompt_tokens)
        elif isinstance(event, Finished):
            metrics.ttft.observe(event.time_to_first_token_s)
            if event.decode_tokens_per_s:
                metrics.decode_rate.observe(event.decode_tokens_per_s)
        elif isinstance(event, Embedded):
            metrics.prompt_tokens.labels(event.model).inc(event.prompt_tokens)

    def submit(request: Request, native, model: str) -> tuple[Job, asyncio.Queue]:
        outbox.loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event):
            observe(event)
            if isinstance(event, Finished):
                metrics.completion_tokens.labels(model).inc(event.completion_tokens)
                metrics.cached_tokens.labels(model).inc(event.cached_tokens)
            outbox.put(job, events, event)

        job = Job(native, emit)
        request.state.checked_at = time.monotonic()
        try:
            scheduler.submit(job)
        except QueueFull as e:
            metrics.rejected.inc()
            raise oa.APIError(429, f"the server is busy ({config.max_queue} requests queued); retry in {e.retry_after_s} s",
                              code="rate_limit_exceeded", headers={"Retry-After": str(e.retry_after_s)}) from None
        return job, events

    async def next_event(request: Request, job: Job, events: asyncio.Queue):
        """The next event, or ClientGone if the client hung up (then the job is cancelled). Asked every
        half second even while events keep coming: a long answer must not outlive its reader."""
        while True:
            now = time.monotonic()
            if now - request.state.checked_at > 0.5:
                request.state.checked_at = now
                if await request.is_disconnected():
                    job.cancel()
                    raise ClientGone
            try:
                return await asyncio.wait_for(events.get(), 0.5)
            except asyncio.TimeoutError:
                pass

    def failed(event: Failed) -> oa.APIError:
        return oa.APIError(event.status, event.message, code=event.code)

    # -------------------------------------------------------------------------------------- routes

    async def generate(request: Request, plan: oa.Plan) -> Response:
        job, events = submit(request, plan.request, plan.request.model)
        finished = False
        try:
            first = await next_event(request, job, events)
            if isinstance(first, Failed):
                finished = True
                raise failed(first)
            if isinstance(first, Done):  # cancelled before it started
                finished = True
                return Response(status_code=499)
            if plan.stream:
                finished = True  # the stream owns the job now
                return StreamingResponse(stream(plan, first, job, events), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            collected = [first]
            while not isinstance(collected[-1], Done):
                collected.append(await next_event(request, job, events))
                if isinstance(collected[-1], Failed):
                    raise failed(collected[-1])
            finished = True
            return SafeJSONResponse(oa.response(plan, collected))
        except ClientGone:
            return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"
        finally:
            if not finished:
                job.cancel()

    async def stream(plan: oa.Plan, started: Started, job: Job, events: asyncio.Queue):
        streamer, complete = oa.Streamer(plan, started), False
        try:
            while True:
                event = await events.get()
                if isinstance(event, Done):
                    break
                if isinstance(event, Failed):  # too late for a status code: say it in the stream
                    yield f"data: {json.dumps(failed(event).body())}\n\n"
                    break
                for chunk in streamer.on(event):
                    yield f"data: {json.dumps(chunk)}\n\n"
            for chunk in streamer.final():
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
            complete = True
        finally:  # the client went away (Starlette cancels this generator) or the stream ended
            if not complete:
                job.cancel()

    async def chat_completions(request: Request) -> Response:
        body = await read_json(request)
        return await generate(request, oa.parse_chat(body, config, names, default_generate))

    async def completions(request: Request) -> Response:
        body = await read_json(request)
        return await generate(request, oa.parse_completion(body, config, names, default_generate))

    async def embeddings(request: Request) -> Response:
        body = await read_json(request)
        native = oa.parse_embedding(body, names, default_embed)
        job, events = submit(request, native, native.model)
        try:
            event = await next_event(request, job, events)
        except ClientGone:
            return Response(status_code=499)
        if isinstance(event, Failed):
            raise failed(event)
        return SafeJSONResponse(oa.embedding_response(event, base64=body.get("encoding_format") == "base64"))

    def model_card(name: str) -> dict:
        card = {"id": name, "object": "model", "created": 0, "owned_by": "pocketlm", "kind": models[name][1]}
        try:  # the sampling defaults a client applies to what it leaves unset (`pocketlm run --server`)
            card["defaults"] = registry.defaults(models[name][0]).params
        except PocketLMError:
            card["defaults"] = {}
        if name in config.adapters:  # a LoRA adapter, as vLLM lists one: its folder and its base model
            card.update(root=config.adapters[name], parent=pool.lora[name])
        return card

    async def list_models(request: Request) -> Response:
        return SafeJSONResponse({"object": "list", "data": [model_card(n) for n in names]})

    async def get_model(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in models:
            raise oa.APIError(404, f"model '{name}' does not exist here; available models: {', '.join(names)}",
                              "model", "model_not_found")
        return SafeJSONResponse(model_card(name))

    async def health(request: Request) -> Response:
        if not request.state.authorized:  # a probe without the key learns only that the server is up
            return SafeJSONResponse({"status": "ok"})
        return SafeJSONResponse({"status": "ok", "models": names, "loaded": [m["name"] for m in pool.snapshot()],
                                 "queue_depth": scheduler.depth()})

    async def metrics_page(request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def openapi_json(request: Request) -> Response:
        return SafeJSONResponse(described)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    # ------------------------------------------------------------------------------------- errors

    # Each handler answers whatever the request held: its messages are ASCII-escaped JSON, and the last one
    # falls back to a fixed body if even that fails.

    async def api_error(request: Request, exc: oa.APIError) -> Response:
        if request.url.path.startswith("/api/"):  # Ollama's routes: Ollama's error shape
            return SafeJSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)
        return SafeJSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: f"no route {request.method} {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return await api_error(request, oa.APIError(exc.status_code, message.get(exc.status_code, str(exc.detail))))

    async def user_error(request: Request, exc: PocketLMError) -> Response:  # a value only the engine could check
        return await api_error(request, oa.APIError(400, str(exc)))

    async def server_error(request: Request, exc: Exception) -> Response:
        try:
            return await api_error(request, oa.APIError(500, f"internal error: {type(exc).__name__}: {exc}"))
        except Exception:
            return Response(b'{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}',
                            status_code=500, media_type="application/json")

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/models", list_models),
            Route("/v1/models/{name:path}", get_model),
            Route("/health", health),
            Route("/metrics", metrics_page),
            *ollama_compat.routes(ollama_compat.Served(config, models, names, pool, read_json, submit, next_event, failed, ClientGone)),
            Route("/openapi.json", openapi_json),
            Route("/", index),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        exception_handlers={oa.APIError: api_error, HTTPException: http_error, PocketLMError: user_error, Exception: server_error},
    )
    app.add_middleware(Guard, config=config)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # added last, so outermost: refused requests count too
    app.state.scheduler, app.state.pool, app.state.metrics = scheduler, pool, metrics
    return app


class MetricsMiddleware:
    """Counts requests by route and status and times them to the last byte: a plain ASGI middleware
    (Starlette's BaseHTTPMiddleware would buffer streams and hide disconnects)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


def serve(config: ServerConfig) -> None:
    import uvicorn

    listening = bind(config.host, config.port)  # a busy port fails here, in one line, before "serving on"
    app = create_app(config)
    print(f"pocketlm: serving {', '.join(app.state.pool.refs)} on http://{config.host}:{config.port} "
          f"(OpenAI API under /v1, Ollama's under /api, chat page at /)", flush=True)
    # A short graceful shutdown: open streams must not keep Ctrl-C waiting.
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    server.run(sockets=[listening])


def bind(host: str, port: int):
    """A listening socket on (host, port), or a PocketLMError saying why not (the port is taken, no such address)."""
    import errno
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise PocketLMError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait for TIME_WAIT
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        sock.close()
        why = f"port {port} is in use (another server is running? pick another with --port)" if e.errno == errno.EADDRINUSE else e.strerror or str(e)
        raise PocketLMError(f"cannot listen on {host}:{port}: {why}") from None
    return sock
