"""Enrolment: trade a one-time token for a device identity, broker credentials and the root key.

The root key arrives over the enrolment connection, so that connection is the moment of trust
(use HTTPS to the hub, or pass the root key's fingerprint printed by ``outpost-hub keys show``
to pin it). Everything signed later is checked against this key.
"""

import json
import urllib.error
import urllib.request
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from agent.errors import EnrollmentError
from agent.protocol.documents import Signed
from agent.protocol.keys import b64decode, key_id
from agent.state import BrokerCredentials, Identity, StateDir
from agent.trust import verify_keyring

ENROLL_PATH = "/api/v1/enroll"


class EnrollmentResponse(BaseModel):
    model_config = ConfigDict(extra="ignore")

    device_id: str
    broker: BrokerCredentials
    topic_root: str
    root_public_key: str
    keyring: Signed


def _post_json(url: str, body: dict[str, Any], timeout_s: float) -> Any:
    request = urllib.request.Request(  # noqa: S310 - the operator gives the hub URL
        url,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise EnrollmentError(f"hub refused enrolment ({exc.code}): {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise EnrollmentError(f"cannot reach the hub at {url}: {exc}") from None
    except json.JSONDecodeError:
        raise EnrollmentError("hub answered with something that is not JSON") from None


def enroll(
    *,
    hub_url: str,
    token: str,
    state: StateDir,
    now: datetime,
    device_class: str = "generic",
    name: str | None = None,
    root_fingerprint: str | None = None,
    timeout_s: float = 30.0,
) -> Identity:
    """Enrol this device with the hub and store its identity in ``state``."""
    if (state.root / "identity.json").exists():
        raise EnrollmentError(f"{state.root} already holds an identity; use another state dir")
    raw = _post_json(
        hub_url.rstrip("/") + ENROLL_PATH,
        {"token": token, "name": name, "device_class": device_class},
        timeout_s,
    )
    try:
        response = EnrollmentResponse.model_validate(raw)
    except ValidationError as exc:
        raise EnrollmentError(f"unexpected enrolment response: {exc}") from None
    root_id = key_id(b64decode(response.root_public_key))
    if root_fingerprint is not None and not root_id.startswith(root_fingerprint.lower()):
        raise EnrollmentError(
            f"the hub's root key {root_id[:16]} does not match the pinned {root_fingerprint}"
        )
    verify_keyring(
        response.keyring, root_public_b64=response.root_public_key, current=None, now=now
    )
    identity = Identity(
        device_id=response.device_id,
        hub_url=hub_url,
        broker=response.broker,
        topic_root=response.topic_root,
        root_public_key=response.root_public_key,
        device_class=device_class,
    )
    state.create()
    state.save_keyring(response.keyring)
    state.save_identity(identity)
    state.scoring_keys()
    return identity
