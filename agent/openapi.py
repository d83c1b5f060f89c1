"""The scoring endpoint's self-description: an OpenAPI 3 document of the active models.

The cloud workflow gives each endpoint a ``swagger_uri``; a device serves the same at
``GET /swagger.json``, so a client can be generated against it. Each active model gets its own
``POST /models/{name}/score`` path with a request schema built from its signature (dtypes as
JSON types, fixed dimensions as array lengths), its response schema, and an example request: the
sample input the package carries for its health check, which is known to give a right answer.
The default model's ``POST /score`` repeats its path. Entry scripts take whatever their
``run(raw_data)`` reads, so their schema is that of the declared signature when there is one.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent import __version__
from agent.protocol.documents import ModelSignature, TensorSpec
from agent.runtimes.base import ActiveModel

OPENAPI_VERSION = "3.0.3"
MAX_EXAMPLE_BYTES = 64 * 1024  # a larger sample is left out rather than bloat the document
_ERROR_STATUSES = {
    "400": "the body is not valid, or its data does not fit the model's signature",
    "401": "missing or wrong API key",
    "404": "no such active model",
    "413": "the body is too large",
    "415": "a content type the endpoint does not read",
    "500": "the model failed",
    "503": "no active model, or its worker is restarting",
    "504": "an entry script ran past its time limit",
}


def _scalar(dtype: str) -> dict[str, Any]:
    """The JSON type of one element, with the dtype's range, so a client validating against it
    sends nothing the endpoint refuses as out of range."""
    if dtype == "string":
        return {"type": "string"}
    if dtype == "bool":
        return {"type": "boolean"}
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        return {}  # a sequence or map output: any JSON value
    if resolved.kind == "f":
        limit = float(np.finfo(resolved).max)
        return {"type": "number", "format": dtype, "minimum": -limit, "maximum": limit}
    if resolved.kind in "iu":
        info = np.iinfo(resolved)
        return {
            "type": "integer",
            "format": dtype,
            "minimum": int(info.min),
            "maximum": int(info.max),
        }
    return {}


def tensor_schema(spec: TensorSpec) -> dict[str, Any]:
    """Nested arrays for the tensor's shape; fixed dimensions become exact lengths."""
    schema = _scalar(spec.dtype)
    for dim in reversed(spec.shape):
        array: dict[str, Any] = {"type": "array", "items": schema}
        if dim is not None:
            array["minItems"] = dim
            array["maxItems"] = dim
        else:
            array["minItems"] = 1  # a free (batch) dimension: at least one row to score
        schema = array
    return schema


def _data_schema(signature: ModelSignature) -> dict[str, Any]:
    inputs = signature.inputs
    if not inputs:
        return {"description": "whatever the entry script's run(raw_data) reads"}
    if len(inputs) == 1:
        only = tensor_schema(inputs[0])
        by_name = _by_name(inputs)
        return {
            "description": f"rows for input {inputs[0].name!r}, or an object of input name to rows",
            "oneOf": [only, by_name],
        }
    return _by_name(inputs)


def _by_name(specs: Sequence[TensorSpec]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {s.name: tensor_schema(s) for s in specs},
        "required": [s.name for s in specs],
        "additionalProperties": False,
    }


def _example(model: ActiveModel) -> Any:
    """The package's health-check sample as a request, or None when it cannot be had."""
    if model.files_dir is None:
        return None
    path = Path(model.files_dir) / model.manifest.health_check.input
    try:
        if path.stat().st_size > MAX_EXAMPLE_BYTES:
            return None
        sample = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(sample, dict) and "data" in sample:
        return sample
    return {"data": sample}


def _component_name(model: ActiveModel) -> str:
    return "".join(part.capitalize() for part in model.name.replace(".", "-").split("-") if part)


def _operation(model: ActiveModel, components: dict[str, Any], *, default: bool) -> dict[str, Any]:
    signature = model.signature()
    scripted = model.manifest.runtime.kind == "script"
    stem = _component_name(model) or "Model"
    request_name, response_name = f"{stem}Request", f"{stem}Response"
    components[request_name] = {
        "type": "object",
        "required": ["data"],
        "properties": {"data": _data_schema(signature)},
    }
    model_ref = {"$ref": "#/components/schemas/ModelVersion"}
    if scripted:
        components[response_name] = {
            "type": "object",
            "properties": {
                "result": {"description": "what run(raw_data) returned"},
                "model": model_ref,
            },
        }
    else:
        outputs = {o.name: tensor_schema(o) for o in signature.outputs}
        first = tensor_schema(signature.outputs[0]) if signature.outputs else {}
        components[response_name] = {
            "type": "object",
            "properties": {
                "result": {**first, "description": "the first output"},
                "outputs": {"type": "object", "properties": outputs},
                "model": model_ref,
            },
        }
    media: dict[str, Any] = {"schema": {"$ref": f"#/components/schemas/{request_name}"}}
    example = _example(model)
    if example is not None:
        media["example"] = example
    content: dict[str, Any] = {"application/json": media}
    if not scripted:
        binary = {"schema": {"type": "string", "format": "binary"}}
        content["application/x-npy"] = binary
        content["application/x-npz"] = binary
    responses: dict[str, Any] = {
        "200": {
            "description": "the prediction",
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{response_name}"}}
            },
        }
    }
    for status, why in _ERROR_STATUSES.items():
        responses[status] = {
            "description": why,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    what = "the default model" if default else f"model {model.name!r}"
    return {
        "summary": f"Score with {what} ({model.name} v{model.version})",
        "operationId": "score_default" if default else f"score_{stem}",
        "requestBody": {"required": True, "content": content},
        "responses": responses,
    }


def openapi_document(models: Sequence[ActiveModel]) -> dict[str, Any]:
    """The document for ``models`` (the first is the default one)."""
    components: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
        },
        "ModelVersion": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "version": {"type": "integer"}},
        },
    }
    paths: dict[str, Any] = {
        "/healthz": {
            "get": {
                "summary": "Whether a model is being served",
                "security": [],
                "responses": {"200": {"description": "serving"}, "503": {"description": "not"}},
            }
        },
        "/models": {
            "get": {
                "summary": "The active models with versions and signatures",
                "responses": {"200": {"description": "the active models"}},
            }
        },
    }
    for index, model in enumerate(models):
        if index == 0:
            paths["/score"] = {"post": _operation(model, components, default=True)}
        paths[f"/models/{model.name}/score"] = {
            "post": _operation(model, components, default=False)
        }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Outpost device scoring endpoint",
            "version": __version__,
            "description": "Models served by this device. Send the key as `Authorization: "
            "Bearer <key>` or `x-api-key: <key>`.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
        "security": [{"bearer": []}, {"apiKey": []}],
    }
