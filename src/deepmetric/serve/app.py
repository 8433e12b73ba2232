"""The FastAPI application of `deepmetric serve` (see `deepmetric.serve` for its routes)."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable
from importlib.resources import files
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image

from deepmetric._validation import error_reason
from deepmetric.inference import Neighbour, Run

__all__ = ["MAX_IMAGE_PIXELS", "MAX_ROWS", "MAX_UPLOAD_BYTES", "build_app"]

MAX_UPLOAD_BYTES = 8 << 20
"""Largest request body accepted (8 MiB)."""
MAX_IMAGE_PIXELS = 40_000_000
"""Largest uploaded image, in pixels (width x height), before it is decoded."""
MAX_ROWS = 4096
"""Most items one /embed request may hold."""


class _BadRequest(Exception):
    """A request the service refuses: its HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def build_app(run: Run) -> FastAPI:
    """The FastAPI application serving ``run`` (`deepmetric.serve` lists the routes).

    Inference runs in worker threads, one request at a time (the model and index are shared).
    """
    app = FastAPI(title=f"deepmetric: {run.root.name}", docs_url=None, redoc_url=None)
    lock = threading.Lock()
    page = files("deepmetric.serve").joinpath("page.html").read_text(encoding="utf-8")
    labels = run.item_labels  # reads the index and its labels once, before serving
    images_available = _images_available(run)

    async def locked(function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in a worker thread, alone; invalid inputs become a 422."""

        def call() -> Any:
            with lock:
                try:
                    return function(*args)
                except (ValueError, TypeError) as error:  # the inference API's input checks
                    raise _BadRequest(422, str(error)) from error

        return await run_in_threadpool(call)

    @app.exception_handler(_BadRequest)
    async def bad_request(request: Request, error: _BadRequest) -> JSONResponse:
        return JSONResponse({"detail": error.message}, status_code=error.status)

    def image_url(item: int) -> str | None:
        return f"/items/{item}/image.png" if images_available else None

    def item_record(item: int) -> dict[str, Any]:
        label = int(labels[item])
        return {"id": item, "label": label, "name": run.class_name(label), "image": image_url(item)}

    def neighbour_record(neighbour: Neighbour) -> dict[str, Any]:
        return {
            "rank": neighbour.rank,
            "id": neighbour.id,
            "label": neighbour.label,
            "name": neighbour.name,
            "distance": neighbour.distance,
            "image": image_url(neighbour.id),
        }

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "run": str(run.root),
            "items": len(run.index),
            "embedding_dim": run.index.dim,
            "input_shape": list(run.input_shape),
            "takes_images": run.takes_images,
            "images": images_available,
            "distance": run.config.eval.distance,
            "max_k": len(run.index) - 1,
        }

    @app.get("/", response_class=HTMLResponse)
    def search_page() -> str:
        return page

    @app.get("/items")
    def items(offset: str = "0", limit: str = "60") -> dict[str, Any]:
        start = _integer(offset, "offset", 0, len(run.index) - 1)
        count = _integer(limit, "limit", 1, 1000)
        ids = range(start, min(start + count, len(run.index)))
        return {"total": len(run.index), "items": [item_record(i) for i in ids]}

    @app.get("/items/{item}/image.png")
    async def item_image(item: str) -> Response:
        if not images_available:
            raise _BadRequest(404, f"the items of {run.root.name} have no images to show")
        image = (await locked(run.item_images, [_item_id(item, len(run.index))]))[0]
        return Response(_png(image), media_type="image/png")

    @app.post("/embed")
    async def embed(request: Request) -> dict[str, Any]:
        kind, body = await _read_body(request)
        if kind == "form":
            inputs = await _form_images(body, run, many=True)
        else:
            inputs = _json_features(body, many=True)
        embeddings = await locked(run.embed, inputs)
        return {"embeddings": embeddings.tolist(), "dim": int(embeddings.shape[1])}

    @app.post("/search")
    async def search(request: Request) -> dict[str, Any]:
        kind, body = await _read_body(request)
        if kind == "form":
            query = await _form_images(body, run, many=False)
            k = _form_k(body, len(run.index))
            found = await locked(run.search, query, k)
            described: dict[str, Any] = {"kind": "image"}
        elif "id" in body:
            item = _item_id(body["id"], len(run.index))
            k = _json_k(body, len(run.index) - 1)
            found = await locked(run.search_items, [item], k)
            described = {"kind": "id", **item_record(item)}
        else:
            query = _json_features(body, many=False)
            k = _json_k(body, len(run.index))
            found = await locked(run.search, query, k)
            described = {"kind": "features"}
        neighbours = [neighbour_record(n) for n in found[0]]
        return {"query": described, "k": k, "neighbours": neighbours}

    return app


def _images_available(run: Run) -> bool:
    """Whether the index's items have images to show (image data that can be read)."""
    if not run.takes_images:
        return False
    try:
        run.items()
    except (OSError, ValueError):  # the data moved or the index holds other items
        return False
    return True


async def _read_body(request: Request) -> tuple[str, Any]:
    """("form", form data) or ("json", a dict), within MAX_UPLOAD_BYTES."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_UPLOAD_BYTES:
        raise _BadRequest(413, f"the request has {length} bytes; the limit is {MAX_UPLOAD_BYTES}")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return "form", await request.form(max_files=MAX_ROWS, max_fields=8)
    if content_type != "application/json":
        raise _BadRequest(
            415,
            f"content type {content_type or 'none'!r} is not accepted: send multipart/form-data "
            'with an image file field "image", or application/json such as '
            '{"features": [...], "k": 5} or {"id": 12, "k": 5}',
        )
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_UPLOAD_BYTES:
            raise _BadRequest(413, f"the request is larger than {MAX_UPLOAD_BYTES} bytes")
    try:
        body = json.loads(raw)
    except ValueError as error:
        raise _BadRequest(400, f"the body is not valid JSON ({error})") from error
    if not isinstance(body, dict):
        raise _BadRequest(400, 'send a JSON object, e.g. {"features": [...], "k": 5}')
    return "json", body


async def _form_images(form: Any, run: Run, many: bool) -> list[Image.Image] | Image.Image:
    """The uploaded images of the form field "image" (one unless ``many``)."""
    uploads = [value for value in form.getlist("image") if hasattr(value, "read")]
    if not uploads:
        raise _BadRequest(400, 'no image: send the query as a file in the form field "image"')
    if not many and len(uploads) > 1:
        raise _BadRequest(422, f"send one image per search, not {len(uploads)}")
    if not run.takes_images:
        raise _BadRequest(
            422,
            f"this run embeds feature rows of length {run.input_shape[0]}, not images: send "
            'JSON {"features": [...]}',
        )
    images = []
    for upload in uploads:
        data = await upload.read(MAX_UPLOAD_BYTES + 1)
        images.append(_open_image(data, upload.filename or "the upload"))
    return images if many else images[0]


def _open_image(data: bytes, name: str) -> Image.Image:
    """Decode an uploaded image, refusing non-images and images too large to decode."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise _BadRequest(413, f"{name!r} is larger than {MAX_UPLOAD_BYTES} bytes")
    if not data:
        raise _BadRequest(400, f"{name!r} is empty: send a PNG or JPEG image")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise _BadRequest(
                413, f"{name!r} has {width}x{height} pixels; the limit is {MAX_IMAGE_PIXELS}"
            )
        image.load()
    except Image.DecompressionBombError as error:
        raise _BadRequest(413, f"{name!r} has too many pixels ({error})") from error
    except Image.UnidentifiedImageError as error:
        raise _BadRequest(
            400, f"{name!r} is not an image (no format Pillow knows): send a PNG or JPEG"
        ) from error
    except (OSError, SyntaxError, ValueError) as error:  # truncated or damaged
        reason = error_reason(error)
        raise _BadRequest(
            400, f"{name!r} is not an image Pillow can read ({reason}): send a PNG or JPEG"
        ) from error
    return image


def _json_features(body: dict[str, Any], many: bool) -> np.ndarray:
    """The "features" of a JSON body as a float32 array (a row, rows, or model inputs)."""
    if "features" not in body:
        raise _BadRequest(
            400,
            'no query: send {"features": [...]} (a feature row, or an array of the model\'s '
            "input shape)" + ("" if many else ', {"id": 12} or an image upload'),
        )
    try:
        features = np.asarray(body["features"], dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise _BadRequest(
            422, f"features must be a rectangular array of numbers ({error})"
        ) from error
    if features.size > MAX_ROWS * 65536:
        raise _BadRequest(413, "features holds too many numbers")
    return features


def _integer(value: Any, name: str, low: int, high: int) -> int:
    """``value`` (an int, or a string of digits) checked to lie in [low, high]."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _BadRequest(422, f"{name} must be an integer from {low} to {high}, got {value!r}")
    return value


def _item_id(value: Any, total: int) -> int:
    """An item id of the index; unknown ids are a 404."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadRequest(422, f"id must be an integer item id, got {value!r}")
    if not 0 <= value < total:
        raise _BadRequest(404, f"no item {value}: the index holds items 0 to {total - 1}")
    return value


def _json_k(body: dict[str, Any], limit: int) -> int:
    return _integer(body.get("k", min(5, limit)), "k", 1, limit)


def _form_k(form: Any, limit: int) -> int:
    return _integer(form.get("k", str(min(5, limit))), "k", 1, limit)


def _png(image: np.ndarray) -> bytes:
    """A (C, H, W) image in [0, 1] as PNG bytes at its own size (the page enlarges it), so
    a downloaded item searches as itself."""
    pixels = np.clip(np.rint(np.moveaxis(image, 0, -1) * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(buffer, "PNG")
    return buffer.getvalue()
