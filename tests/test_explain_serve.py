"""Explain and serve: Grad-CAM heat maps, the web page and its JSON endpoint, and bundles plain timm loads."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, invoke, plain_timm_probabilities
from conftest import fastft as run_fastft
from fastft.errors import UsageError

FASTFT = Path(sys.executable).with_name("fastft")


@pytest.fixture(scope="module")
def square_run(tmp_path_factory):
    """A model that tells noise from noise with a bright square in its top-left corner."""
    root = tmp_path_factory.mktemp("square")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 8)):
        for label in ("square", "plain"):
            for i in range(n):
                pixels = np.clip(rng.normal(110, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
                if label == "square":
                    pixels[4:22, 4:22] = 255
                path = root / "data" / split / label / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)
    out = root / "run"
    result = invoke("cifar", "--data", root / "data", *TINY, "--size", "64", "--bs", "8", "--epochs", "4",
                    "--aug", "none", "--no-tta", "--out", out)
    assert result.exit_code == 0, result.output
    return root / "data", out


def test_grad_cam_looks_at_the_corner_that_decides(square_run, tmp_path):
    import fastft
    from fastft.deploy.explain import Explainer

    data, run = square_run
    model = fastft.load(run)
    files = sorted((data / "test" / "square").glob("*.png"))
    batch = np.stack([model.preprocess(f) for f in files])
    heat = Explainer(model).heat_maps(batch, [model.classes.index("square")] * len(files))
    assert heat.shape == (len(files), 64, 64)
    corner = heat[:, :32, :32].sum(axis=(1, 2)) / heat.sum(axis=(1, 2))
    assert np.median(corner) > 0.5  # most of the heat in the quarter that holds the square
    shown = run_fastft("explain", run, files[0], files[1], "--out", tmp_path / "why", "--top-k", "2")
    assert shown.returncode == 0, shown.stderr
    pictures = sorted((tmp_path / "why").glob("*.png"))
    assert len(pictures) == 2 and all(Image.open(p).size[0] >= 300 for p in pictures)
    width, height = Image.open(pictures[0]).size
    assert width > 1.5 * height  # the photo beside its overlay
    listed = json.loads((tmp_path / "why" / "explain.json").read_text())
    assert [r["class"] for r in listed] == [model.predict(f)[0] for f in files[:2]] and len(listed[0]["top"]) == 2
    other = run_fastft("explain", run, files[0], "--class", "plain", "--out", tmp_path / "other")
    assert other.returncode == 0 and "\tplain\t" in other.stdout


def test_explain_names_layer_when_there_is_none_to_find(square_run, tmp_path):
    from fastft.deploy.explain import target_layer

    no_stages = SimpleNamespace(model=SimpleNamespace(feature_info=None))
    with pytest.raises(UsageError, match="--layer"):
        target_layer([no_stages], "mystery_net")
    result = run_fastft("explain", square_run[1], square_run[0] / "test", "--layer", "layer9", "--out", tmp_path / "x")
    assert result.returncode == 2 and "--layer" in result.stderr and "layer9" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_evaluate_adds_the_top_losses_with_their_heat_maps(square_run, tmp_path):
    data, run = square_run
    report = json.loads(invoke("evaluate", run, data, "--json", "--out", tmp_path / "eval").stdout)
    assert "gradcam_top_losses.png" in report["pictures"]
    assert Image.open(tmp_path / "eval" / "gradcam_top_losses.png").size[0] > 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


XSS = "<img src=x onerror=alert(1)>"
CLIENT = {"X-Fastft": "1"}  # what the page's own script sends


def _start_server(model, *options):
    """`fastft serve` on a free port of 127.0.0.1; waits until it answers. Returns (process, url)."""
    import httpx

    port = _free_port()
    proc = subprocess.Popen([str(FASTFT), "serve", str(model), "--port", str(port), *map(str, options)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise AssertionError(proc.communicate()[1])


@pytest.fixture(scope="module")
def served_model(square_run, tmp_path_factory):
    """The square model with its class "square" renamed to an HTML payload, as a class folder can be named."""
    model = tmp_path_factory.mktemp("xss") / "run"
    shutil.copytree(square_run[1], model)
    meta = json.loads((model / "model.json").read_text())
    meta["classes"] = [XSS if name == "square" else name for name in meta["classes"]]
    (model / "model.json").write_text(json.dumps(meta))
    return model


@pytest.fixture(scope="module")
def server(served_model, square_run):
    """`fastft serve` on a free port of 127.0.0.1, uploads capped at 20 kB, files readable under the data folder."""
    proc, url = _start_server(served_model, "--max-upload", "0.02", "--allow-dir", square_run[0])
    yield url, proc
    proc.terminate()
    proc.wait(timeout=30)


def test_the_endpoint_answers_as_predict_json_and_refuses_bad_uploads_with_json(server, served_model, square_run, tmp_path):
    import httpx

    url, _ = server
    image = sorted((square_run[0] / "test" / "plain").glob("*.png"))[0]
    answer = httpx.post(url + "/predict", files={"image": (image.name, image.read_bytes(), "image/png")}, headers=CLIENT)
    assert answer.status_code == 200
    printed = json.loads(invoke("predict", served_model, image, "--json").stdout)
    assert answer.json()[0]["probabilities"] == pytest.approx(printed[0]["probabilities"], abs=1e-6)
    assert answer.json()[0]["label"] == printed[0]["label"] and answer.json()[0]["top"][0][0] == printed[0]["top"][0][0]
    explained = httpx.post(url + "/predict", files={"image": (image.name, image.read_bytes())}, data={"gradcam": "true"},
                           headers=CLIENT)
    assert explained.json()[0]["gradcam_png"]
    bomb = tmp_path / "bomb.png"
    Image.new("L", (9000, 9000)).save(bomb)  # 81 Mpx in about 80 kB
    cases = {"corrupt": (b"\x89PNG\r\n\x1a\n not really", 415), "text": (b"hello", 415),
             "oversized": (b"\0" * 30_000, 413)}
    for name, (payload, status) in cases.items():
        refused = httpx.post(url + "/predict", files={"image": (f"{name}.png", payload)}, headers=CLIENT)
        assert refused.status_code == status and refused.json()["error"], name
    small_bomb = httpx.post(url + "/predict", files={"image": ("bomb.png", bomb.read_bytes())}, headers=CLIENT)
    assert small_bomb.status_code == 413 and "error" in small_bomb.json()  # over the upload limit already
    bad_k = httpx.post(url + "/predict", files={"image": (image.name, image.read_bytes())}, data={"top_k": "-1"},
                       headers=CLIENT)
    assert bad_k.status_code == 422 and "top_k" in bad_k.json()["error"]
    assert httpx.get(url + "/").status_code == 200  # still up


def test_files_are_read_only_under_allow_dir_and_outside_looks_like_missing(server, square_run, tmp_path):
    import httpx

    url, proc = server
    data = square_run[0]
    image = sorted((data / "test" / "plain").glob("*.png"))[0]

    def post_path(path):
        return httpx.post(url + "/predict", data={"path": str(path)}, headers=CLIENT, timeout=30)

    inside = post_path(image)
    assert inside.status_code == 200 and inside.json()[0]["label"] == "plain"
    assert post_path(image.relative_to(data)).status_code == 200  # relative to the allowed folder
    outside = tmp_path / "private.png"
    shutil.copy(image, outside)
    link = data / "test" / "link-out.png"
    link.symlink_to(outside)  # a symlink inside the folder that leads out of it
    fifo = data / "test" / "fifo.png"
    os.mkfifo(fifo)
    try:
        answers = {name: post_path(path) for name, path in {
            "outside": outside, "missing": tmp_path / "missing.png", "shadow": "/etc/shadow", "passwd": "/etc/passwd",
            "climb": data / ".." / outside.parent.name / outside.name, "link": link, "fifo": fifo, "folder": data,
            "mem": "/proc/self/mem", "pagemap": "/proc/self/pagemap", "file-url": f"file://{outside}"}.items()}
    finally:
        link.unlink()
        fifo.unlink()
    for name, answer in answers.items():
        assert answer.status_code == 404, (name, answer.text)
        assert answer.json()["error"].endswith("under the allowed folder"), name  # one message: nothing leaks
    assert "gradcam_png" not in post_path(outside).text
    assert httpx.get(url + "/").status_code == 200 and proc.poll() is None


def test_foreign_host_and_origin_headers_and_plain_form_posts_are_refused(server, square_run):
    import httpx

    url, _ = server
    image = sorted((square_run[0] / "test" / "plain").glob("*.png"))[0]
    upload = {"image": (image.name, image.read_bytes(), "image/png")}
    rebound = httpx.get(url + "/", headers={"Host": "evil.example.com"})  # DNS rebinding sends its own name
    assert rebound.status_code == 421 and "evil.example.com" in rebound.json()["error"]
    assert httpx.post(url + "/predict", files=upload, headers={**CLIENT, "Host": "evil.example.com:80"}).status_code == 421
    cross_site = httpx.post(url + "/predict", files=upload, headers={**CLIENT, "Origin": "http://evil.example.com"})
    assert cross_site.status_code == 403 and "evil.example.com" in cross_site.json()["error"]
    form_post = httpx.post(url + "/predict", files=upload)  # what a <form> on any site can send
    assert form_post.status_code == 403 and "X-Fastft: 1" in form_post.json()["error"]
    same_origin = httpx.post(url + "/predict", files=upload, headers={**CLIENT, "Origin": url})
    assert same_origin.status_code == 200
    assert httpx.get(url.replace("127.0.0.1", "localhost") + "/").status_code == 200


def test_a_chunked_upload_is_cut_off_at_the_limit_while_it_arrives(server, square_run):
    """Starlette spools a whole multipart body before the endpoint runs: the limit must hold while reading."""
    import asyncio
    import http.client

    from fastft.deploy.serve import FORM_OVERHEAD, Guard, Policy

    url, _ = server
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    # 2 MB of one file's bytes in chunks, no Content-Length; a well-formed multipart start, so that the only refusal
    # is the size (a body that is not multipart at all may be refused as malformed first, with 400)
    head = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\nContent-Type: image/png\r\n\r\n')
    chunks = (part for part in [head, *(b"x" * 65536 for _ in range(32))])
    try:
        connection.request("POST", "/predict", body=chunks, encode_chunked=True,
                           headers={**CLIENT, "Content-Type": "multipart/form-data; boundary=b"})
        answer = connection.getresponse()
        assert answer.status == 413 and b"limit" in answer.read()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server closed the connection mid-body, which is also a refusal
    finally:
        connection.close()

    read, sent = [0], []

    async def app(scope, receive, send):  # reads everything, as the multipart parser does
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"read it all"})

    async def receive():
        read[0] += 65536
        return {"type": "http.request", "body": b"x" * 65536, "more_body": read[0] < 5_000_000}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "headers": [(b"host", b"127.0.0.1:1"), (b"x-fastft", b"1"),
                                                           (b"transfer-encoding", b"chunked")]}
    asyncio.run(Guard(app, Policy(max_upload=20_000, bind_host="127.0.0.1"))(scope, receive, send))
    assert sent[0]["status"] == 413 and read[0] <= 20_000 + FORM_OVERHEAD + 65536


def test_large_images_at_once_stay_within_a_memory_bound_and_the_server_keeps_answering(served_model, square_run,
                                                                                         tmp_path):
    """Three 7999x7999 16-bit PNGs at once (128 MB each decoded, 140 kB sent) and then a normal photo. Before the
    decode was bounded, each cost 1.7-2.8 GB."""
    import httpx
    from concurrent.futures import ThreadPoolExecutor

    big = tmp_path / "big16.png"
    Image.fromarray(np.zeros((7999, 7999), np.uint16)).save(big, compress_level=1)
    image = sorted((square_run[0] / "test" / "plain").glob("*.png"))[0]
    proc, url = _start_server(served_model, "--max-upload", "2")

    def high_water_mb():
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024

    def post(path):
        return httpx.post(url + "/predict", files={"image": (path.name, path.read_bytes())}, headers=CLIENT, timeout=120)

    try:
        assert post(image).status_code == 200
        before = high_water_mb()
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(post, [big] * 3))
        assert all(a.status_code in (200, 503) for a in answers) and any(a.status_code == 200 for a in answers)
        assert answers[0].json()[0]["label"] if answers[0].status_code == 200 else True
        assert post(image).json()[0]["label"] == "plain"
        from fastft.deploy.serve import DECODE_SLOTS, MAX_DECODE_BYTES

        assert high_water_mb() - before < DECODE_SLOTS * MAX_DECODE_BYTES / 2**20, (before, high_water_mb())
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_palette_images_at_once_stay_within_the_documented_bound_and_memory_returns(served_model, square_run):
    """A 7.9 kB palette PNG of 8000x8000 with a transparent colour: 64 MB decoded, but converted at full size
    (P -> RGBA, a white background, their composite, RGB) it cost about 1 GB; four at once kept 2.8 GB after. Then
    headers that claim 100000x100000 or 20000x20000 pixels: PIL's DecompressionBombError was a 500."""
    import httpx
    import io
    from concurrent.futures import ThreadPoolExecutor

    from conftest import png_claiming
    from fastft.deploy.serve import DECODE_SLOTS, MAX_DECODE_BYTES, MAX_PIXELS

    buffer = io.BytesIO()
    Image.new("P", (8000, 8000), 0).save(buffer, format="PNG", transparency=0)
    palette = buffer.getvalue()
    image = sorted((square_run[0] / "test" / "plain").glob("*.png"))[0]
    proc, url = _start_server(served_model)

    def status_mib(key: str) -> float:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith(key))) / 1024

    def post(data: bytes):
        return httpx.post(url + "/predict", files={"image": ("p.png", data)}, headers=CLIENT, timeout=120)

    try:
        assert post(image.read_bytes()).status_code == 200
        assert post(palette).status_code == 200  # the first one's lasting costs (thread pools, the arena) paid
        before, kept_before = status_mib("VmHWM"), status_mib("VmRSS")
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(post, [palette] * 4))
        assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
        assert answers[0].json()[0]["label"] in ("plain", XSS)
        growth = status_mib("VmHWM") - before
        assert growth < DECODE_SLOTS * MAX_DECODE_BYTES / 2**20, growth
        assert status_mib("VmRSS") - kept_before < MAX_DECODE_BYTES / 2**20, (kept_before, status_mib("VmRSS"))
        for side in (100_000, 20_000, 12_000):
            refused = post(png_claiming(side, side))
            assert refused.status_code == 413 and f"{MAX_PIXELS:,}" in refused.json()["error"], refused.text
        assert post(image.read_bytes()).json()[0]["label"] == "plain"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_stalled_clients_are_timed_out_and_cannot_take_every_connection(square_run):
    """220 connections that sent their headers and stalled were all still open after 30 s."""
    import httpx

    image = sorted((square_run[0] / "test" / "plain").glob("*.png"))[0]
    proc, url = _start_server(square_run[1], "--read-timeout", "5", "--max-connections", "3")
    port = int(url.rsplit(":", 1)[1])
    stalled = []
    try:
        for _ in range(3):  # headers and the start of a body, then nothing
            client = socket.create_connection(("127.0.0.1", port))
            client.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Fastft: 1\r\nContent-Type: "
                           b"multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n" % port)
            stalled.append(client)
        busy = None
        for _ in range(20):  # past --max-connections once the server has taken the three in (a moment, on a busy machine)
            busy = httpx.post(url + "/predict", files={"image": ("a.png", image.read_bytes())}, headers=CLIENT,
                              timeout=30)
            if busy.status_code == 503:
                break
            time.sleep(0.1)
        assert busy.status_code == 503, busy.text
        for client in stalled:
            client.settimeout(60)
            answer = b""
            while chunk := client.recv(4096):  # to the end: the server disconnects it
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408") and b"stalled for 5 s" in answer, answer
        fine = httpx.post(url + "/predict", files={"image": ("a.png", image.read_bytes())}, headers=CLIENT, timeout=30)
        assert fine.status_code == 200 and fine.json()[0]["label"] == "plain"
    finally:
        for client in stalled:
            client.close()
        proc.terminate()
        proc.wait(timeout=30)


def test_decode_shrinks_a_large_image_and_refuses_one_over_the_byte_bound():
    import io

    from fastft.deploy.serve import Refused, decode

    buffer = io.BytesIO()
    Image.fromarray(np.full((6000, 3000, 3), 200, np.uint8)).save(buffer, format="JPEG")
    shrunk = decode(buffer.getvalue(), short_side=73)
    assert shrunk.mode == "RGB" and 146 <= min(shrunk.size) < 3000 and shrunk.size[1] == 2 * shrunk.size[0]
    small = io.BytesIO()
    Image.new("RGB", (100, 80), (10, 20, 30)).save(small, format="PNG")
    assert decode(small.getvalue(), short_side=73).size == (100, 80)  # small images are decoded as they are
    huge = io.BytesIO()
    Image.new("RGB", (7000, 7000)).save(huge, format="PNG", compress_level=1)  # 49 Mpx: 187 MiB decoded
    with pytest.raises(Refused, match="187 MiB decoded"):
        decode(huge.getvalue(), short_side=73)
    huge = io.BytesIO()
    Image.new("RGB", (7000, 7000)).save(huge, format="JPEG")  # a JPEG decodes at 1/8 scale instead
    assert min(decode(huge.getvalue(), short_side=73).size) >= 146


def test_a_decompression_bomb_is_refused_before_it_is_decoded():
    from fastft.deploy.serve import Refused, decode

    import io

    buffer = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buffer, format="PNG")
    with pytest.raises(Refused, match="9000x9000 pixels"):
        decode(buffer.getvalue())


def test_serve_refuses_a_taken_port_a_foreign_address_and_a_broken_bundle_in_one_line(square_run, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run_fastft("serve", square_run[1], "--port", port)
    assert busy.returncode == 2 and f"port {port}" in busy.stderr and len(busy.stderr.strip().splitlines()) == 1
    foreign = run_fastft("serve", square_run[1], "--host", "8.8.8.8", "--port", _free_port())
    assert foreign.returncode == 2 and "8.8.8.8 is not an address of this machine" in foreign.stderr
    no_dir = run_fastft("serve", square_run[1], "--allow-dir", tmp_path / "nowhere", "--port", _free_port())
    assert no_dir.returncode == 2 and "--allow-dir" in no_dir.stderr and "Traceback" not in no_dir.stderr
    broken = tmp_path / "broken"
    shutil.copytree(square_run[1], broken)
    (broken / "model.json").write_text("{ nope")
    for model in (broken, tmp_path / "missing"):
        result = run_fastft("serve", model, "--port", _free_port())
        assert result.returncode == 2 and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _chromium():
    for browser, driver in (("/usr/bin/chromium", "/usr/bin/chromedriver"),):
        if Path(browser).exists() and Path(driver).exists():
            return browser, driver
    if os.environ.get("CI"):  # CI installs both (.ci/run): a missing browser there is a failure, not a skip
        pytest.fail("CI is set but /usr/bin/chromium or /usr/bin/chromedriver is missing; .ci/run installs them")
    return None


def test_the_page_in_a_real_headless_chromium_shows_the_label_and_class_names_as_text(server, served_model, square_run):
    browser_and_driver = _chromium()
    if browser_and_driver is None:
        pytest.skip("no Chromium: install Debian's chromium and chromium-driver to run it")
    from selenium import webdriver
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver = browser_and_driver
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"):
        options.add_argument(flag)
    page = webdriver.Chrome(service=Service(driver), options=options)
    try:
        page.get(server[0] + "/")
        assert XSS in page.find_element(By.ID, "classes").text  # shown as text ...
        assert not page.find_elements(By.CSS_SELECTOR, "#classes img, #bars img")  # ... not made an element
        image = sorted((square_run[0] / "test" / "square").glob("*.png"))[0]
        page.find_element(By.ID, "file").send_keys(str(image))
        label = WebDriverWait(page, 60).until(lambda p: p.find_element(By.ID, "label").text)
        import fastft

        assert label == fastft.load(served_model).predict(image)[0]
        rows = WebDriverWait(page, 30).until(lambda p: p.find_elements(By.CSS_SELECTOR, "#bars .row"))
        assert len(rows) == 2 and XSS in [row.find_element(By.CLASS_NAME, "name").text for row in rows]
        assert not page.find_elements(By.CSS_SELECTOR, "#bars img")
        with pytest.raises(NoAlertPresentException):
            page.switch_to.alert.text
    finally:
        page.quit()


def test_a_hub_export_loads_in_plain_timm_with_the_same_probabilities(tmp_path, monkeypatch):
    from conftest import make_class_folders

    data = make_class_folders(tmp_path / "photos", per_class=8)
    run = tmp_path / "run"
    assert invoke("train", data, *TINY, "--epochs", "2", "--out", run).exit_code == 0  # lp-ft: a linear head
    hub = tmp_path / "hub"
    exported = run_fastft("export", run, "--format", "hub", "--out", hub)
    assert exported.returncode == 0, exported.stderr
    config = json.loads((hub / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == 2 and config["label_names"] == ["blue", "red"]
    assert config["pretrained_cfg"]["crop_pct"] == 0.875 and (hub / "model.safetensors").is_file()
    assert "## Test figures of the run" in (hub / "README.md").read_text()
    umask = os.umask(0)
    os.umask(umask)
    assert {f.name: f.stat().st_mode & 0o777 for f in hub.iterdir()} == {n: 0o666 & ~umask for n in
                                                                        ("config.json", "model.safetensors", "README.md")}
    import fastft

    bundle = fastft.load(run)
    images = sorted(data.rglob("*.png"))[:4]
    batch = np.stack([bundle.preprocess(p) for p in images])
    np.testing.assert_allclose(plain_timm_probabilities(hub, batch, tmp_path), bundle.probabilities(batch), atol=1e-5)
    # plain timm's own preprocessing of the files themselves, odd sizes and all (it was 0.787 against 0.816)
    from conftest import plain_timm_probabilities_of_files

    files = sorted(data.rglob("*.*"))
    np.testing.assert_allclose(plain_timm_probabilities_of_files(hub, files),
                               [list(r["probabilities"].values()) for r in bundle.predict_batch(files, tta=False)],
                               atol=1e-4)
    card = (hub / "README.md").read_text()  # the strategy that made the weights, test figures only, no local paths
    from fastft.deploy.hub import made_by

    recipe = tomllib.loads((run / "recipe.toml").read_text())
    assert made_by(recipe["strategy"], "resnet18", recipe.get("wise")) in card
    assert str(tmp_path) not in card and "| loss |" not in card and "train_acc" not in card and "| test_acc |" in card

    import safetensors.torch

    def disk_full(*args, **kwargs):  # how safetensors' writer reports a full disk: its own error type
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    full = invoke("export", run, "--format", "hub", "--out", tmp_path / "hub2")
    assert full.exit_code == 2 and "no space left" in full.output and "model.safetensors" in full.output, full.output


def test_a_model_with_fastais_head_is_not_exported_to_the_hub(trained_run, tmp_path):
    result = run_fastft("export", trained_run[0], "--format", "hub", "--out", tmp_path / "hub")
    assert result.returncode == 2 and "fastai's head" in result.stderr and "lp-ft" in result.stderr
