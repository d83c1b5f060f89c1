"""Registry routes under /api/v1/models."""

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from hub.dependencies import AdminDep, ContextDep, SessionDep
from hub.errors import InvalidInput
from hub.registry import service
from hub.registry.schemas import ModelSummary, ModelVersionPublic

router = APIRouter(prefix="/api/v1/models", tags=["models"], dependencies=[AdminDep])


async def _read(upload: UploadFile, limit: int) -> bytes:
    # Read one byte past the limit so an oversized upload is refused without holding all of it.
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise InvalidInput(f"{upload.filename} is over the size limit of {limit} bytes")
    return data


@router.post("", status_code=201)
async def register(
    ctx: ContextDep,
    session: SessionDep,
    name: Annotated[str, Form()],
    framework: Annotated[str, Form()],
    files: Annotated[list[UploadFile], File(description="model file(s); the first is loaded")],
    sample_input: Annotated[UploadFile, File()],
    expected_output: Annotated[UploadFile, File()],
    tags: Annotated[list[str] | None, Form(description="repeated key=value")] = None,
    description: Annotated[str, Form()] = "",
    entry_script: Annotated[
        UploadFile | None,
        File(description="score.py with init() and run(raw_data): devices run the model with it"),
    ] = None,
    requirements: Annotated[
        list[str] | None, Form(description="repeated PEP 508 requirement of the entry script")
    ] = None,
    options: Annotated[
        list[str] | None, Form(description="repeated key=value runtime option")
    ] = None,
) -> ModelVersionPublic:
    limit = ctx.settings.registry.max_package_bytes
    uploaded = [
        service.UploadedFile(name=f.filename or "", data=await _read(f, limit)) for f in files
    ]
    script = None
    if entry_script is not None:
        script = service.UploadedFile(
            name=entry_script.filename or "", data=await _read(entry_script, limit)
        )
    sample = await _read(sample_input, limit)
    expected = await _read(expected_output, limit)
    # Loading and running the model takes a while; keep it off the event loop.
    row = await run_in_threadpool(
        service.register_model,
        session=session,
        blobs=ctx.blobs,
        name=name,
        framework=framework,
        files=uploaded,
        sample_input=sample,
        expected_output=expected,
        tags=service.parse_tags(tags or []),
        description=description,
        max_bytes=limit,
        entry_script=script,
        requirements=requirements or [],
        options=options or [],
    )
    return service.to_public(session=session, row=row)


@router.get("")
def list_models(session: SessionDep) -> list[ModelSummary]:
    return service.list_models(session=session)


@router.get("/{name}/{version}")
def show(session: SessionDep, name: str, version: str) -> ModelVersionPublic:
    row = service.get_version(session=session, name=name, version=version)
    return service.to_public(session=session, row=row)


@router.get("/{name}/{version}/files/{path:path}")
def download(
    ctx: ContextDep, session: SessionDep, name: str, version: str, path: str
) -> FileResponse:
    stored = service.file_path(
        session=session, blobs=ctx.blobs, name=name, version=version, path=path
    )
    return FileResponse(stored, filename=path, media_type="application/octet-stream")
