"""The FastAPI app behind ``medfound serve``: a JSON API over :mod:`medfound.viewer.studies` that calls
the same library functions as the CLI (SAM sessions, in-context segmentation, fine-tuned predictors)."""

from __future__ import annotations

import hmac
import io
import re
import secrets
import threading
import uuid
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, StrictStr

from medfound.errors import InputError
from medfound.infer.incontext import SUPPORT_SIZES
from medfound.io.figures import display  # [i, j] (RAS) -> screen rows/cols, anterior up
from medfound.viewer.studies import ID, Study, StudyStore, safe_upload_name

STATIC = Path(__file__).parent / "static"


Finite = Annotated[float, Field(allow_inf_nan=False)]


class SamRequest(BaseModel):
    slice: int = Field(ge=0)
    box: Annotated[list[Finite], Field(min_length=4, max_length=4)] | None = None  # [i0, j0, i1, j1], slice indices
    points: list[Annotated[list[Finite], Field(min_length=3, max_length=3)]] | None = None  # [[i, j, 1 | 0], ...]
    label: int = Field(1, ge=1, le=65535)
    add: bool = Field(False, description="Keep the label's pixels already on the slice: the answer is another "
                                         "piece of the same structure (both kidneys). Otherwise it replaces them.")


class InContextRequest(BaseModel):
    support: StrictStr
    labels: list[Annotated[int, Field(ge=1, le=65535)]] | None = None
    support_size: int = Field(16, ge=SUPPORT_SIZES[0], le=SUPPORT_SIZES[1])  # the CLI's --support-size rule


class PredictRequest(BaseModel):
    model: StrictStr


def _validation_message(exc: RequestValidationError) -> str:
    """One line per problem naming the field, never echoing the client's input (it may be a whole file
    part, or hold NaN, which JSON cannot carry)."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "request"
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


class Guard:
    """ASGI guard in front of the app. Rejects a request whose Host is not one this server answers to
    (DNS rebinding), a state-changing request without the page's token (cross-origin form posts), and a
    body over the upload limit - from its Content-Length before reading, and by counting while it
    streams, so a large body is never read in full nor spooled to disk."""

    def __init__(self, app, limit: int, token: str, hosts: list[str] | None):
        self.app, self.limit, self.token, self.hosts = app, limit, token, hosts

    async def _refuse(self, scope, receive, send, status: int, detail: str) -> None:
        await JSONResponse({"detail": detail}, status_code=status, headers={"connection": "close"})(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.hosts is not None:
            host = headers.get("host", "")
            name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
            if name not in self.hosts:
                return await self._refuse(scope, receive, send, 400, "unexpected Host header")
        if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
            if not hmac.compare_digest(headers.get("x-medfound-token", ""), self.token):
                return await self._refuse(scope, receive, send, 403, "missing or wrong x-medfound-token header "
                                          "(state-changing requests come from the viewer's own page)")
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.limit):
                return await self._refuse(scope, receive, send, 413, f"upload larger than the "
                                          f"{self.limit / 2**20:g} MB limit")
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, f"upload larger than the {self.limit / 2**20:g} MB limit")
            return message

        return await self.app(scope, counted, send)


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


UID = re.compile(r"^[0-9]+(\.[0-9]+){1,40}$")


def _uid(text: str) -> str:
    """A DICOM UID (digits and dots), so that nothing else reaches the PACS's URL."""
    if not UID.match(text or "") or len(text) > 64:
        raise HTTPException(400, f"not a DICOM UID: {text[:80]!r}")
    return text


class PacsOpen(BaseModel):
    study: str
    series: str


def create_app(workdir: str | Path, supports: list[Path] | None = None, models: list[Path] | None = None,
               sam: str | None = None, incontext_model: Path | None = None, max_upload_mb: float = 512,
               max_voxels: int = 100_000_000, memory_mb: float = 4096, idle_minutes: float = 60,
               allowed_hosts: list[str] | None = None, token: str | None = None, device: str = "cpu",
               pacs: str | None = None, sam_flip: bool | None = None) -> FastAPI:
    """Build the app. ``supports``: nnU-Net example sets offered by name; ``models``: fine-tuned segmenter
    runs; ``sam``: a SAM run/checkpoint/variant for box and point prompts (None: the packaged small SAM).
    Limits: bytes per upload, voxels per image, memory of all open studies, idle minutes before a study
    is closed. ``allowed_hosts``: Host names answered (None: any); ``token``: the page's token that every
    state-changing request must carry in ``x-medfound-token`` (default: a new random one, ``app.state.token``).
    ``device``: where the models run. ``pacs``: a DICOMweb service root whose studies the page may list
    and open (only this one: the page never names a server itself). ``sam_flip``: mirror averaging of
    every SAM answer (None: the SAM's own setting)."""
    # No /api/docs page: FastAPI's loads its assets from a CDN, blank on an offline machine.
    app = FastAPI(title="medfound viewer", docs_url=None, redoc_url=None, openapi_url="/api/openapi.json")
    app.state.token = token or secrets.token_urlsafe(24)
    store = StudyStore(workdir, max_voxels=max_voxels, memory_bytes=int(memory_mb * 2**20),
                       idle_seconds=idle_minutes * 60)
    app.state.store = store
    support_sets = {p.name: p for p in (supports or [])}
    uploaded_supports: dict[str, Path] = {}
    limit = int(max_upload_mb * 1024 * 1024)
    app.add_middleware(Guard, limit=limit + 2**20, token=app.state.token, hosts=allowed_hosts)  # + multipart framing
    state: dict = {"sam": None, "incontext": None, "segmenters": {}}
    load_lock = threading.Lock()

    @app.exception_handler(InputError)
    def _bad_input(request: Request, exc: InputError):
        return JSONResponse(status_code=400, content={"detail": exc.message})

    @app.exception_handler(RequestValidationError)
    def _malformed(request: Request, exc: RequestValidationError):
        return JSONResponse(status_code=422, content={"detail": _validation_message(exc)})

    @app.exception_handler(KeyError)
    def _unknown(request: Request, exc: KeyError):
        return JSONResponse(status_code=404, content={"detail": f"unknown id {exc.args[0] if exc.args else ''}"})

    def _sam():
        with load_lock:
            if state["sam"] is None:
                from medfound.models.sam import load_sam_model

                model, cfg = load_sam_model(sam)
                state["sam"] = (model.to(device), cfg)
        return state["sam"]

    def _incontext():
        with load_lock:
            if state["incontext"] is None:
                from medfound.models.incontext_weights import load_incontext

                model, cfg = load_incontext(incontext_model)
                state["incontext"] = (model.to(device), cfg)
        return state["incontext"]

    def _support_folder(name: str) -> Path:
        if name in support_sets:
            return support_sets[name]
        if ID.match(name) and name in uploaded_supports:
            return uploaded_supports[name]
        raise HTTPException(404, f"unknown support set {name!r}")

    async def _read_limited(f: UploadFile, budget: list[int]) -> bytes:
        data = await f.read(limit + 1)
        budget[0] += len(data)
        if budget[0] > limit:
            raise HTTPException(413, f"upload larger than the {max_upload_mb:g} MB limit")
        return data

    page = (STATIC / "index.html").read_text().replace("{{MEDFOUND_TOKEN}}", app.state.token)

    @app.get("/")
    def index():
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/resources")
    def resources():
        return {"sam": sam or "medfound default (small conv SAM)", "supports": sorted(support_sets) + sorted(uploaded_supports),
                "models": sorted(p.name for p in (models or [])), "pacs": bool(pacs)}

    @app.post("/api/studies", status_code=201)
    async def upload_study(files: list[UploadFile] = File(...)):
        budget = [0]
        payload = [(f.filename or "upload", await _read_limited(f, budget)) for f in files]
        if not payload or not any(d for _, d in payload):
            raise HTTPException(400, "empty upload")
        return store.add(payload).info()

    @app.get("/api/pacs/series")
    def pacs_series(study: str):
        """The series of a study in the configured PACS (QIDO-RS)."""
        from medfound.io.dicomweb import parse, series_in

        if not pacs:
            raise HTTPException(404, "no PACS configured (serve --pacs)")
        ref = parse(f"{pacs.rstrip('/')}/studies/{_uid(study)}")
        return {"series": [{"series_uid": x.series, "modality": x.modality, "description": x.description,
                            "instances": x.instances} for x in series_in(ref)]}

    @app.post("/api/pacs/open", status_code=201)
    def pacs_open(body: PacsOpen):
        """Open one series of the configured PACS as a study (fetched into the cache, read as an upload is)."""
        from medfound.io.dicomweb import localise

        if not pacs:
            raise HTTPException(404, "no PACS configured (serve --pacs)")
        url = f"{pacs.rstrip('/')}/studies/{_uid(body.study)}/series/{_uid(body.series)}"
        (_, folder, _), = localise(url)
        files = [(f.name, f.read_bytes()) for f in sorted(folder.iterdir()) if not f.name.startswith(".")]
        if sum(len(d) for _, d in files) > limit:
            raise HTTPException(413, f"series larger than the {max_upload_mb:g} MB limit")
        return store.add(files).info()

    @app.get("/api/studies/{sid}")
    def study_info(sid: str):
        return store.get(sid).info()

    @app.delete("/api/studies/{sid}")
    def close_study(sid: str):
        store.delete(sid)
        return {"closed": sid}

    @app.get("/api/studies/{sid}/slice/{k}.png")
    def slice_png(sid: str, k: int, level: float | None = None, width: float | None = None):
        st = store.get(sid)
        a = st.slice(k).astype(np.float32)
        if level is None or width is None:
            level, width = next(iter(st.presets().values()))
        lo = level - width / 2
        img = np.clip((a - lo) / max(width, 1e-6), 0, 1)
        return Response(_png((display(img) * 255).astype(np.uint8)), media_type="image/png",
                        headers={"Cache-Control": "no-store"})

    @app.get("/api/studies/{sid}/mask/{k}.png")
    def mask_png(sid: str, k: int):
        st = store.get(sid)
        with st.lock:
            m = np.clip(st.mask_slice(k), 0, 255).astype(np.uint8)
        return Response(_png(display(m)), media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.post("/api/studies/{sid}/sam")
    def sam_prompt(sid: str, req: SamRequest):
        st = store.get(sid)
        model, _cfg = _sam()
        from medfound.infer.sam_segment import SamSession

        with st.lock:
            pts = [p[:2] for p in (req.points or [])] or None
            labs = [p[2] for p in (req.points or [])] or None
            if st.sam_session is None:
                st.sam_session = SamSession.for_model(model, _cfg, st.view, axis=2, flip=sam_flip)
            # the session checks the prompt (InputError -> 400) before anything below changes the mask
            m = st.sam_session.segment(req.slice, box=req.box, points=pts, labels=labs)
            st.push_undo([req.slice])
            sl = st.mask_slice(req.slice)
            if not req.add:
                sl[sl == req.label] = 0
            sl[m] = req.label
            st.labels.setdefault(req.label, f"label {req.label}")
            return {"pixels": int(m.sum()), "volumes_ml": st.volumes_ml(), "undo": len(st.undo)}

    @app.post("/api/supports", status_code=201)
    async def upload_support(images: list[UploadFile] = File(...), masks: list[UploadFile] = File(...)):
        """An example set from image/mask pairs (paired in upload order) -> an nnU-Net folder."""
        from medfound.data.nnunet import check_label, write_dataset
        from medfound.io import read_image

        if len(images) != len(masks) or not images:
            raise HTTPException(400, "upload as many masks as images (paired in order)")
        budget = [0]
        sid = uuid.uuid4().hex
        tmp = Path(workdir) / "supports" / f".{sid}"
        cases, values = [], set()
        try:
            tmp.mkdir(parents=True)
            for i, (fi, fm) in enumerate(zip(images, masks)):
                read = []
                for j, (kind, f) in enumerate((("image", fi), ("mask", fm))):
                    data = await _read_limited(f, budget)
                    p = tmp / safe_upload_name(2 * i + j, f.filename or kind, data)  # readers need a suffix
                    p.write_bytes(data)
                    try:
                        read.append(read_image(p))
                    except InputError as e:
                        raise InputError(f.filename or kind, e.problem) from None
                img, lab = read
                try:  # as `medfound data check` does: same grid, integer values >= 0
                    check_label(lab, img, fm.filename or "mask")
                except InputError as e:
                    raise InputError(fm.filename or "mask", e.problem) from None
                if lab.array.size and lab.array.max() > 65535:
                    raise InputError(fm.filename or "mask", "label values above 65535")
                arr = lab.array.astype(np.uint16)
                values |= {int(v) for v in np.unique(arr) if v}
                cases.append((f"case{i:04d}", img, arr))
            if not values:
                raise InputError(masks[0].filename, "the masks are empty")
            names = {"background": 0} | {f"label_{v}": v for v in sorted(values)}
            write_dataset(Path(workdir) / "supports" / sid, cases, names, {"0": cases[0][1].modality})
        finally:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        uploaded_supports[sid] = Path(workdir) / "supports" / sid
        return {"id": sid, "cases": len(cases), "labels": sorted(values)}

    @app.post("/api/studies/{sid}/incontext")
    def incontext(sid: str, req: InContextRequest):
        st = store.get(sid)
        from medfound.data.nnunet import NnUNetDataset
        from medfound.infer.incontext import inference_settings, resolve_labels, segment_image, support_pools

        folder = _support_folder(req.support)
        model, cfg = _incontext()
        size = int(cfg["model"]["size"])
        labels = resolve_labels(NnUNetDataset.open(folder), [str(v) for v in req.labels] if req.labels else None)
        pools = support_pools(folder, labels, size)
        with st.lock:
            # the study's view is already canonical RAS, so the result lands on the view's grid
            result = segment_image(model, st.view, pools, size, 2, req.support_size, **inference_settings(cfg))
            st.push_undo()
            for v in labels:
                st.mask[st.mask == v] = 0
            st.mask[result > 0] = result[result > 0]
            st.labels.update(labels)
            return {"labels": {str(k): v for k, v in labels.items()}, "volumes_ml": st.volumes_ml(), "undo": len(st.undo)}

    @app.post("/api/studies/{sid}/predict")
    def predict(sid: str, req: PredictRequest):
        st = store.get(sid)
        runs = {p.name: p for p in (models or [])}
        if req.model not in runs:
            raise HTTPException(404, f"unknown model {req.model!r}")
        from medfound.infer.predict import predict_image
        from medfound.models.segmenter import load_segmenter

        with load_lock:
            if req.model not in state["segmenters"]:
                model, cfg = load_segmenter(runs[req.model])
                state["segmenters"][req.model] = (model.to(device), cfg)
        model, cfg = state["segmenters"][req.model]
        with st.lock:
            out = predict_image(model, cfg, st.view)
            st.push_undo()
            st.mask[:] = out
            st.labels.update({int(i["label"]): i["name"] for i in cfg["classes"].values()})
            return {"volumes_ml": st.volumes_ml(), "undo": len(st.undo)}

    @app.post("/api/studies/{sid}/undo")
    def undo(sid: str):
        st = store.get(sid)
        with st.lock:
            if not st.undo:
                raise HTTPException(409, "nothing to undo")
            st.pop_undo()
            return {"volumes_ml": st.volumes_ml(), "undo": len(st.undo)}

    @app.get("/api/studies/{sid}/download")
    def download(sid: str, format: str = "nifti"):
        st: Study = store.get(sid)
        from medfound.io import write_mask

        with st.lock:
            mask = st.mask_in_image_geometry()
            out = st.folder / "download"
            out.mkdir(exist_ok=True)
            if format == "nifti":
                path = write_mask(mask, st.image, out / "mask.nii.gz")
                return FileResponse(path, filename=f"{sid}_mask.nii.gz", media_type="application/gzip")
            if format == "dicom-seg":
                if st.image.format != "dicom":
                    raise HTTPException(400, "DICOM-SEG needs a study uploaded as DICOM")
                from medfound.io.dicomseg import write_dicom_seg

                path = write_dicom_seg(mask, st.image, out / "mask_seg.dcm", labels=st.labels)
                return FileResponse(path, filename=f"{sid}_seg.dcm", media_type="application/dicom")
        raise HTTPException(400, "format must be nifti or dicom-seg")

    return app
