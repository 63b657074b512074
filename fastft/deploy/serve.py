"""`fastft serve MODEL`: a small web page and a JSON endpoint for one trained model (FastAPI + uvicorn).

GET / is the page: drop or pick an image and it shows the top labels with probability bars, and the Grad-CAM
picture when the explain extra is installed. POST /predict takes a multipart `image` (or, with --allow-dir, a
`path` under that folder) and answers with what `fastft predict --json` prints for it.

What a request can do is bounded, because a page in the user's browser can reach a server on 127.0.0.1 too:
- `Guard` runs before the app: the Host header must name this server (a DNS-rebinding page sends its own name),
  an Origin header must be the server's own, and a POST must carry the `X-Fastft` header, which another site's
  page cannot send without a CORS preflight this server never approves (form posts cannot carry it at all).
  It also counts the body as it arrives, chunked or not, and stops reading past --max-upload; a body that stalls
  for --read-timeout seconds gets 408, and past --max-connections open connections a new one gets 503.
- Files on the server are read only under the folder named by --allow-dir, after symlinks are followed, and
  only regular files: the same 404 for a path outside it as for a missing one, so nothing leaks.
- Decoding is bounded before it starts (pixels, and pixels times bytes per pixel, from the header), shrinks a
  large image while decoding (JPEG's DCT scaling, else a box filter), and at most DECODE_SLOTS decode at
  once; a request that waits too long for a slot gets 503.
- Class names are data, never markup: the page escapes them and its script sets textContent.
Needs the serve extra: pip install 'fastft[serve]'.
"""
# no `from __future__ import annotations`: FastAPI reads the endpoint annotations at run time

import asyncio
import base64
import contextlib
import errno
import io
import ipaddress
import json
import math
import os
import socket
import stat
import threading
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from fastft.data.images import resize_side
from fastft.deploy.page import page_html
from fastft.deploy.server_limits import MAX_CONNECTIONS, MAX_UPLOAD_MB, READ_TIMEOUT_S
from fastft.errors import UsageError

MAX_PIXELS = 64_000_000  # PIL's own guard is lifted for training (fastft/data/images.py); a server keeps one
MAX_DECODE_BYTES = 160 * 2**20  # the most one image's decode path holds at once (peak_bytes): a 38 Mpx RGB PNG
LARGE_DECODE_BYTES = 64 * 2**20  # over this, the image is shrunk to twice what the model needs before it is converted
DECODE_SLOTS = 2  # decodes at once: bounds what decoding adds to the server's memory at DECODE_SLOTS x MAX_DECODE_BYTES
BUSY_WAIT_S = 10.0  # how long a request waits for a decode slot before it gets 503
FORM_OVERHEAD = 64 * 1024  # the multipart form's own bytes around the image
CLIENT_HEADER = "x-fastft"  # a POST must carry it: cross-site pages and form posts cannot
LOOPBACK_NAMES = ("localhost",)


class Refused(Exception):
    """A request the server answers with a 4xx (or 503) JSON error."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    try:
        return host in LOOPBACK_NAMES or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a Host header or an Origin's authority, without the port: 'a.b:80' -> 'a.b', '[::1]:80' -> '::1'."""
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


@dataclass(frozen=True)
class Policy:
    """What the server accepts, fixed at start-up."""
    max_upload: int  # bytes of image
    bind_host: str
    extra_hosts: frozenset[str] = frozenset()  # --allow-host names (a reverse proxy's, a LAN name)
    allow_dir: Path | None = None  # resolved; None: no file on the server is ever read
    read_timeout: float = READ_TIMEOUT_S  # seconds a request body may stall

    def host_allowed(self, name: str) -> bool:
        """Whether a Host header's name is this server's: the bound address, loopback names when it listens on
        loopback, and when it listens on every address (0.0.0.0, ::), any IP address and this machine's names.
        Any other name is a page that rebound its DNS name to this machine."""
        name = name.lower()
        if name in self.extra_hosts or name == self.bind_host.lower().strip("[]"):
            return True
        if is_loopback(self.bind_host):
            return is_loopback(name)
        if self.bind_host in ("0.0.0.0", "::", ""):
            return _is_ip(name) or is_loopback(name) or name in {socket.gethostname().lower(), socket.getfqdn().lower()}
        return False


class BodyTooLarge(Exception):
    pass


class BodyStalled(Exception):
    pass


class Guard:
    """An ASGI layer around the app: refuses foreign Host and Origin headers and POSTs without the client header,
    and enforces the upload limit while the body arrives (a chunked body has no Content-Length to check first)."""

    def __init__(self, app, policy: Policy):
        self.app, self.policy = app, policy
        self.limit = policy.max_upload + FORM_OVERHEAD

    def refusal(self, method: str, headers: dict[str, str]) -> tuple[int, str] | None:
        host = headers.get("host", "")
        if not self.policy.host_allowed(host_name(host)):
            return 421, (f"this server does not answer for the host name {host!r}; open it at its own address "
                         "(or start it with --allow-host NAME)")
        origin = headers.get("origin")
        if origin is not None and origin.split("://", 1)[-1] != host:
            return 403, f"requests from the page at {origin} are refused; use this server's own page"
        if method == "POST" and CLIENT_HEADER not in headers:
            return 403, (f"POST /predict needs the header '{CLIENT_HEADER.title()}: 1' (it keeps other web sites out), "
                         f"e.g. curl -H '{CLIENT_HEADER.title()}: 1' -F image=@photo.jpg http://{host}/predict")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            return 413, self.too_large()
        return None

    def too_large(self) -> str:
        return f"upload over the server's limit of {self.policy.max_upload / 1e6:g} MB"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refusal(scope["method"], headers)
        if refusal:
            return await send_json(send, *refusal)
        received, over, stalled = 0, False, False

        async def counted():
            nonlocal received, over, stalled
            try:
                message = await asyncio.wait_for(receive(), self.policy.read_timeout)
            except TimeoutError:
                stalled = True
                raise BodyStalled from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    over = True
                    raise BodyTooLarge
            return message

        async def unless_over(message):
            if not (over or stalled):  # the app's own answer to a body cut short (FastAPI's 400) is replaced
                await send(message)

        try:
            await self.app(scope, counted, unless_over)
        except (BodyTooLarge, BodyStalled):
            pass
        if over:
            await send_json(send, 413, self.too_large())
        elif stalled:
            await send_json(send, 408, f"the request body stalled for {self.policy.read_timeout:g} s; send it whole")


async def send_json(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def read_allowed(path: str, allow_dir: Path | None, max_upload: int) -> bytes:
    """The bytes of a regular file under `allow_dir` (symlinks followed), or Refused: a path outside it, a missing
    one, a folder, a device, a FIFO or a /proc file all get the same 404, so a client learns nothing about files
    outside the folder."""
    if allow_dir is None:
        raise Refused(403, "this server reads no files on its machine; start it with --allow-dir FOLDER to let the "
                           "page name files under FOLDER, or upload the image")
    given = Path(path[len("file://"):] if path.startswith("file://") else path)
    missing = Refused(404, f"no image file at {path} under the allowed folder")
    try:
        real = (allow_dir / given).resolve(strict=True)  # an absolute `given` replaces allow_dir
        if not real.is_relative_to(allow_dir):
            raise missing
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))  # a FIFO must not block
    except (OSError, RuntimeError, ValueError):
        raise missing from None
    try:
        opened = Path(f"/proc/self/fd/{fd}")  # what was opened, had a folder been swapped for a symlink meanwhile
        if not stat.S_ISREG(os.fstat(fd).st_mode) or (opened.exists() and not opened.resolve().is_relative_to(allow_dir)):
            raise missing
        data = os.read(fd, max_upload + 1)
    except OSError:
        raise Refused(415, f"{path} could not be read") from None
    finally:
        os.close(fd)
    if len(data) > max_upload:
        raise Refused(413, f"{path} is over the server's limit of {max_upload / 1e6:g} MB")
    return data


def decoded_bytes(im, size: tuple[int, int] | None = None) -> int:
    """What PIL holds for `im` decoded (at `size`, when given): width x height x bytes per pixel (several bands are
    stored in 4 bytes)."""
    import numpy as np
    from PIL import ImageMode

    mode = ImageMode.getmode(im.mode)
    per_pixel = 4 if len(mode.bands) > 1 else np.dtype(mode.typestr).itemsize
    width, height = size or im.size
    return width * height * max(per_pixel, 1)


def peak_bytes(im, target: tuple[int, int] | None) -> int:
    """The most the whole decode path holds at once for `im` (its header read, a JPEG's draft scale set): the
    decoded image; when shrunk to `target`, the resize's own copy (PIL premultiplies RGBA and LA into a full-size
    copy first) and its result; then to_rgb's copies of what it converts. Counted per image mode: a 7.9 kB palette
    PNG of 8000x8000 is 64 MB decoded, but about 1 GB once converted at full size."""
    from fastft.data.images import to_rgb_bytes_per_pixel

    decoded = decoded_bytes(im)
    if not target or target == im.size:
        return decoded + im.size[0] * im.size[1] * to_rgb_bytes_per_pixel(im)
    premultiplied = decoded if im.mode in ("RGBA", "LA") else 0
    return decoded + premultiplied + decoded_bytes(im, target) + target[0] * target[1] * to_rgb_bytes_per_pixel(im)


def release_freed_memory() -> None:
    """Hand freed memory back to the system after each request. glibc keeps what a thread freed in that thread's
    arena, so a server that decoded four large images at once otherwise stays that large (2.8 GB, measured)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc (musl has no malloc_trim)
            ctypes.CDLL(None).malloc_trim(0)


def decode(data: bytes, short_side: int | None = None):
    """An RGB PIL image from uploaded bytes, or Refused: not an image, or too large to decode safely. An image whose
    decode path would hold over LARGE_DECODE_BYTES is shrunk, before it is converted, to at least twice `short_side`
    (the model's resize target) on its shorter side, so its probabilities can differ from `fastft predict`'s on the
    same file in the third decimal."""
    from PIL import Image, UnidentifiedImageError

    from fastft.data.images import to_rgb

    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # PIL's own guard, from the header: over twice its 89 Mpx
        raise Refused(413, f"the image's header claims over {2 * Image.MAX_IMAGE_PIXELS:,} pixels, over the server's "
                           f"{MAX_PIXELS:,}; send a smaller one") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise Refused(415, "not an image fastft can read; send a JPEG, PNG, WebP, BMP, TIFF or GIF") from None
    width, height = im.size
    if width * height > MAX_PIXELS:  # decided from the header, before decoding anything
        raise Refused(413, f"the image is {width}x{height} pixels, over the server's {MAX_PIXELS:,}; send a smaller one")
    shrink = short_side and peak_bytes(im, None) > LARGE_DECODE_BYTES
    factor = min(width, height) // (2 * short_side) if shrink else 1
    target = (math.ceil(width / factor), math.ceil(height / factor)) if factor > 1 else None
    if target and im.format == "JPEG":
        im.draft(im.mode, target)  # decodes at 1/2, 1/4 or 1/8 scale, still at least `target`
    if (peak := peak_bytes(im, target)) > MAX_DECODE_BYTES:
        raise Refused(413, f"the image is {width}x{height} pixels in mode {im.mode}, {decoded_bytes(im) / 2**20:.0f} MiB "
                           f"decoded and {peak / 2**20:.0f} MiB while converted, over the server's "
                           f"{MAX_DECODE_BYTES / 2**20:.0f} MiB; send a smaller one (or a JPEG)")
    try:
        im.load()
        if target and im.size != target:
            im = im.resize(target, Image.BOX)  # in the image's own mode: a palette image by its nearest pixels
        return to_rgb(im)
    except (OSError, ValueError, SyntaxError):
        raise Refused(415, "the image is truncated or corrupt") from None


def gradcam_png(explainer, model, picture, batch, probs) -> str:
    """The photo beside the Grad-CAM picture of the top class, as a base64 PNG."""
    from fastft.atomic import subplots

    from fastft.deploy.explain import draw_beside, picture_of, shown_photo

    target = int(probs.argmax())
    heat = explainer.heat_maps(batch, [target])[0]
    fig, axes = subplots(1, 2, figsize=(6.4, 3.4))
    draw_beside(axes, shown_photo(picture), picture_of(model, batch[0]), heat, f"Grad-CAM: {model.classes[target]}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return base64.b64encode(buffer.getvalue()).decode()


def create_app(model, policy: Policy):
    """The FastAPI app for `model` (fastft.load's), wrapped in its Guard."""
    from fastapi import FastAPI, File, Form, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse

    from fastft.deploy import explain
    from fastft.deploy.predict import shown_labels

    app = FastAPI(title="fastft", docs_url=None, redoc_url=None, openapi_url=None)
    explainer = explain.Explainer(model) if explain.available() and hasattr(model, "network") else None
    gradcam_lock = threading.Lock()  # Grad-CAM hooks the network: one explanation at a time
    decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)
    short_side = resize_side(model.meta["input_size"], model.meta["crop_pct"])

    @app.exception_handler(Refused)
    async def refused(request, error: Refused):
        return JSONResponse({"error": str(error)}, status_code=error.status,
                            headers={"Retry-After": "1"} if error.status == 503 else None)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return page_html(model.classes, gradcam=explainer is not None, paths=policy.allow_dir is not None)

    @app.post("/predict")
    def predict(image: UploadFile | None = File(None), path: str | None = Form(None), top_k: int | None = Form(None),
                gradcam: bool = Form(False)):
        if top_k is not None and top_k < 1:
            raise Refused(422, f"top_k must be 1 or more, not {top_k}")
        if image is not None:
            data = image.file.read(policy.max_upload + 1)
            name = image.filename or "upload"
            if len(data) > policy.max_upload:
                raise Refused(413, f"upload over the server's limit of {policy.max_upload / 1e6:g} MB")
        elif path:
            data, name = read_allowed(path, policy.allow_dir, policy.max_upload), path
        else:
            raise Refused(422, "send an image file (multipart field 'image')")
        if not decode_slots.acquire(timeout=BUSY_WAIT_S):
            raise Refused(503, "the server is busy decoding other images; try again in a moment")
        try:
            picture = decode(data, short_side)
            batch = model.preprocess(picture)[None]
        finally:
            decode_slots.release()
        try:
            probs = model.predict_arrays(batch)[0]
        finally:
            release_freed_memory()
        result = model.result(name, probs)
        result["top"] = shown_labels(result, top_k)
        if gradcam and explainer is not None:
            with gradcam_lock:
                result["gradcam_png"] = gradcam_png(explainer, model, picture, batch, probs)
        return JSONResponse([result])

    return Guard(app, policy)


def free_port(host: str, port: int) -> None:
    """A one-line error now, rather than uvicorn's traceback later, when the port is taken or the address is not
    this machine's."""

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except socket.gaierror:
            raise UsageError(f"--host {host} is not an address or a name this machine knows; use 127.0.0.1 (this "
                             "machine only) or 0.0.0.0 (every network)") from None
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                raise UsageError(f"{host} is not an address of this machine, so the server cannot listen on it; use "
                                 "127.0.0.1 (this machine only) or 0.0.0.0 (every network)") from None
            if e.errno == errno.EACCES:
                raise UsageError(f"port {port} needs administrator rights; pick one over 1023 with --port") from None
            raise UsageError(f"port {port} on {host} is not free ({e.strerror}); pick another with --port") from None


def allowed_folder(allow_dir: Path | None) -> Path | None:
    if allow_dir is None:
        return None
    if not allow_dir.is_dir():
        raise UsageError(f"--allow-dir {allow_dir} is not a folder; name the folder whose images the page may read")
    return allow_dir.resolve()


def serve(model_path: Path, host: str, port: int, max_upload_mb: float = MAX_UPLOAD_MB, allow_dir: Path | None = None,
          allow_hosts: tuple[str, ...] = (), read_timeout: float = READ_TIMEOUT_S,
          max_connections: int = MAX_CONNECTIONS) -> None:

    if find_spec("fastapi") is None or find_spec("uvicorn") is None:
        raise UsageError("fastft serve needs FastAPI and uvicorn: pip install 'fastft[serve]'")
    import uvicorn

    from fastft.deploy.bundle import load

    policy = Policy(max_upload=int(max_upload_mb * 1e6), bind_host=host, allow_dir=allowed_folder(allow_dir),
                    extra_hosts=frozenset(name.lower() for name in allow_hosts), read_timeout=read_timeout)
    model = load(model_path)
    free_port(host, port)
    app = create_app(model, policy)
    reads = f"; reads files under {policy.allow_dir}" if policy.allow_dir else ""
    print(f"serving {model_path} ({model.meta['arch']}: {', '.join(model.classes)}) at http://{host}:{port}/{reads} "
          "(Ctrl-C stops it)", flush=True)
    # uvicorn answers 503 once the open connections, the new one included, reach limit_concurrency;
    # timeout_keep_alive closes idle kept-alive ones
    uvicorn.run(app, host=host, port=port, log_level="warning", limit_concurrency=max_connections + 1,
                timeout_keep_alive=5)


