"""Errors of the hub, one tree; each branch says what the caller should do.

    HubError                    a request the hub cannot serve (HTTP 500 if it reaches the edge)
    ├── NotFound                the named thing does not exist: check the name (404)
    ├── Conflict                it exists already or clashes with existing state: pick another
    │                           name or remove the old one first (409)
    ├── InvalidInput            the request itself is wrong: fix it and send it again (422)
    │   └── ModelCheckFailed    the model does not load or its sample input does not give the
    │                           expected output: fix the model or the sample files (422)
    ├── TooLarge                over a configured size limit (413)
    ├── Unauthorized            missing, wrong, expired or revoked API token, or a wrong
    │                           enrolment token (401)
    ├── Forbidden               the API token is valid but its role may not do this: use a
    │                           token with a higher role (403)
    ├── SigningUnavailable      a needed private key is offline or missing: bring the key
    │                           back (``outpost-hub keys``) and retry (503)
    ├── MessagingUnavailable    the broker cannot be reached: retry later (503)
    └── CorruptStorage          stored bytes no longer match their hash: restore the hub's
                                data directory from a backup or register again (500)

Services raise these; ``install_error_handler`` maps them to HTTP responses in one place, so no
business code knows about HTTP.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

logger = logging.getLogger(__name__)


class HubError(Exception):
    status_code = 500
    code = "internal"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(HubError):
    status_code = 404
    code = "not_found"


class Conflict(HubError):
    status_code = 409
    code = "conflict"


class InvalidInput(HubError):
    status_code = 422
    code = "invalid_input"


class ModelCheckFailed(InvalidInput):
    code = "model_check_failed"


class TooLarge(HubError):
    status_code = 413
    code = "too_large"


class Unauthorized(HubError):
    status_code = 401
    code = "unauthorized"


class Forbidden(HubError):
    status_code = 403
    code = "forbidden"


class SigningUnavailable(HubError):
    status_code = 503
    code = "signing_unavailable"


class MessagingUnavailable(HubError):
    status_code = 503
    code = "messaging_unavailable"


class CorruptStorage(HubError):
    status_code = 500
    code = "corrupt_storage"


async def _handle_hub_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HubError)
    if exc.status_code >= 500:
        logger.warning("request failed", extra={"path": request.url.path, "error": exc.detail})
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    return JSONResponse(
        status_code=exc.status_code,
        content={"detail": exc.detail, "code": exc.code},
        headers=headers,
    )


def install_error_handler(app: FastAPI) -> None:
    """The one place where hub errors become HTTP responses."""
    app.add_exception_handler(HubError, _handle_hub_error)
