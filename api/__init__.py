"""The HTTP API: `gencli serve`, an ASGI app (FastAPI) over `gencli.worker.client`.

It is an edge like the CLI: it parses a request, calls the client, and turns the client's
domain errors into HTTP statuses in OpenAI's error shape. It never touches the store or Redis
itself. Modules: `app` (the app, its middleware and error mapping), `jobs` (gencli's own routes),
`completions` (OpenAI's completions, chat completions and models), `sse` (event streams that
cancel their job when the client goes away).
"""
