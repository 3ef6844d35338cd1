"""The ASGI app behind ``unetkit serve``: a static page and a small JSON API.

Routes (all JSON unless noted):
    GET  /                          the page (static HTML/CSS/JS shipped in the package)
    GET  /api/info                  models, samplers, limits
    POST /api/images                multipart ``file`` -> stored image facts
    GET  /api/images/{id}/preview.png
    POST /api/images/{id}/labels    raw little-endian int32 H×W body: corrected labels
    POST /api/images/{id}/mask      raw uint8 H×W body: inpainting mask (non-zero = repaint)
    POST /api/jobs/{segment,finetune,generate,inpaint}   -> {"id": job id}
    GET  /api/jobs/{id}             state, progress, losses, result
    POST /api/jobs/{id}/cancel
    GET  /api/jobs/{id}/files/{name} and /api/jobs/{id}/files/{index}/{name}
    GET  /api/jobs/{id}/labels/{index}   raw int32 labels of a segmented image
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from unetkit.diffusion import SCHEDULER_NAMES
from unetkit.errors import ConfigError, DataError, UnetkitError, did_you_mean
from unetkit.web import tasks
from unetkit.web.jobs import JobRunner
from unetkit.web.models import ModelList
from unetkit.web.uploads import StoredImage, UploadError, check_size, store_image

STATIC = Path(__file__).parent / "static"
ID = re.compile(r"[A-Za-z0-9_-]{8,32}")
FILE_NAME = re.compile(r"[a-z0-9_]{1,40}\.(png|tif|csv|geojson)")
# nothing the page loads may come from elsewhere: the browser enforces it too
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
LIMITS = {"n": (1, 16), "steps": (1, 500), "finetune_steps": (1, 2000), "tile": (16, 4096)}


class WebState:
    """Everything the routes share: models, jobs, uploaded images and limits."""

    def __init__(
        self, models: ModelList, work_dir: Path, *, max_upload: int, max_pixels: int, workers: int
    ) -> None:
        self.models = models
        self.images_dir = work_dir / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.runner = JobRunner(work_dir / "jobs", workers=workers)
        self.cache = tasks.ModelCache()
        self.max_upload = max_upload
        self.max_pixels = max_pixels
        self.images: dict[str, StoredImage] = {}

    def image(self, image_id: str) -> StoredImage:
        found = self.images.get(image_id) if ID.fullmatch(str(image_id)) else None
        if found is None:
            raise UploadError(f"image {str(image_id)[:40]!r}: unknown (upload it again)", 404)
        return found

    def job(self, job_id: str) -> Any:
        found = self.runner.get(job_id) if ID.fullmatch(job_id) else None
        if found is None:
            raise UploadError(f"job {job_id[:40]!r}: unknown or expired", 404)
        return found


def create_app(
    models: ModelList,
    *,
    work_dir: str | Path | None = None,
    max_upload_mb: float = 64,
    max_pixels: int = 100_000_000,
    workers: int = 1,
    allowed_hosts: list[str] | None = None,
) -> FastAPI:
    """Build the app.

    Args:
        models: what the page may choose from (``ModelList``).
        work_dir: uploads and job folders (default: a temporary folder, deleted when the
            server stops).
        max_upload_mb: largest accepted upload, MiB.
        max_pixels: largest accepted image, H*W.
        workers: jobs running at once.
        allowed_hosts: Host headers accepted (None = any); loopback names guard a local
            server against DNS rebinding.

    Example:
        >>> app = create_app(ModelList([Path("runs/demo")]))   # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)      # doctest: +SKIP
    """
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="unetkit-web-"))
    state = WebState(
        models,
        work,
        max_upload=int(max_upload_mb * 2**20),
        max_pixels=max_pixels,
        workers=workers,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        state.runner.shutdown()  # cancel running jobs, stop the worker threads
        if not work_dir:  # our own temporary folder: uploads and results go with the server
            shutil.rmtree(work, ignore_errors=True)

    app = FastAPI(
        title="unetkit", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    app.state.web = state
    if allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.exception_handler(UnetkitError)
    async def unetkit_error(request: Request, exc: UnetkitError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=getattr(exc, "status", 400))

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    add_image_routes(app, state)
    add_job_routes(app, state)
    return app


def add_image_routes(app: FastAPI, state: WebState) -> None:
    """Upload, preview, and the raw label / mask arrays the page paints."""

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {
            "models": [m.to_dict() for m in state.models.list()],
            "samplers": list(SCHEDULER_NAMES),
            "max_upload_mb": state.max_upload / 2**20,
            "limits": LIMITS,
        }

    @app.post("/api/images")
    async def upload(request: Request) -> dict[str, Any]:
        # refuse by the declared size before reading anything (chunked bodies have none)
        check_size(declared_length(request), state.max_upload + 2**16, "upload")
        form = await request.form(max_files=1, max_fields=4)
        file = form.get("file")
        if file is None or isinstance(file, str):
            raise UploadError("upload: send one image as the multipart field 'file'")
        data = await file.read(state.max_upload + 1)
        check_size(len(data), state.max_upload, str(file.filename or "upload")[:80])
        stored = await run_in_threadpool(
            store_image, data, file.filename, state.images_dir, max_pixels=state.max_pixels
        )
        state.images[stored.id] = stored
        return stored.to_dict()

    @app.get("/api/images/{image_id}/preview.png")
    def preview(image_id: str) -> FileResponse:
        return FileResponse(state.image(image_id).folder / "preview.png", media_type="image/png")

    async def raw_array(request: Request, image: StoredImage, dtype: Any, what: str) -> Any:
        expected = image.width * image.height * np.dtype(dtype).itemsize
        declared = declared_length(request)
        body = await request.body() if declared == expected else b""
        if len(body) != expected:  # refused unread if the declared size is wrong
            raise UploadError(
                f"{what} of {image.name}: {declared} bytes, expected {expected} "
                f"({image.width}x{image.height} {np.dtype(dtype).name})"
            )
        return np.frombuffer(body, dtype=dtype).reshape(image.height, image.width)

    @app.post("/api/images/{image_id}/labels")
    async def put_labels(image_id: str, request: Request) -> dict[str, Any]:
        image = state.image(image_id)
        labels = await raw_array(request, image, "<i4", "labels")
        if labels.min() < 0:
            raise UploadError(f"labels of {image.name}: negative label values")
        np.save(image.folder / "labels.npy", labels)
        return {"image": image.id, "objects": int(len(np.unique(labels[labels > 0])))}

    @app.post("/api/images/{image_id}/mask")
    async def put_mask(image_id: str, request: Request) -> dict[str, Any]:
        image = state.image(image_id)
        mask = await raw_array(request, image, np.uint8, "mask")
        np.save(image.folder / "mask.npy", mask > 0)
        return {"image": image.id, "pixels": int((mask > 0).sum())}


def declared_length(request: Request) -> int:
    """The request's Content-Length; UploadError 411 if it has none (or a bad one)."""
    try:
        return int(request.headers["content-length"])
    except (KeyError, ValueError):
        raise UploadError("upload: send a Content-Length header", 411) from None


def _int(body: dict, key: str, default: int | None, limits: tuple[int, int] | None) -> Any:
    value = body.get(key, default)
    if value is None and default is None:
        return None
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a whole number, got {value!r}") from None
    if limits and not limits[0] <= value <= limits[1]:
        raise ConfigError(f"{key}: {value} is outside {limits[0]}..{limits[1]}")
    return value


def sample_request(body: dict) -> tasks.SampleRequest:
    """Validate generate / inpaint settings; samplers come from the library's list."""
    sampler = str(body.get("sampler") or "ddim")
    if sampler not in SCHEDULER_NAMES:
        raise ConfigError(
            f"sampler: {sampler!r} is not one of {', '.join(SCHEDULER_NAMES)}"
            f"{did_you_mean(sampler, SCHEDULER_NAMES)}"
        )
    try:
        guidance = float(body.get("guidance", 3.0))
    except (TypeError, ValueError):
        raise ConfigError(f"guidance: expected a number, got {body.get('guidance')!r}") from None
    if not 0 <= guidance <= 50:
        raise ConfigError(f"guidance: {guidance} is outside 0..50")
    return tasks.SampleRequest(
        prompt=str(body.get("prompt", ""))[:500],
        n=_int(body, "n", 4, LIMITS["n"]),
        steps=_int(body, "steps", 25, LIMITS["steps"]),
        guidance=guidance,
        seed=_int(body, "seed", 0, (0, 2**31 - 1)),
        sampler=sampler,
    )


def _labels_of(image: StoredImage) -> np.ndarray:
    path = image.folder / "labels.npy"
    if not path.is_file():
        raise DataError(f"{image.name}: no corrected labels saved; paint and save them first")
    return np.load(path)


async def body_of(request: Request) -> dict:
    """The request's JSON object; ConfigError (400) for anything else."""
    try:
        body = await request.json()
    except ValueError:
        raise ConfigError("request: the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise ConfigError("request: the body must be a JSON object")
    return body


def add_job_routes(app: FastAPI, state: WebState) -> None:
    """Start the four kinds of job (each returns the job id at once)."""

    def submitted(kind: str, work: Any) -> dict[str, str]:
        return {"id": state.runner.submit(kind, work).id}

    @app.post("/api/jobs/segment")
    async def segment(request: Request) -> dict[str, str]:
        body = await body_of(request)
        entry = state.models.get(str(body.get("model")), "segment")
        images = [state.image(i) for i in body.get("images") or []]
        if not images:
            raise DataError("images: upload at least one image first")
        tile = _int(body, "tile", None, LIMITS["tile"])
        return submitted("segment", tasks.segment_task(state.cache, entry, images, tile))

    @app.post("/api/jobs/finetune")
    async def finetune(request: Request) -> dict[str, str]:
        body = await body_of(request)
        entry = state.models.get(str(body.get("model")), "segment")
        images = [state.image(i) for i in body.get("images") or []]
        if not images:
            raise DataError("images: correct at least one segmented image first")
        req = tasks.FinetuneRequest(
            images,
            [_labels_of(im) for im in images],
            steps=_int(body, "steps", 50, LIMITS["finetune_steps"]),
            tile=_int(body, "tile", None, LIMITS["tile"]),
        )
        work = tasks.finetune_task(state.cache, state.models, entry, req)
        return submitted("finetune", work)

    @app.post("/api/jobs/generate")
    async def generate(request: Request) -> dict[str, str]:
        body = await body_of(request)
        entry = state.models.get(str(body.get("model")), "diffusion")
        work = tasks.generate_task(state.cache, entry, sample_request(body))
        return submitted("generate", work)

    @app.post("/api/jobs/inpaint")
    async def inpaint(request: Request) -> dict[str, str]:
        body = await body_of(request)
        entry = state.models.get(str(body.get("model")), "diffusion")
        image = state.image(str(body.get("image")))
        if not (image.folder / "mask.npy").is_file():
            raise DataError(f"{image.name}: brush a mask over it first")
        mask = np.load(image.folder / "mask.npy")
        work = tasks.inpaint_task(state.cache, entry, image, mask, sample_request(body))
        return submitted("inpaint", work)

    add_job_result_routes(app, state)


def add_job_result_routes(app: FastAPI, state: WebState) -> None:
    """Poll and cancel jobs; download their files."""

    @app.get("/api/jobs/{job_id}")
    def job_status(job_id: str) -> dict[str, Any]:
        return state.job(job_id).to_dict()

    @app.post("/api/jobs/{job_id}/cancel")
    def cancel(job_id: str) -> dict[str, Any]:
        state.job(job_id)
        return state.runner.cancel(job_id).to_dict()

    def job_file(job_id: str, *parts: str) -> Path:
        job = state.job(job_id)
        name = parts[-1]
        if not FILE_NAME.fullmatch(name) or not all(p.isdigit() for p in parts[:-1]):
            raise UploadError(f"file {name[:40]!r}: not a result file name", 404)
        path = job.folder.joinpath(*parts)
        if not path.is_file():
            raise UploadError(f"file {name!r}: not (yet) written by job {job.id}", 404)
        return path

    @app.get("/api/jobs/{job_id}/files/{name}")
    def download(job_id: str, name: str) -> FileResponse:
        path = job_file(job_id, name)
        return FileResponse(path, filename=path.name)

    @app.get("/api/jobs/{job_id}/files/{index}/{name}")
    def download_indexed(job_id: str, index: str, name: str) -> FileResponse:
        path = job_file(job_id, index, name)
        return FileResponse(path, filename=path.name)

    @app.get("/api/jobs/{job_id}/labels/{index}")
    def labels(job_id: str, index: str) -> Response:
        job = state.job(job_id)
        path = job.folder / index / "instances.npy"
        if not index.isdigit() or not path.is_file():
            raise UploadError(f"labels {index[:10]!r}: no such image in job {job.id}", 404)
        arr = np.load(path).astype("<i4")
        headers = {"X-Height": str(arr.shape[0]), "X-Width": str(arr.shape[1])}
        return Response(arr.tobytes(), media_type="application/octet-stream", headers=headers)
