"""Tools and structured outputs in the worker, independent of the backend.

`format` knows how a model writes a tool call (its template's convention, or Corral's
generic one) and renders tool definitions and tool history into the prompt; `stream` turns
generated text back into OpenAI `tool_calls`, incrementally; `constraint` describes what
the backend's constrained decoding must enforce (each backend compiles it its own way).
"""
