"""Corral's wire: the types and HTTP helpers that the worker and the gateway both speak.

`openai` (requests and response builders), `errors` (OpenAI-shaped errors), `status` (a
worker's `/status` and join), `sse` (event framing), `http` (JSON responses, body reading
and the error handlers for a FastAPI app). Nothing here imports a backend.
"""
