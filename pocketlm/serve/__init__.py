"""`pocketlm serve`: an OpenAI-compatible HTTP server, a Prometheus /metrics page and a web chat page.

    config.py         ServerConfig (no torch)
    protocol.py       the native request and event types: what the worker understands
    openai_compat.py  OpenAI's JSON <-> the native types (validation, responses, stream chunks)
    constrain.py      token masks from a JSON schema or a tool list (llguidance)
    scheduler.py      loaded models (LRU) and the worker thread that batches requests (continuous batching)
    metrics.py        Prometheus counters and histograms
    guard.py          who may call: the Origin and Host checks, the API key (an ASGI middleware)
    openapi.py        the server's own OpenAPI description, served at /openapi.json
    app.py            the HTTP routes (Starlette/FastAPI + uvicorn)
    static/           the web chat page, served from here (no CDN)

Data flows one way: app -> openai_compat -> protocol <- scheduler -> engine. The engine never sees HTTP.
"""
