"""``lofit serve``: one base model, many adapters, an OpenAI-compatible HTTP server (docs/serving.md).

Modules, lowest first: :mod:`.adapters` (the loaded adapters in stacked tables, and the hooks
that give each row of a batch its own), :mod:`.engine` (the bounded queue and the worker that
batches requests whatever their adapters), :mod:`.schemas` (request bodies, JSON errors),
:mod:`.app` (the routes, limits and keys; needs FastAPI) and :mod:`.server` (loading and
uvicorn; needs uvicorn). FastAPI and uvicorn are the optional extra ``lofit[serve]``, so
nothing here is imported by ``import lofit``.
"""
