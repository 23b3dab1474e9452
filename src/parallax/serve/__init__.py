"""``parallax serve``: the OpenAI-compatible HTTP server (docs/serving.md).

    protocol.py  request/response models (OpenAI's wire format) and the error body
    app.py       build_app(llm, model_name, ...) -> FastAPI: the routes, one implementation
    errors.py    exceptions -> status codes and OpenAI error bodies
    metrics.py   Prometheus metrics (vLLM's names, prefix ``parallax:``)
    health.py    engine liveness for /health
    server.py    uvicorn runner with SIGTERM drain; BackgroundServer for tests/benchmarks
    loadgen.py   HTTP load driver for any OpenAI-compatible server
    ray_serve.py the app as a Ray Serve deployment: replicas, autoscaling (docs/scaling.md)
    front.py     the Ray Serve ingress: forwards to replicas, retries a dead one's requests
    prefix_router.py  prefix-aware routing between Ray Serve replicas

Needs the ``serve`` extra (fastapi, uvicorn, prometheus-client); importing this package
alone does not import them.
"""
