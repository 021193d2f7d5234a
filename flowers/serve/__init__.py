"""`flowers serve`: an exported model behind a Vertex AI / TF Serving compatible HTTP server.

settings  what to serve and how (checked before a port is bound or a model loaded)
service   the model: opened with flowers.export.runtimes, warmed up, run on padded batches
payload   request bodies -> images, decoded and resized by flowers.data exactly as training did
batcher   the micro-batcher (concurrent requests -> one model call) and the admission limit
app       the FastAPI app: routes, JSON errors, Prometheus metrics, lifespan (load, warm up, drain)
server    uvicorn on a socket bound here, one model per worker process, graceful SIGTERM
loadtest  closed-loop HTTP clients; bench  `flowers bench-serve`, every runtime under load
"""
