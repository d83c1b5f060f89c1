"""What an external broker (EMQX 5) is told when it asks the hub whether a client may connect
(HTTP authentication) and whether it may publish or subscribe (HTTP authorization).

The request bodies are what the EMQX configuration in docs/security-devices.md sends; the
answers are EMQX's: ``{"result": "allow" | "deny" | "ignore", "is_superuser": false}``. Device
accounts are judged here, by the hub's registry, its hashed passwords and the topic rules of
``hub.broker.rules`` (the same rules as the embedded Mosquitto's ACL). A user name that is not
a device id (the hub's own account, an operator's) is ``ignore``: EMQX hands it to its next
authenticator or authorizer, which the configuration provides.

Pure: the caller looks the account up and passes it in.
"""

from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from agent.protocol.topics import is_valid_device_id
from hub.broker.passwords import verify_password
from hub.broker.rules import may_publish, may_subscribe

# Bounds on what EMQX forwards from a CONNECT, so a client cannot make the hub hash megabytes.
MAX_USERNAME = 256
MAX_PASSWORD = 1024
MAX_TOPIC = 65_535


class Result(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    IGNORE = "ignore"  # not ours to judge: EMQX asks its next authenticator or authorizer


class Action(StrEnum):
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"


class _Request(BaseModel):
    # EMQX sends what its body template names; fields it adds later are no reason to fail.
    model_config = ConfigDict(extra="ignore")


class AuthnRequest(_Request):
    username: str = Field(default="", max_length=MAX_USERNAME)
    password: str = Field(default="", max_length=MAX_PASSWORD)
    clientid: str = Field(default="", max_length=MAX_USERNAME)


class AuthzRequest(_Request):
    username: str = Field(default="", max_length=MAX_USERNAME)
    clientid: str = Field(default="", max_length=MAX_USERNAME)
    topic: str = Field(default="", max_length=MAX_TOPIC)
    action: str = Field(default="", max_length=32)


class AuthnResponse(BaseModel):
    result: Result
    # Never true for a device: a superuser skips authorization altogether.
    is_superuser: bool = False


class AuthzResponse(BaseModel):
    result: Result


@dataclass(frozen=True)
class DeviceAccount:
    """What the registry says about one device."""

    device_id: str
    password_hash: str
    active: bool  # False: disabled, or waiting for approval


def is_device_username(username: str) -> bool:
    return is_valid_device_id(username)


def _admitted(username: str, clientid: str, account: DeviceAccount | None) -> bool:
    # The client id must be the device id: another device's id would let EMQX kick that
    # device's session (THREATS E1a, B9), as use_username_as_clientid prevents on Mosquitto.
    return (
        account is not None
        and account.active
        and account.device_id == username
        and clientid == username
    )


def authenticate(request: AuthnRequest, account: DeviceAccount | None) -> AuthnResponse:
    """Allow a device's CONNECT only with its own id as client id and its current password."""
    if not is_device_username(request.username):
        return AuthnResponse(result=Result.IGNORE)
    if not _admitted(request.username, request.clientid, account):
        return AuthnResponse(result=Result.DENY)
    assert account is not None
    if not verify_password(request.password, account.password_hash):
        return AuthnResponse(result=Result.DENY)
    return AuthnResponse(result=Result.ALLOW)


def authorize(
    request: AuthzRequest, account: DeviceAccount | None, *, topic_root: str
) -> AuthzResponse:
    """Allow a device's publish (its Will included) or subscribe by the shared topic rules."""
    if not is_device_username(request.username):
        return AuthzResponse(result=Result.IGNORE)
    if not _admitted(request.username, request.clientid, account):
        return AuthzResponse(result=Result.DENY)
    if request.action == Action.PUBLISH:
        allowed = may_publish(topic_root, request.username, request.topic)
    elif request.action == Action.SUBSCRIBE:
        allowed = may_subscribe(topic_root, request.username, request.topic)
    else:
        allowed = False  # an action this hub does not know is not granted
    return AuthzResponse(result=Result.ALLOW if allowed else Result.DENY)
