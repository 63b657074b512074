"""`fastft serve MODEL`: a small web page and a JSON endpoint for one trained model (FastAPI + uvicorn).

GET / is the page: drop or pick an image, or give the path of a local file, and it shows the top labels with
probability bars, and the Grad-CAM picture when the explain extra is installed. POST /predict takes a multipart
`image` (or a `path` form field) and answers with what `fastft predict --json` prints for it.

It listens on 127.0.0.1 unless told otherwise (--host 0.0.0.0 is the user's choice to open it to the network).
Uploads over --max-upload MB, files that are not images, and images over MAX_PIXELS (a decompression bomb: a
small file that decodes to gigabytes) get a 4xx JSON error, never a crash. Reading a local path is allowed
only when the server listens on this machine alone. Needs the serve extra: pip install 'fastft[serve]'.
"""
# no `from __future__ import annotations`: FastAPI reads the endpoint annotations at run time

import base64
import io
import ipaddress
import socket
import threading
from pathlib import Path

from fastft.errors import UsageError

MAX_PIXELS = 64_000_000  # PIL's own guard is lifted for training (fastft/data/images.py); a server keeps one
LOOPBACK_NAMES = ("localhost",)


class Refused(Exception):
    """A request the server answers with a 4xx JSON error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    try:
        return host in LOOPBACK_NAMES or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def decode(data: bytes):
    """An RGB PIL image from uploaded bytes, or Refused: not an image, or too many pixels to decode safely."""
    from PIL import Image, UnidentifiedImageError

    from fastft.data.images import to_rgb

    try:
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError):
        raise Refused(415, "not an image fastft can read; send a JPEG, PNG, WebP, BMP, TIFF or GIF") from None
    width, height = im.size
    if width * height > MAX_PIXELS:  # decided from the header, before decoding anything
        raise Refused(413, f"the image is {width}x{height} pixels, over the server's {MAX_PIXELS:,}; send a smaller one")
    try:
        im.load()
    except (OSError, ValueError, SyntaxError):
        raise Refused(415, "the image is truncated or corrupt") from None
    return to_rgb(im)


def gradcam_png(explainer, model, batch, probs) -> str:
    """The Grad-CAM picture of the top class, as a base64 PNG."""
    from fastft.atomic import subplots

    from fastft.deploy.explain import draw, picture_of

    target = int(probs.argmax())
    heat = explainer.heat_maps(batch, [target])[0]
    fig, ax = subplots(figsize=(3.2, 3.4))
    draw(ax, picture_of(model, batch[0]), heat, f"Grad-CAM: {model.classes[target]}")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode()


def create_app(model, max_upload: int, local_paths: bool):
    """The FastAPI app for `model` (fastft.load's): uploads up to `max_upload` bytes; `local_paths`: whether a
    `path` form field may name a file on this machine."""
    from fastapi import FastAPI, File, Form, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse

    from fastft.deploy import explain
    from fastft.deploy.predict import shown_labels

    app = FastAPI(title="fastft", docs_url=None, redoc_url=None)
    explainer = explain.Explainer(model) if explain.available() and hasattr(model, "network") else None
    lock = threading.Lock()  # Grad-CAM hooks the network: one explanation at a time

    @app.middleware("http")
    async def limit_upload(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_upload + 64 * 1024:  # the image plus the form's overhead
            return JSONResponse({"error": f"upload over the server's limit of {max_upload / 1e6:g} MB"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(Refused)
    async def refused(request, error: Refused):
        return JSONResponse({"error": str(error)}, status_code=error.status)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.replace("{{classes}}", ", ".join(model.classes)).replace("{{gradcam}}", "on" if explainer else "off")

    @app.post("/predict")
    def predict(image: UploadFile | None = File(None), path: str | None = Form(None), top_k: int | None = Form(None),
                gradcam: bool = Form(False)):
        if image is not None:
            data = image.file.read(max_upload + 1)
            name = image.filename or "upload"
            if len(data) > max_upload:
                raise Refused(413, f"upload over the server's limit of {max_upload / 1e6:g} MB")
        elif path:
            if not local_paths:
                raise Refused(403, "reading a path on the server is allowed only when it listens on 127.0.0.1")
            name = path[len("file://"):] if path.startswith("file://") else path
            if not Path(name).is_file():
                raise Refused(404, f"no file at {name} on the server")
            if Path(name).stat().st_size > max_upload:
                raise Refused(413, f"{name} is over the server's limit of {max_upload / 1e6:g} MB")
            data = Path(name).read_bytes()
        else:
            raise Refused(422, "send an image file (multipart field 'image') or a 'path'")
        picture = decode(data)
        batch = model.preprocess(picture)[None]
        probs = model.predict_arrays(batch)[0]
        result = model.result(name, probs)
        result["top"] = shown_labels(result, top_k)
        if gradcam and explainer is not None:
            with lock:
                result["gradcam_png"] = gradcam_png(explainer, model, batch, probs)
        return JSONResponse([result])

    return app


def free_port(host: str, port: int) -> None:
    """A one-line error now, rather than uvicorn's traceback later, when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UsageError(f"port {port} on {host} is not free ({e.strerror}); pick another with --port") from None


def serve(model_path: Path, host: str, port: int, max_upload_mb: float) -> None:
    from importlib.util import find_spec

    if find_spec("fastapi") is None or find_spec("uvicorn") is None:
        raise UsageError("fastft serve needs FastAPI and uvicorn: pip install 'fastft[serve]'")
    import uvicorn

    from fastft.deploy.bundle import load

    model = load(model_path)
    free_port(host, port)
    app = create_app(model, int(max_upload_mb * 1e6), local_paths=is_loopback(host))
    print(f"serving {model_path} ({model.meta['arch']}: {', '.join(model.classes)}) at http://{host}:{port}/ "
          "(Ctrl-C stops it)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fastft</title>
<style>
 body { font-family: system-ui, sans-serif; max-width: 44rem; margin: 2rem auto; color: #222; }
 #drop { border: 2px dashed #999; border-radius: 8px; padding: 2rem; text-align: center; }
 #drop.over { background: #eef; }
 .row { display: flex; align-items: center; gap: .5rem; margin: .2rem 0; }
 .row .name { width: 12rem; } .bar { background: #4a7bd0; height: 1rem; } .error { color: #b00; }
 img { max-width: 100%; }
</style></head>
<body>
<h1>fastft</h1>
<p>Classes: {{classes}}. Grad-CAM: {{gradcam}}.</p>
<div id="drop">Drop an image here, or <input type="file" id="file" accept="image/*"></div>
<p>or a file on this machine: <input id="path" size="40" placeholder="/path/to/photo.jpg or file:///...">
<button id="go">Predict</button></p>
<h2 id="label"></h2><div id="bars"></div><p id="error" class="error"></p><img id="cam" alt="">
<script>
const drop = document.getElementById('drop');
async function send(form) {
  form.append('gradcam', '{{gradcam}}' === 'on');
  document.getElementById('error').textContent = '';
  const response = await fetch('/predict', {method: 'POST', body: form});
  const body = await response.json();
  if (!response.ok) { document.getElementById('error').textContent = body.error; return; }
  const result = body[0];
  document.getElementById('label').textContent = result.label;
  document.getElementById('bars').innerHTML = Object.entries(result.probabilities)
    .sort((a, b) => b[1] - a[1]).slice(0, 5).map(([name, p]) =>
      `<div class="row"><span class="name">${name}</span><span class="bar" style="width:${(p * 20).toFixed(1)}rem"></span>` +
      `<span>${p.toFixed(3)}</span></div>`).join('');
  const cam = document.getElementById('cam');
  cam.src = result.gradcam_png ? 'data:image/png;base64,' + result.gradcam_png : '';
}
function upload(file) { const form = new FormData(); form.append('image', file); send(form); }
document.getElementById('file').addEventListener('change', e => upload(e.target.files[0]));
drop.addEventListener('dragover', e => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', e => { e.preventDefault(); drop.classList.remove('over'); upload(e.dataTransfer.files[0]); });
document.getElementById('go').addEventListener('click', () => {
  const form = new FormData(); form.append('path', document.getElementById('path').value); send(form); });
</script>
</body></html>
"""
