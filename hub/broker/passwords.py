"""Mosquitto 2.0 password hashes and the password file.

Mosquitto 2.0 reads ``$7$`` entries: PBKDF2-HMAC-SHA512 with an iteration count, a random salt
and the 64-byte derived key, both base64. Writing them ourselves means the hub never shells out
to ``mosquitto_passwd`` and never puts a password on a command line.
"""

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from agent.protocol.topics import is_valid_device_id

HASH_ID = "7"
ITERATIONS = 101  # what mosquitto_passwd 2.0 writes; the broker reads any count
SALT_BYTES = 12
HASH_BYTES = 64  # SHA-512 output, the length mosquitto compares

# Characters that would break a password-file line or an ACL pattern substitution.
_FORBIDDEN_USERNAME_CHARS = frozenset(":\n\r\t /+#\x00")


@dataclass(frozen=True)
class BrokerUser:
    """One broker account: a device (its id) or the hub.

    An inactive account (a device disabled, or waiting for approval) is left out of the
    password file, and the ACL denies it every topic.
    """

    username: str
    password_hash: str
    active: bool = True


def _pbkdf2(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, HASH_BYTES)


def hash_password(password: str) -> str:
    """Hash a password in mosquitto 2.0's ``$7$`` format with a fresh random salt."""
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _pbkdf2(password, salt, ITERATIONS)
    salt_b64 = base64.b64encode(salt).decode("ascii")
    hash_b64 = base64.b64encode(digest).decode("ascii")
    return f"${HASH_ID}${ITERATIONS}${salt_b64}${hash_b64}"


def verify_password(password: str, hashed: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash; malformed hashes never match."""
    parts = hashed.split("$")
    # "$7$101$salt$hash".split("$") == ["", "7", "101", "salt", "hash"]
    if len(parts) != 5 or parts[0] != "" or parts[1] != HASH_ID:
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    if iterations < 1 or len(expected) != HASH_BYTES:
        return False
    return hmac.compare_digest(_pbkdf2(password, salt, iterations), expected)


def check_hub_username(username: str) -> None:
    """Refuse a hub user name that could not appear in the password or ACL file."""
    if not username or any(c in _FORBIDDEN_USERNAME_CHARS for c in username):
        raise ValueError(f"invalid hub user name {username!r}")


def render_passwords(users: Iterable[BrokerUser], *, hub_username: str | None = None) -> str:
    """The password file: one ``user:hash`` line per active user.

    Every user but the hub must be a valid device id: the ACL substitutes the user name into
    topics with ``%u``, so a name with ``/``, ``+`` or ``#`` could reach other devices' topics.
    """
    if hub_username is not None:
        check_hub_username(hub_username)
    lines: list[str] = []
    seen: set[str] = set()
    for user in users:
        if user.username != hub_username and not is_valid_device_id(user.username):
            raise ValueError(f"refusing broker user {user.username!r}: not a valid device id")
        if user.username in seen:
            raise ValueError(f"duplicate broker user {user.username!r}")
        if not user.password_hash.startswith(f"${HASH_ID}$") or any(
            c in user.password_hash for c in ":\n\r"
        ):
            raise ValueError(f"password hash of {user.username!r} is not a $7$ hash")
        seen.add(user.username)
        if not user.active:
            continue
        lines.append(f"{user.username}:{user.password_hash}\n")
    return "".join(lines)
