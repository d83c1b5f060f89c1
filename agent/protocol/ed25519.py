"""Ed25519 signature checks with the OpenSSL that Python's own ``ssl`` module has loaded.

Why not ``cryptography`` here: the agent daemon imports ``ssl`` anyway (asyncio and paho-mqtt
do), which maps the system's libcrypto. ``cryptography`` brings a second, statically linked
OpenSSL of its own: about 8 MB of resident library plus 1.5 MB of Python objects, to do one
thing the first OpenSSL already does. On a device that is memory taken from the model.

Both paths end in the same OpenSSL call, ``EVP_DigestVerify`` (``cryptography`` makes it too),
so the checks are the same, including the refusal of a non-canonical ``S`` and of keys that are
not 32 bytes. Where the running Python's OpenSSL cannot be found or is older than 1.1.1 (a
statically linked interpreter, for one), ``cryptography`` does the check instead: it stays a
dependency of the agent, for enrolment's keys and certificate requests.
"""

import ctypes
import os
import ssl
from collections.abc import Callable
from pathlib import Path

# NID_ED25519 (= EVP_PKEY_ED25519) in OpenSSL's obj_mac.h, the same since 1.1.1.
_EVP_PKEY_ED25519 = 1087
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

Verifier = Callable[[bytes, bytes, bytes], bool]


def loaded_libcrypto() -> Path | None:
    """The libcrypto this process has mapped for ``ssl``, or None (e.g. statically linked)."""
    try:
        maps = Path(f"/proc/{os.getpid()}/maps").read_text(encoding="utf-8")
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address, perms, offset, device, inode, path
        # A library replaced on disk since it was mapped shows as "(deleted)": opening that
        # path again could load a different build, so it is not used.
        if len(fields) == 6 and not fields[5].endswith("(deleted)"):
            path = Path(fields[5])
            if path.name.startswith("libcrypto.so"):
                return path
    return None


class OpenSslEd25519:
    """``verify(public_key, signature, message)`` through libcrypto's EVP interface."""

    def __init__(self, library: Path) -> None:
        # Already mapped by ssl, so this only takes a reference; nothing new is loaded.
        lib = ctypes.CDLL(str(library))
        self._new_key = lib.EVP_PKEY_new_raw_public_key
        self._new_key.restype = ctypes.c_void_p
        self._new_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        self._free_key = lib.EVP_PKEY_free
        self._free_key.restype = None
        self._free_key.argtypes = [ctypes.c_void_p]
        self._new_ctx = lib.EVP_MD_CTX_new
        self._new_ctx.restype = ctypes.c_void_p
        self._new_ctx.argtypes = []
        self._free_ctx = lib.EVP_MD_CTX_free
        self._free_ctx.restype = None
        self._free_ctx.argtypes = [ctypes.c_void_p]
        self._init = lib.EVP_DigestVerifyInit
        self._init.restype = ctypes.c_int
        self._init.argtypes = [ctypes.c_void_p] * 5
        self._verify = lib.EVP_DigestVerify
        self._verify.restype = ctypes.c_int
        self._verify.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]
        # A failed check leaves entries on this thread's OpenSSL error queue; clear them so
        # that a later ssl call in the same thread does not report our error as its own.
        self._clear_errors = lib.ERR_clear_error
        self._clear_errors.restype = None
        self._clear_errors.argtypes = []

    def __call__(self, public_key: bytes, signature: bytes, message: bytes) -> bool:
        if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
            return False
        key = self._new_key(_EVP_PKEY_ED25519, None, public_key, len(public_key))
        if not key:
            self._clear_errors()
            return False
        ctx = self._new_ctx()
        try:
            if not ctx:
                raise MemoryError("EVP_MD_CTX_new failed")
            # Ed25519 hashes internally, so no digest is named (NULL), as OpenSSL requires.
            if self._init(ctx, None, None, None, key) != 1:
                return False
            # 1 is a valid signature; 0 is a bad one and a negative value an error: only 1
            # counts, never "not 0".
            return bool(self._verify(ctx, signature, len(signature), message, len(message)) == 1)
        finally:
            if ctx:
                self._free_ctx(ctx)
            self._free_key(key)
            self._clear_errors()


def cryptography_verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """The same check through ``cryptography`` (imported only when this runs)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if len(public_key) != PUBLIC_KEY_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _choose() -> Verifier:
    library = loaded_libcrypto() if ssl.OPENSSL_VERSION_INFO >= (1, 1, 1) else None
    if library is None:
        return cryptography_verify
    try:
        return OpenSslEd25519(library)
    except (OSError, AttributeError):  # not loadable, or a libcrypto without these symbols
        return cryptography_verify


verify: Verifier = _choose()
