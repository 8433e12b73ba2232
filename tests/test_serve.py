"""deepmetric serve: real HTTP requests on 127.0.0.1 and the search page in headless chromium.

The digits run is served by the `deepmetric serve` command in a subprocess; the feature-table
run by uvicorn in a thread. Every wait is bounded.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="deepmetric serve needs the serve extra")
pytest.importorskip("uvicorn", reason="deepmetric serve needs the serve extra")

import uvicorn  # noqa: E402

from deepmetric.cli import main  # noqa: E402
from deepmetric.inference import Run, load_run  # noqa: E402
from deepmetric.serve import ServeError, create_app  # noqa: E402
from deepmetric.serve.app import MAX_UPLOAD_BYTES  # noqa: E402
from deepmetric.training.data import gather  # noqa: E402

TINY = [
    "model.name=mlp",
    "model.hidden_dims=[32]",
    "model.embedding_dim=16",
    "train.epochs=1",
    "train.classes_per_batch=5",
    "train.samples_per_class=4",
    "train.batches_per_epoch=4",
    "eval.metrics=[map@r]",
    "train.threads=1",
    "report.enabled=false",
]
START_TIMEOUT = 120.0
REQUEST_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def call(
    base: str,
    path: str,
    *,
    json_body: Any = None,
    data: bytes | None = None,
    content_type: str | None = None,
) -> tuple[int, Any]:
    """(status, decoded body) of one HTTP request; POST when a body is given."""
    headers = {}
    if json_body is not None:
        data, content_type = json.dumps(json_body).encode(), "application/json"
    if content_type is not None:
        headers["Content-Type"] = content_type
    request = urllib.request.Request(base + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
            status, raw, kind = response.status, response.read(), response.headers["content-type"]
    except urllib.error.HTTPError as error:
        status, raw, kind = error.code, error.read(), error.headers["content-type"]
    return status, json.loads(raw) if kind == "application/json" else raw


def multipart(*parts: tuple[str, str, bytes | str]) -> tuple[bytes, str]:
    """A multipart/form-data body of (field, filename or "", content) parts."""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for field, filename, content in parts:
        body.write(f"--{boundary}\r\n".encode())
        disposition = f'form-data; name="{field}"' + (
            f'; filename="{filename}"' if filename else ""
        )
        body.write(f"Content-Disposition: {disposition}\r\n".encode())
        if filename:
            body.write(b"Content-Type: application/octet-stream\r\n")
        body.write(b"\r\n")
        body.write(content.encode() if isinstance(content, str) else content)
        body.write(b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_until_healthy(base: str, alive: Any) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        assert alive(), "the server stopped before answering"
        try:
            if call(base, "/health")[0] == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"no answer from {base}/health within {START_TIMEOUT} s")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Iterator[tuple[str, Run]]:
    """The digits run served by `deepmetric serve` in a subprocess: (base URL, the run)."""
    folder = tmp_path_factory.mktemp("serve") / "digits"
    assert main(["train", "--quiet", "--run-dir", str(folder), "data.name=digits", *TINY]) == 0
    port = free_port()
    command = [sys.executable, "-m", "deepmetric.cli", "serve", str(folder), "--port", str(port)]
    log = open(folder / "serve.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base, lambda: server.poll() is None)
        yield base, load_run(folder)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Iterator[tuple[str, Run]]:
    """A feature-table run served by uvicorn in a thread: (base URL, the run)."""
    root = tmp_path_factory.mktemp("serve-table")
    rng = np.random.default_rng(1)
    lines = ["a,b,c,d,kind"] + [
        ",".join(f"{v:.4f}" for v in rng.normal(size=4)) + f",k{i % 10}" for i in range(120)
    ]
    (root / "table.csv").write_text("\n".join(lines) + "\n")
    folder = root / "run"
    data = ["data.name=feature_table", f"data.path={root / 'table.csv'}", "data.label_column=kind"]
    assert main(["train", "--quiet", "--run-dir", str(folder), *data, *TINY]) == 0
    run = load_run(folder)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(run), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base, thread.is_alive)
        yield base, run
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def as_records(neighbours: list) -> list[tuple[int, str, int]]:
    return [(n.id, n.name, n.label) for n in neighbours]


def test_health_and_page(digits):
    base, run = digits
    status, health = call(base, "/health")
    assert status == 200 and health["status"] == "ok"
    assert health["items"] == len(run.index) and health["max_k"] == len(run.index) - 1
    assert health["takes_images"] and health["images"] and health["input_shape"] == [1, 8, 8]
    status, page = call(base, "/")
    assert status == 200 and b"<title>deepmetric search</title>" in page


def test_search_by_id_equals_the_python_api(digits):
    base, run = digits
    status, body = call(base, "/search", json_body={"id": 7, "k": 6})
    assert status == 200
    expected = run.search_items([7], k=6)[0]
    assert body["query"]["id"] == 7 and body["query"]["name"] == run.class_name(
        int(run.item_labels[7])
    )
    got = [(n["id"], n["name"], n["label"]) for n in body["neighbours"]]
    assert got == as_records(expected) and [n["rank"] for n in body["neighbours"]] == list(
        range(1, 7)
    )
    for n, e in zip(body["neighbours"], expected, strict=True):
        assert n["distance"] == pytest.approx(e.distance, abs=1e-6)
        assert n["image"] == f"/items/{e.id}/image.png"


def test_search_by_image_upload_and_by_array(digits, tmp_path):
    base, run = digits
    item = gather(run.items(), [11])[0]
    pixels = np.rint(item[0].numpy() * 255).astype(np.uint8)
    (tmp_path / "q.png").write_bytes(png(pixels))
    body, kind = multipart(("image", "q.png", png(pixels)), ("k", "", "4"))
    status, found = call(base, "/search", data=body, content_type=kind)
    assert status == 200 and found["query"]["kind"] == "image" and found["k"] == 4
    expected = run.search(tmp_path / "q.png", k=4)[0]
    assert [(n["id"], n["name"], n["label"]) for n in found["neighbours"]] == as_records(expected)

    status, found = call(base, "/search", json_body={"features": item.tolist(), "k": 3})
    assert status == 200 and found["neighbours"][0]["id"] == 11  # the item itself
    assert found["neighbours"][0]["distance"] == pytest.approx(0.0, abs=2e-3)


def test_embed_images_and_arrays(digits):
    base, run = digits
    pixels = [np.eye(8, dtype=np.uint8) * 255, np.tri(8, dtype=np.uint8) * 200]
    body, kind = multipart(*[("image", f"{i}.png", png(p)) for i, p in enumerate(pixels)])
    status, out = call(base, "/embed", data=body, content_type=kind)
    assert status == 200 and out["dim"] == 16
    expected = run.embed([Image.fromarray(p) for p in pixels])
    np.testing.assert_allclose(np.array(out["embeddings"]), expected, atol=1e-5)
    arrays = np.stack([p[None] / 255.0 for p in pixels])
    status, out = call(base, "/embed", json_body={"features": arrays.tolist()})
    assert status == 200
    np.testing.assert_allclose(np.array(out["embeddings"]), expected, atol=1e-5)


def test_items_and_their_images(digits, tmp_path):
    base, run = digits
    status, listing = call(base, "/items?offset=3&limit=2")
    assert status == 200 and listing["total"] == len(run.index)
    assert [item["id"] for item in listing["items"]] == [3, 4]
    assert listing["items"][0]["name"] == run.class_name(int(run.item_labels[3]))
    status, raw = call(base, "/items/3/image.png")
    assert status == 200
    image = np.asarray(Image.open(io.BytesIO(raw)))
    expected = np.rint(run.item_images([3])[0, 0] * 255).astype(np.uint8)
    np.testing.assert_array_equal(image, expected)  # at its own size, 8x8
    (tmp_path / "item.png").write_bytes(raw)  # a downloaded item searches as itself
    assert run.search(tmp_path / "item.png", k=1)[0][0].id == 3


def big_image() -> bytes:
    return png(np.zeros((5000, 9000), dtype=np.uint8))  # 45 megapixels, a small PNG


@pytest.mark.parametrize(
    ("path", "request_body", "status", "message"),
    [
        ("/search", {"id": 10**6}, 404, "no item 1000000"),
        ("/search", {"id": "seven"}, 422, "id must be an integer"),
        ("/search", {"id": 1, "k": 0}, 422, "k must be an integer from 1 to"),
        ("/search", {"id": 1, "k": 10**6}, 422, "k must be an integer from 1 to"),
        ("/search", {"id": 1, "k": "many"}, 422, "k must be an integer"),
        ("/search", {"features": [1.0, 2.0, 3.0]}, 422, r"shape \(3,\) does not fit"),
        ("/search", {"features": [[1.0], [2.0, 3.0]]}, 422, "rectangular array"),
        ("/search", {"features": "pixels"}, 422, r"shape \(\) does not fit|rectangular"),
        ("/search", {}, 400, "no query"),
        ("/search", [1, 2], 400, "send a JSON object"),
        ("/search", b"{not json", 400, "not valid JSON"),
        ("/search", ("text/plain", b"hello"), 415, "content type 'text/plain'"),
        ("/search", [("image", "a.png", b"not an image")], 400, "'a.png' is not an image"),
        ("/search", [("image", "e.png", b"")], 400, "'e.png' is empty"),
        ("/search", [("k", "", "3")], 400, "no image"),
        ("/search", [("image", "a.png", png(np.eye(8, dtype=np.uint8)))] * 2, 422, "one image"),
        ("/search", [("image", "big.png", big_image)], 413, "9000x5000 pixels"),
        ("/embed", {"features": [[0.0] * 64]}, 422, r"shape \(1, 64\) does not fit"),
        ("/items?limit=0", None, 422, "limit must be an integer from 1"),
        ("/items/12345/image.png", None, 404, "no item 12345"),
        ("/items/x/image.png", None, 422, "id must be an integer"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(digits, path, request_body, status, message):
    base, _ = digits
    if request_body is None:
        got, body = call(base, path)
    elif isinstance(request_body, bytes):
        got, body = call(base, path, data=request_body, content_type="application/json")
    elif isinstance(request_body, tuple):
        got, body = call(base, path, data=request_body[1], content_type=request_body[0])
    elif isinstance(request_body, list) and request_body and isinstance(request_body[0], tuple):
        parts = [(f, n, c() if callable(c) else c) for f, n, c in request_body]
        data, kind = multipart(*parts)
        got, body = call(base, path, data=data, content_type=kind)
    else:
        got, body = call(base, path, json_body=request_body)
    assert got == status, body
    assert re.search(message, body["detail"]), body["detail"]
    assert call(base, "/health")[0] == 200  # the service keeps serving


def test_a_body_over_the_limit_is_refused_before_it_is_read(digits):
    """A client announcing more than MAX_UPLOAD_BYTES gets a 413 at once (urllib cannot
    read an early answer while it sends, so this speaks HTTP over a socket)."""
    base, _ = digits
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT) as client:
        client.sendall(
            b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {MAX_UPLOAD_BYTES + 1}\r\n\r\n{{".encode()
        )
        answer = b""
        while b"}" not in answer.partition(b"\r\n\r\n")[2]:
            chunk = client.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert f"the limit is {MAX_UPLOAD_BYTES}" in json.loads(body)["detail"]
    assert call(base, "/health")[0] == 200


def test_feature_table_run_over_http(table):
    base, run = table
    status, health = call(base, "/health")
    assert status == 200 and not health["takes_images"] and not health["images"]
    row = gather(run.items(), [4])[0].tolist()
    status, found = call(base, "/search", json_body={"features": row, "k": 3})
    assert status == 200 and found["query"]["kind"] == "features"
    assert found["neighbours"][0]["id"] == 4 and found["neighbours"][0]["name"].startswith("k")
    assert [(n["id"], n["name"], n["label"]) for n in found["neighbours"]] == as_records(
        run.search(row, k=3)[0]
    )
    status, listing = call(base, "/items?limit=1")
    assert listing["items"][0]["image"] is None
    body, kind = multipart(("image", "q.png", png(np.eye(8, dtype=np.uint8))))
    status, error = call(base, "/search", data=body, content_type=kind)
    assert status == 422 and "feature rows of length 4" in error["detail"]
    assert call(base, "/items/0/image.png")[0] == 404
    status, error = call(base, "/search", json_body={"features": [1.0, 2.0]})
    assert status == 422 and r"shape (2,) does not fit" in error["detail"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    chromium() is None,
    reason="no chromium browser installed (apt-get install -y chromium; .ci/run installs it)",
)
def test_search_page_shows_the_neighbours_in_a_browser(digits, tmp_path):
    base, run = digits
    status, api = call(base, "/search", json_body={"id": 21, "k": 5})
    assert status == 200
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=20000",  # let the page's fetch calls finish before the dump
        "--dump-dom",
        f"{base}/?id=21&k=5",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    cards = re.findall(r'<figure class="neighbour" data-id="(\d+)">(.*?)</figure>', dom, re.S)
    assert len(cards) == 5, dom[-3000:]
    for (item, card), expected in zip(cards, api["neighbours"], strict=True):
        assert int(item) == expected["id"]
        assert f'<div class="name">{html.escape(expected["name"])}</div>' in card
        assert f'<div class="distance">{expected["distance"]:.4f}</div>' in card
        assert f'src="/items/{expected["id"]}/image.png"' in card
    status_line = re.search(r'<p id="status"[^>]*>(.*?)</p>', dom, re.S).group(1)
    assert status_line.startswith("5 neighbours")
    assert str(Path(run.root)) in dom  # the header names the run


def test_missing_serve_extra_names_the_extra(digits, monkeypatch, capsys):
    _, run = digits
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn fails
    with pytest.raises(ServeError, match=r"pip install 'deepmetric\[serve\]'"):
        create_app(run)
    assert main(["serve", str(run.root), "--port", "9"]) == 2
    assert "deepmetric[serve]" in capsys.readouterr().err


class DevTools:
    """A minimal Chrome DevTools protocol client over a websocket (RFC 6455, standard
    library only): send a command, wait for its answer; every read is bounded by a timeout."""

    def __init__(self, url: str, timeout: float) -> None:
        address = urllib.parse.urlparse(url)
        self.socket = socket.create_connection((address.hostname, address.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.socket.sendall(
            f"GET {address.path} HTTP/1.1\r\nHost: {address.hostname}:{address.port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head
        self.last_id = 0

    def _recv(self) -> bytes:
        chunk = self.socket.recv(65536)
        if not chunk:
            raise ConnectionError("chromium closed the DevTools connection")
        return chunk

    def _read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self.buffer += self._recv()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def _message(self) -> dict[str, Any]:
        data = b""
        while True:
            first, second = self._read(2)
            size = second & 0x7F
            if size >= 126:
                size = int.from_bytes(self._read(2 if size == 126 else 8), "big")
            payload = self._read(size)  # frames from the browser are not masked
            if first & 0x0F == 8:
                raise ConnectionError("chromium closed the DevTools connection")
            data += payload
            if first & 0x80:  # the final fragment
                return json.loads(data)

    def __call__(self, method: str, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        payload = json.dumps({"id": self.last_id, "method": method, "params": params}).encode()
        size = len(payload)
        header = bytes([0x81]) + (
            bytes([0x80 | size])
            if size < 126
            else bytes([0x80 | 126]) + size.to_bytes(2, "big")
            if size < 1 << 16
            else bytes([0x80 | 127]) + size.to_bytes(8, "big")
        )
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
        self.socket.sendall(header + mask + masked)
        while True:
            message = self._message()
            if message.get("id") == self.last_id:
                assert "error" not in message, message["error"]
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        result = self("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"the page never satisfied {expression}")


@pytest.fixture
def browser(tmp_path) -> Iterator[DevTools]:
    """Headless chromium driven over the DevTools protocol (a local port, bounded waits)."""
    profile = tmp_path / "profile"
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "--window-size=1150,900",
        "about:blank",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert process.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as answer:
            targets = json.loads(answer.read())
        page = next(t for t in targets if t["type"] == "page")
        client = DevTools(page["webSocketDebuggerUrl"], REQUEST_TIMEOUT)
        yield client
        client.socket.close()
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


NEIGHBOURS_JS = """JSON.stringify([...document.querySelectorAll('#results .neighbour')].map(
    (card) => [Number(card.dataset.id), card.querySelector('.name').textContent,
               card.querySelector('.distance').textContent]))"""


@pytest.mark.skipif(
    chromium() is None,
    reason="no chromium browser installed (apt-get install -y chromium; .ci/run installs it)",
)
def test_a_person_uploads_a_query_and_picks_an_item_in_the_page(digits, browser, tmp_path):
    base, run = digits
    pixels = np.rint(run.item_images([40])[0, 0] * 255).astype(np.uint8)
    query = tmp_path / "query.png"
    query.write_bytes(png(pixels))
    browser("Page.enable")
    browser("Page.navigate", url=f"{base}/")
    browser.wait_for("document.querySelectorAll('#picker figure').length === 48")

    # Upload: the file input gets query.png, k = 4, the search button is clicked.
    root = browser("DOM.getDocument")["root"]["nodeId"]
    file_input = browser("DOM.querySelector", nodeId=root, selector="#image")["nodeId"]
    browser("DOM.setFileInputFiles", files=[str(query)], nodeId=file_input)
    browser.evaluate(
        "document.getElementById('k').value = 4;"
        "document.querySelector('#query-form button').click()"
    )
    browser.wait_for("document.querySelectorAll('#results .neighbour').length === 4")
    shown = json.loads(browser.evaluate(NEIGHBOURS_JS))
    expected = run.search(query, k=4)[0]
    assert [(i, name) for i, name, _ in shown] == [(n.id, n.name) for n in expected]
    assert [d for _, _, d in shown] == [f"{n.distance:.4f}" for n in expected]
    assert shown[0][0] == 40  # the uploaded item finds itself first
    shot = base64.b64decode(browser("Page.captureScreenshot", format="png")["data"])
    (tmp_path / "upload-search.png").write_bytes(shot)  # kept with pytest's temp folders
    assert min(Image.open(io.BytesIO(shot)).size) > 0

    # Pick: clicking the third item of the grid searches its neighbours (k is still 4).
    browser.evaluate("document.querySelectorAll('#picker figure')[2].click()")
    browser.wait_for("document.querySelector('#query .id')?.textContent === 'item 2'")
    browser.wait_for(
        "document.querySelectorAll('#results .neighbour').length === 4 && "
        "!document.getElementById('status').textContent.startsWith('searching')"
    )
    shown = json.loads(browser.evaluate(NEIGHBOURS_JS))
    assert [i for i, _, _ in shown] == [n.id for n in run.search_items([2], k=4)[0]]

    # An error from the service is shown on the page, not swallowed.
    browser.evaluate("document.getElementById('k').value = 0; searchId(3)")
    message = browser.wait_for(
        "document.getElementById('status').className === 'error' && "
        "document.getElementById('status').textContent"
    )
    assert message.startswith("422: k must be an integer from 1 to")


def test_serve_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["serve", str(tmp_path), "--port", "9"]) == 2
    assert "is not a run folder" in capsys.readouterr().err
