"""The draw-a-digit web page and its JSON API, served by Starlette and uvicorn.

    fastconv serve model.npz            # http://127.0.0.1:8000

``GET /`` is a single page (``static/``, every asset served from here: it works offline): a
canvas to draw on with mouse, pen or finger, an upload control, and ten probability bars that
follow the drawing. The page talks to two endpoints that scripts can call too:

``POST /api/predict``
    The raw bytes of a PNG or JPEG as the body (``Content-Type: image/png`` or ``image/jpeg``)
    -> ``{"class": k, "label": "7", "probabilities": [p0, ...], "labels": [...],
    "input": [[...28 floats...], ...]}`` (``input``: what the model saw, in [0, 1]). The image
    goes through :func:`fastconv.preprocess.to_mnist_input` with the model file's size and
    normalisation, as in ``fastconv predict``, so both give the same answer for the same file.
``GET /api/model``
    The loaded model: architecture, classes, input shape, parameter count, metadata.

Bad requests get a 4xx JSON ``{"error": "..."}``: a wrong content type 415, a body over
``max_body`` bytes 413 (from ``Content-Length``, and counted while streaming, before the whole
body is read), an empty body or one that is not a decodable image (including truncated files and
decompression bombs, refused by the preprocessing) 400. Decoding and the model run in the thread
pool, off the event loop (the kernels release the GIL); one lock serialises the model, whose
layers keep their inputs for a backward pass.

Starlette and uvicorn are the optional extra ``pip install "fastconv[serve]"``, imported here
only when an app is built.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import inference, nn

__all__ = [
    "INSTALL_HINT",
    "MAX_BODY",
    "Predictor",
    "create_app",
    "require_dependencies",
    "run",
    "serve_app",
]

MAX_BODY = 5 * 1024 * 1024  # bytes; a phone photo fits, a flood does not
ACCEPTED_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG"}
STATIC = Path(__file__).with_name("static")
INSTALL_HINT = 'the web app needs starlette and uvicorn: pip install "fastconv[serve]"'

log = logging.getLogger("fastconv.serve")


class Predictor:
    """A model, its metadata and a lock: ``predict(image)`` is safe from many threads.

    ``meta`` is a model file's metadata (``classes``, ``input_shape``, ``mean``, ``std``); the
    defaults when a key is missing are those of ``fastconv predict``.
    """

    def __init__(self, model, meta: dict | None = None, name: str = "model"):
        self.model, self.meta, self.name = model, dict(meta or {}), name
        self.image_input = inference.ImageInput.of(self.meta, name, use="the web page")
        self.input_shape = list(self.image_input.shape)
        self.mean, self.std = self.image_input.mean, self.image_input.std
        self._lock = threading.Lock()
        if hasattr(model, "eval"):
            model.eval()
        count = 0
        if self.meta.get("classes") is None:
            with self._lock:
                count = self._probabilities(np.zeros((1, *self.input_shape), np.float32)).shape[1]
        self.classes = inference.class_names(self.meta, count)

    @classmethod
    def load(cls, source) -> Predictor:
        """From a model file path (fastconv's ``.npz`` or an ONNX file), a ``(model, meta)``
        pair such as :func:`fastconv.io.load_model` returns, a Predictor, or a bare model (then
        without class names or normalisation)."""
        if isinstance(source, Predictor):
            return source
        if isinstance(source, (str, os.PathLike)):
            model, meta = inference.load_any_model(source)
            return cls(model, meta, name=Path(source).name)
        if isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], dict):
            return cls(*source)
        if callable(source):
            return cls(source, {})
        raise TypeError(
            "expected a model file path, a (model, meta) pair or a model, "
            f"got {type(source).__name__}"
        )

    def predict(self, image) -> dict[str, Any]:
        """Class probabilities of one image (anything :func:`to_mnist_input` takes).

        Raises ``ValueError`` for an image that cannot be decoded or is too large."""
        x = self.image_input.frame(image)
        with self._lock:
            probabilities = self._probabilities(x[np.newaxis])[0]
        k = int(np.argmax(probabilities))
        seen = np.clip(self.image_input.pixels(x[0]), 0, 1)
        return {
            "class": k,
            "label": self.classes[k],
            "probabilities": [float(p) for p in probabilities],
            "labels": self.classes,
            "input": np.round(seen, 3).tolist(),
        }

    def _probabilities(self, x):
        return inference.predict_proba(self.model, x)

    def describe(self) -> dict[str, Any]:
        """What ``GET /api/model`` returns."""
        model = self.model
        try:
            architecture = nn.to_config(model)
        except (ValueError, TypeError, AttributeError):
            architecture = None
        parameters = sum(int(np.prod(p.shape)) for p in getattr(model, "parameters", list)())
        keep = ("architecture", "dataset", "test_accuracy", "mean", "std")
        return {
            "name": self.name,
            "architecture": architecture,
            "summary": repr(model),
            "classes": self.classes,
            "input_shape": self.input_shape,
            "input_size": self.input_shape[1:],
            "parameters": parameters,
            "meta": {k: self.meta[k] for k in keep if k in self.meta},
        }


# --------------------------------------------------------------------------------------------
# The app


def create_app(model, max_body: int = MAX_BODY):
    """The Starlette app serving the page and the API for ``model``: a model file path, a
    ``(model, meta)`` pair, a :class:`Predictor` or a bare model. ``max_body``: the largest
    request body accepted, in bytes."""
    try:
        from starlette.applications import Starlette
        from starlette.concurrency import run_in_threadpool
        from starlette.exceptions import HTTPException
        from starlette.requests import ClientDisconnect
        from starlette.responses import FileResponse, JSONResponse
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles
    except ImportError:
        raise ImportError(INSTALL_HINT) from None

    if not isinstance(max_body, int) or max_body < 1:
        raise ValueError(f"max_body must be a positive int, got {max_body!r}")
    predictor = Predictor.load(model)
    description = {**predictor.describe(), "max_body": max_body}
    accepted = "image/png or image/jpeg"

    async def page(request):
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def model_info(request):
        return JSONResponse(description)

    async def predict(request):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ACCEPTED_TYPES:
            shown = f"'{kind}'" if kind else "none"
            raise HTTPException(
                415,
                f"Content-Type must be {accepted}, got {shown}; send the "
                "image file's bytes as the request body",
            )
        body = await _read_body(request, max_body, HTTPException, ClientDisconnect)
        started = time.perf_counter()
        try:
            result = await run_in_threadpool(predictor.predict, body)
        except ValueError as err:
            raise HTTPException(400, _clean(str(err))) from None
        except Exception:  # a bug, not the client's fault: say so, log it, keep serving
            log.exception("prediction failed")
            return JSONResponse({"error": "internal error while predicting"}, status_code=500)
        result["time_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return JSONResponse(result)

    async def http_error(request, exc):
        return JSONResponse(
            {"error": exc.detail},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/api/model", model_info),
            Route("/api/predict", predict, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        exception_handlers={HTTPException: http_error},
    )
    app.state.predictor = predictor
    return app


async def _read_body(request, limit, HTTPException, ClientDisconnect) -> bytes:
    """The whole body, refusing (413) one over ``limit`` bytes as soon as that is known."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPException(400, f"bad Content-Length {declared!r}") from None
        if size > limit:
            raise HTTPException(413, f"image too large: {size:,} bytes, the limit is {limit:,}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"image too large: over {limit:,} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise HTTPException(400, "the client disconnected before sending the whole body") from None
    if not size:
        raise HTTPException(400, "empty request body: send the image file's bytes")
    return b"".join(chunks)


def _clean(message: str) -> str:
    """Pillow names its in-memory stream (``<_io.BytesIO object at 0x...>``): drop that."""
    message = re.sub(r"\s*<_io\.\w+ object at 0x[0-9a-f]+>", "", message)
    return message.rstrip(": ")


def require_dependencies() -> None:
    """Raise ``ImportError`` (one line: what to install) if Starlette or uvicorn is missing."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ImportError(INSTALL_HINT) from None


def run(
    model,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_body: int = MAX_BODY,
    log_level: str = "warning",
) -> None:
    """Serve ``model`` (anything :func:`create_app` takes) with uvicorn until interrupted."""
    serve_app(create_app(model, max_body=max_body), host, port, log_level)


def serve_app(
    app,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "warning",
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve an app made by :func:`create_app` with uvicorn until interrupted (Ctrl-C).

    The address is bound first, so a port in use raises ``OSError`` ("cannot listen on ...")
    here; then ``ready(url)`` is called (the command line prints it) and requests are served.
    """
    require_dependencies()
    import uvicorn

    sock = _listen(host, port)
    shown = f"[{host}]" if ":" in host else host
    if ready is not None:
        ready(f"http://{shown}:{sock.getsockname()[1]}/")
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
    finally:
        sock.close()


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # connections wait in the backlog from here: "ready" means ready
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock
