"""fastconv.serve: the JSON API on real MNIST digits (same answers as `fastconv predict`), every
bad request's 4xx with the server still answering, concurrency, and the body limit enforced
while streaming on a real uvicorn server."""

from __future__ import annotations

import json
import select
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest
from conftest import wall_clock_limit
from trained_models import fastconv_command, png_bytes, small_model, test_digits

from fastconv import io, serve

pytest.importorskip("starlette", reason='the web app needs: pip install "fastconv[serve]"')
pytest.importorskip("uvicorn", reason='the web app needs: pip install "fastconv[serve]"')

pytestmark = [
    pytest.mark.filterwarnings("ignore:Using .httpx. with .starlette.testclient."),
    # Pillow warns on opening an image between 1x and 2x its pixel limit; preprocess refuses it
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
]

TYPES = {".png": "image/png", ".jpg": "image/jpeg"}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return small_model(tmp_path_factory)


@pytest.fixture(scope="module")
def client(model_file):
    from starlette.testclient import TestClient

    with TestClient(serve.create_app(model_file)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory):
    """One test digit of each class in three renderings: as stored (28x28 PNG), enlarged dark
    on white (112x112 PNG), enlarged JPEG. Returns [(path, label)]."""
    pixels, labels = test_digits(100)
    folder = tmp_path_factory.mktemp("digits")
    files = []
    for k in range(10):
        i = int(np.flatnonzero(labels == k)[0])
        for name, data in [
            (f"{k}-raw.png", png_bytes(pixels[i])),
            (f"{k}-paper.png", png_bytes(pixels[i], scale=4, invert=True)),
            (f"{k}-photo.jpg", png_bytes(pixels[i], scale=3, invert=True, fmt="JPEG")),
        ]:
            (folder / name).write_bytes(data)
            files.append((folder / name, k))
    return files


def post(client, body, content_type="image/png"):
    headers = {"Content-Type": content_type} if content_type else {}
    return client.post("/api/predict", content=body, headers=headers)


def assert_serving(client, digit_files):
    path, label = digit_files[0]
    response = post(client, path.read_bytes())
    assert response.status_code == 200 and response.json()["class"] == label


# -- the page ------------------------------------------------------------------------------------


def test_page_and_its_assets_are_served_locally(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "<canvas" in html and 'type="file"' in html
    for asset in ("/static/app.js", "/static/app.css"):
        assert asset in html
        response = client.get(asset)
        assert response.status_code == 200 and response.text
        assert "http://" not in response.text and "https://" not in response.text, asset
    assert "http://" not in html and "https://" not in html  # no CDN: works offline
    css = client.get("/static/app.css").text
    assert "touch-action: none" in css  # a finger draws instead of scrolling
    assert 'name="viewport"' in html  # phone-sized screens


def test_model_description(client, model_file):
    info = client.get("/api/model").json()
    _, meta = io.load_model(model_file)
    assert info["classes"] == meta["classes"] == [str(i) for i in range(10)]
    assert info["input_shape"] == [1, 28, 28] and info["input_size"] == [28, 28]
    assert info["architecture"]["type"] == "Sequential"
    assert info["parameters"] > 1000 and info["max_body"] == serve.MAX_BODY
    assert info["meta"]["dataset"] == "mnist"


# -- answers -------------------------------------------------------------------------------------


def test_answers_equal_fastconv_predict(client, model_file, digit_files):
    folder = digit_files[0][0].parent
    result = fastconv_command("predict", str(model_file), str(folder), "--json", "--top", "10")
    assert result.returncode == 0, result.stderr
    expected = {}
    for item in json.loads(result.stdout):
        probabilities = [0.0] * 10
        for entry in item["top"]:
            probabilities[entry["class"]] = entry["probability"]
        expected[item["file"]] = (item["top"][0]["class"], probabilities)
    assert len(expected) == len(digit_files)
    correct = 0
    for path, label in digit_files:
        response = post(client, path.read_bytes(), TYPES[path.suffix])
        assert response.status_code == 200, response.text
        answer = response.json()
        cls, probabilities = expected[str(path)]
        assert answer["class"] == cls, path.name
        np.testing.assert_allclose(answer["probabilities"], probabilities, rtol=0, atol=1e-6)
        assert answer["labels"] == [str(i) for i in range(10)]
        assert answer["label"] == answer["labels"][cls]
        assert np.shape(answer["input"]) == (28, 28)
        correct += answer["class"] == label
    assert correct >= 0.8 * len(digit_files)


def test_content_type_parameters_are_ignored(client, digit_files):
    path, label = digit_files[0]
    response = post(client, path.read_bytes(), "Image/PNG; charset=binary")
    assert response.status_code == 200 and response.json()["class"] == label


def test_an_onnx_export_gives_the_same_answers(model_file, digit_files, tmp_path):
    pytest.importorskip("onnx", reason='ONNX files need: pip install "fastconv[onnx]"')
    from starlette.testclient import TestClient

    from fastconv import onnx

    model, meta = io.load_model(model_file)
    onnx.save(model, tmp_path / "model.onnx", input_shape=(1, 28, 28), meta=meta)
    with (
        TestClient(serve.create_app(model_file)) as npz,
        TestClient(serve.create_app(tmp_path / "model.onnx")) as exported,
    ):
        assert exported.get("/api/model").json()["classes"] == meta["classes"]
        for path, _ in digit_files[::3]:
            body, kind = path.read_bytes(), TYPES[path.suffix]
            expected, answer = post(npz, body, kind).json(), post(exported, body, kind).json()
            assert answer["class"] == expected["class"]
            np.testing.assert_allclose(
                answer["probabilities"], expected["probabilities"], rtol=0, atol=1e-5
            )


# -- bad requests ----------------------------------------------------------------------------------


def _bomb(width, height) -> bytes:
    """A tiny PNG that decodes to width x height pixels (1 bit each)."""
    import io as stdio

    from PIL import Image

    buffer = stdio.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


BAD_REQUESTS = {
    # name: (body or a callable making it, content type, status, words in the message)
    "not an image": (b"this is not a picture", "image/png", 400, "cannot decode"),
    "truncated png": (lambda png: png[: len(png) * 2 // 3], "image/png", 400, "truncated"),
    "truncated jpeg": ("jpeg", "image/jpeg", 400, "cannot decode"),
    "empty body": (b"", "image/png", 400, "empty"),
    "wrong content type": (lambda png: png, "text/plain", 415, "Content-Type"),
    "no content type": (lambda png: png, None, 415, "Content-Type"),
    "form upload": (lambda png: png, "multipart/form-data; boundary=x", 415, "Content-Type"),
    "too large": (b"\x89PNG" + bytes(serve.MAX_BODY), "image/png", 413, "too large"),
    "decompression bomb": (lambda png: _bomb(20_000, 20_000), "image/png", 400, "decompression"),
    "bomb below twice the limit": (
        lambda png: _bomb(10_000, 10_000),
        "image/png",
        400,
        "decompression",
    ),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_request_gets_its_status_and_the_server_keeps_serving(client, digit_files, name):
    body, content_type, status, words = BAD_REQUESTS[name]
    png = digit_files[1][0].read_bytes()
    if body == "jpeg":
        jpeg = next(p for p, _ in digit_files if p.suffix == ".jpg").read_bytes()
        body = jpeg[: len(jpeg) // 2]
    elif callable(body):
        body = body(png)
    assert len(body) <= serve.MAX_BODY or status == 413
    response = post(client, body, content_type)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words.lower() in error.lower(), error
    assert "0x" not in error  # no memory addresses from Pillow's messages
    assert_serving(client, digit_files)


def test_unknown_paths_and_methods_answer_json(client, digit_files):
    assert client.get("/nowhere").status_code == 404
    response = client.get("/api/predict")
    assert response.status_code == 405 and "error" in response.json()
    assert_serving(client, digit_files)


def test_a_smaller_limit(model_file, digit_files):
    from starlette.testclient import TestClient

    png = digit_files[1][0].read_bytes()
    with TestClient(serve.create_app(model_file, max_body=len(png) - 1)) as small:
        assert post(small, png).status_code == 413
    with pytest.raises(ValueError):
        serve.create_app(model_file, max_body=0)


# -- a real server: streaming limit, concurrency, the event loop stays free ------------------


@contextmanager
def running(app):
    """Serve ``app`` with uvicorn on a free port in a thread; yields (host, port)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + wall_clock_limit(120)
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield "127.0.0.1", port
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def server(model_file):
    with running(serve.create_app(model_file)) as address:
        yield address


def http(address, method, path, body=None, content_type="image/png", timeout=30):
    host, port = address
    request = urllib.request.Request(
        f"http://{host}:{port}{path}",
        data=body,
        method=method,
        headers={"Content-Type": content_type} if body else {},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _status_line(sock, timeout):
    sock.settimeout(timeout)
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n")[0].decode()


def test_declared_length_over_the_limit_is_refused_before_the_body(server, digit_files):
    with socket.create_connection(server, timeout=10) as sock:
        sock.sendall(
            b"POST /api/predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
            b"Content-Length: 1000000000\r\n\r\n" + bytes(1000)
        )
        # a gigabyte announced, a kilobyte sent: the answer comes without waiting for the rest
        assert " 413 " in _status_line(sock, timeout=10)
    assert http(server, "GET", "/api/model")[0] == 200


def test_streamed_body_over_the_limit_is_cut_off(server, digit_files):
    chunk = bytes(64 * 1024)
    sent, answered = 0, False
    with socket.create_connection(server, timeout=10) as sock:
        sock.sendall(
            b"POST /api/predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/png\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        try:
            while sent < 20 * serve.MAX_BODY:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                if select.select([sock], [], [], 0)[0]:
                    answered = True
                    break
        except (BrokenPipeError, ConnectionResetError):
            answered = True  # the server answered and closed while we were still sending
        assert answered, f"no answer after streaming {sent:,} bytes"
        assert sent < 4 * serve.MAX_BODY  # stopped near the limit, not after reading everything
        try:
            line = _status_line(sock, timeout=10)
        except ConnectionResetError:
            line = "reset"
        assert " 413 " in line or line == "reset", line
    assert http(server, "GET", "/api/model")[0] == 200
    path, label = digit_files[0]
    assert http(server, "POST", "/api/predict", path.read_bytes())[1]["class"] == label


def test_concurrent_requests_get_the_same_answers(server, digit_files):
    files = [(path.read_bytes(), TYPES[path.suffix]) for path, _ in digit_files]
    alone = [http(server, "POST", "/api/predict", body, kind)[1] for body, kind in files]
    work = files * 4
    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(lambda f: http(server, "POST", "/api/predict", *f), work))
    for k, (status, answer) in enumerate(together):
        expected = alone[k % len(files)]
        assert status == 200 and answer["class"] == expected["class"]
        np.testing.assert_allclose(
            answer["probabilities"], expected["probabilities"], rtol=0, atol=1e-6
        )


class BlockedModel:
    """Blocks in its forward pass until released: shows whether the event loop waits for it."""

    training = False

    def __init__(self):
        self.entered, self.release = threading.Event(), threading.Event()

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __call__(self, x):
        self.entered.set()
        self.release.wait(120)
        return np.zeros((len(x), 10), np.float32)


def test_the_model_runs_off_the_event_loop(digit_files):
    meta = {"classes": [str(i) for i in range(10)], "input_shape": [1, 28, 28]}
    model = BlockedModel()
    app = serve.create_app(serve.Predictor(model, meta))  # classes given: the model is not run
    with running(app) as address, ThreadPoolExecutor(2) as pool:
        slow = pool.submit(http, address, "POST", "/api/predict", digit_files[0][0].read_bytes())
        try:
            assert model.entered.wait(120), "the prediction never reached the model"
            # the model is still blocked: only a free event loop can answer this
            assert http(address, "GET", "/api/model", timeout=60)[0] == 200
        finally:
            model.release.set()
        assert slow.result()[0] == 200


# -- the command ----------------------------------------------------------------------------------


@contextmanager
def serve_command(*args):
    """`fastconv serve ARGS --port 0` in a subprocess; yields (process, url) once it listens. The
    server binds port 0 itself and prints the address: no free-port probe that could race."""
    import re
    import subprocess
    import sys

    process = subprocess.Popen(
        [sys.executable, "-m", "fastconv", "serve", *map(str, args), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = process.stdout.readline()  # printed once the socket is bound; "" if it exits
        found = re.search(r" at (http://\S+/) ", line)
        assert found, line + process.stdout.read()
        yield process, found.group(1)
    finally:
        process.terminate()
        process.wait(60)


def _address(url):
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    return host.strip("[]"), int(port)


def test_fastconv_serve_command(model_file, digit_files):
    with serve_command(model_file) as (_, url):
        address = _address(url)
        assert address[0] == "127.0.0.1" and address[1] > 0
        status, info = http(address, "GET", "/api/model")
        assert status == 200 and info["classes"][0] == "0"
        assert info["max_body"] == serve.MAX_BODY
        path, label = digit_files[0]
        answer = http(address, "POST", "/api/predict", path.read_bytes())[1]
        assert answer["class"] == label


def test_serve_command_max_body_refuses_a_larger_image(model_file, digit_files):
    path, label = digit_files[0]
    body = path.read_bytes()
    with serve_command(model_file, "--max-body", len(body) - 1) as (_, url):
        address = _address(url)
        assert http(address, "GET", "/api/model")[1]["max_body"] == len(body) - 1
        status, answer = http(address, "POST", "/api/predict", body)
        assert status == 413 and "too large" in answer["error"]
    with serve_command(model_file, "--max-body", len(body)) as (_, url):
        assert http(_address(url), "POST", "/api/predict", body)[1]["class"] == label


def _other_loopback_address():
    """127.0.0.2 where this machine can bind it (Linux routes all of 127/8 to loopback)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.2", 0))
        except OSError:
            return None
    return "127.0.0.2"


def test_serve_command_host_binds_there(model_file):
    host = _other_loopback_address()
    if host is None:
        pytest.skip("this machine cannot bind 127.0.0.2")
    with serve_command(model_file, "--host", host) as (_, url):
        address = _address(url)
        assert address[0] == host
        assert http(address, "GET", "/api/model")[0] == 200
        with pytest.raises(OSError):  # not listening on the default address
            socket.create_connection(("127.0.0.1", address[1]), timeout=10).close()


def test_serve_command_errors_are_one_line(tmp_path):
    result = fastconv_command("serve", str(tmp_path / "missing.npz"))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
