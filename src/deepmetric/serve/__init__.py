"""`deepmetric serve`: embed and search a trained run over HTTP, with a page to browse results.

The service loads the run's model and index once and answers:

    GET  /health                 {"status": "ok", "items": ..., "embedding_dim": ..., ...}
    GET  /                       the search page (upload or pick a query, see the neighbours)
    GET  /items?offset=0&limit=60  items of the index: id, label, name, thumbnail URL
    GET  /items/{id}/image.png   an item's image (image data sets)
    POST /embed                  images (multipart field "image", repeatable) or JSON
                                 {"features": [[...], ...]}: {"embeddings": [[...], ...]}
    POST /search                 one query: an image (multipart "image", optional field "k"),
                                 JSON {"features": [...], "k": 5} or JSON {"id": 12, "k": 5};
                                 {"query": {...}, "neighbours": [{"rank", "id", "label",
                                 "name", "distance", "image"}, ...]}

A query by id leaves the item itself out of its neighbours. Bad requests get a 4xx status and
{"detail": "what is wrong and what to send instead"}: 400 (malformed JSON, not an image, no
query), 404 (unknown item id or path), 413 (upload or image too large), 415 (content type),
422 (k out of range, a feature row of the wrong length, an image sent to a feature model).

FastAPI and uvicorn come with the ``serve`` extra: ``pip install 'deepmetric[serve]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deepmetric.inference import Run, load_run

__all__ = ["ServeError", "create_app", "serve"]

_SERVE_EXTRA = (
    "deepmetric serve needs the serve extra: pip install 'deepmetric[serve]' "
    "(fastapi, uvicorn and python-multipart)"
)


class ServeError(RuntimeError):
    """The service cannot start (a missing optional dependency)."""


def _require_fastapi() -> None:
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401  (form uploads)
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ServeError(f"{_SERVE_EXTRA} ({error})") from error


def create_app(run: Run) -> Any:
    """The FastAPI application serving ``run`` (the routes are listed above).

    It reads the run's index once; inference runs in worker threads, one request at a time.
    """
    _require_fastapi()
    from deepmetric.serve.app import build_app

    return build_app(run)


def serve(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    checkpoint: str = "best",
    log_level: str = "info",
) -> None:
    """Load the run ``run_dir`` once and serve it on http://HOST:PORT until interrupted."""
    _require_fastapi()
    import uvicorn

    app = create_app(load_run(run_dir, checkpoint=checkpoint))
    uvicorn.run(app, host=host, port=port, log_level=log_level)
