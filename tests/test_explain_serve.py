"""Explain and serve: Grad-CAM heat maps, the web page and its JSON endpoint, and bundles plain timm loads."""
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, invoke
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


@pytest.fixture(scope="module")
def server(square_run):
    """`fastft serve` on a free port of 127.0.0.1, uploads capped at 20 kB."""
    port = _free_port()
    proc = subprocess.Popen([str(FASTFT), "serve", str(square_run[1]), "--port", str(port), "--max-upload", "0.02"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        raise AssertionError(proc.communicate()[1])
    yield url, port
    proc.terminate()
    proc.wait(timeout=30)


def test_the_endpoint_answers_as_predict_json_and_refuses_bad_uploads_with_json(server, square_run, tmp_path):
    import httpx

    url, _ = server
    image = sorted((square_run[0] / "test" / "plain").glob("*.png"))[0]
    answer = httpx.post(url + "/predict", files={"image": (image.name, image.read_bytes(), "image/png")})
    assert answer.status_code == 200
    printed = json.loads(invoke("predict", square_run[1], image, "--json").stdout)
    assert answer.json()[0]["probabilities"] == pytest.approx(printed[0]["probabilities"], abs=1e-6)
    assert answer.json()[0]["label"] == printed[0]["label"] and answer.json()[0]["top"][0][0] == printed[0]["top"][0][0]
    explained = httpx.post(url + "/predict", files={"image": (image.name, image.read_bytes())}, data={"gradcam": "true"})
    assert explained.json()[0]["gradcam_png"]
    bomb = tmp_path / "bomb.png"
    Image.new("L", (9000, 9000)).save(bomb)  # 81 Mpx in about 80 kB
    cases = {"corrupt": (b"\x89PNG\r\n\x1a\n not really", 415), "text": (b"hello", 415),
             "oversized": (b"\0" * 30_000, 413)}
    for name, (payload, status) in cases.items():
        refused = httpx.post(url + "/predict", files={"image": (f"{name}.png", payload)})
        assert refused.status_code == status and refused.json()["error"], name
    small_bomb = httpx.post(url + "/predict", files={"image": ("bomb.png", bomb.read_bytes())})
    assert small_bomb.status_code == 413 and "error" in small_bomb.json()  # over the upload limit already
    assert httpx.post(url + "/predict", data={"path": str(image)}).json()[0]["label"] == printed[0]["label"]
    assert httpx.post(url + "/predict", data={"path": str(tmp_path / "missing.png")}).status_code == 404
    assert httpx.get(url + "/").status_code == 200  # still up


def test_a_decompression_bomb_is_refused_before_it_is_decoded():
    from fastft.deploy.serve import Refused, decode

    import io

    buffer = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buffer, format="PNG")
    with pytest.raises(Refused, match="9000x9000 pixels"):
        decode(buffer.getvalue())


def test_serve_refuses_a_taken_port_and_a_broken_bundle_in_one_line(square_run, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run_fastft("serve", square_run[1], "--port", port)
    assert busy.returncode == 2 and f"port {port}" in busy.stderr and len(busy.stderr.strip().splitlines()) == 1
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
    return None


@pytest.mark.skipif(_chromium() is None, reason="no Chromium: install Debian's chromium and chromium-driver to run it")
def test_the_page_in_a_real_headless_chromium_shows_the_label(server, square_run):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"):
        options.add_argument(flag)
    page = webdriver.Chrome(service=Service(driver), options=options)
    try:
        page.get(server[0] + "/")
        image = sorted((square_run[0] / "test" / "plain").glob("*.png"))[0]
        page.find_element(By.ID, "file").send_keys(str(image))
        label = WebDriverWait(page, 60).until(lambda p: p.find_element(By.ID, "label").text)
        import fastft

        assert label == fastft.load(square_run[1]).predict(image)[0]
        assert len(page.find_elements(By.CSS_SELECTOR, "#bars .row")) == 2
    finally:
        page.quit()


def test_a_hub_export_loads_in_plain_timm_with_the_same_probabilities(tmp_path):
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
    import fastft

    bundle = fastft.load(run)
    images = sorted(data.rglob("*.png"))[:4]
    batch = np.stack([bundle.preprocess(p) for p in images])
    np.save(tmp_path / "batch.npy", batch)
    code = f"""
import sys
sys.modules["fastft"] = None  # plain timm, no fastft
import numpy, timm, torch
model = timm.create_model("local-dir:{hub}", pretrained=True).eval()
with torch.no_grad():
    print(model(torch.from_numpy(numpy.load("{tmp_path / 'batch.npy'}"))).softmax(1).tolist())
"""
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    np.testing.assert_allclose(json.loads(shown.stdout), bundle.probabilities(batch), atol=1e-5)


def test_a_model_with_fastais_head_is_not_exported_to_the_hub(trained_run, tmp_path):
    result = run_fastft("export", trained_run[0], "--format", "hub", "--out", tmp_path / "hub")
    assert result.returncode == 2 and "fastai's head" in result.stderr and "lp-ft" in result.stderr
