"""OpenAI-compatible HTTP server (`ktinject serve`) with conversation-history KV reuse.

The CLI calls `add_serve_arguments` and `run_serve`; code that already holds an engine builds the
app itself with `ktinject.server.app.create_app(engine, tokenizer, ServeConfig(...))`.

Modules: `launch` (flags, config file, start-up), `app` (routes), `handler` (one request from
body to response), `scheduler` (slots, continuous batching, the only user of the engine),
`sequence` (one request's generation state), `context` (context-length policy), `prompts`,
`schemas`, `formats` (wire shapes), `delivery` (events from the scheduler to waiting requests),
`errors`, `auth`, `metrics`, `background` (in-process server).
"""

from ktinject.server.launch import add_serve_arguments, run_serve

__all__ = ["add_serve_arguments", "run_serve"]
