"""Ed25519 checks through the OpenSSL that ``ssl`` loaded, against RFC 8032 and ``cryptography``."""

import ctypes
import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol import ed25519
from agent.protocol.keys import SigningKey, verify_signature

# RFC 8032 section 7.1, tests 1 to 3: (secret key, public key, message, signature).
RFC8032 = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
        "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
        "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
]

# The group order L: adding it to S gives a second encoding of the same scalar, which a strict
# verifier (RFC 8032 section 5.1.7) must refuse so that signatures are not malleable.
_L = 2**252 + 27742317777372353535851937790883648493


def _openssl() -> ed25519.OpenSslEd25519:
    library = ed25519.loaded_libcrypto()
    if library is None:
        pytest.skip("this Python's ssl is not linked against a shared libcrypto")
    return ed25519.OpenSslEd25519(library)


@pytest.fixture(params=["openssl", "cryptography"])
def verify(request: pytest.FixtureRequest) -> ed25519.Verifier:
    if request.param == "openssl":
        return _openssl()
    return ed25519.cryptography_verify


def _key() -> tuple[Ed25519PrivateKey, bytes]:
    private = Ed25519PrivateKey.generate()
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return private, public


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


@pytest.mark.parametrize(("secret", "public", "message", "signature"), RFC8032)
def test_rfc8032_vectors(
    verify: ed25519.Verifier, secret: str, public: str, message: str, signature: str
) -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(secret))
    assert key.sign(bytes.fromhex(message)) == bytes.fromhex(signature)  # the vector is right
    assert verify(bytes.fromhex(public), bytes.fromhex(signature), bytes.fromhex(message))
    assert not verify(
        bytes.fromhex(public), bytes.fromhex(signature), bytes.fromhex(message) + b"\x00"
    )


def test_agrees_with_cryptography_on_valid_and_altered_signatures(
    verify: ed25519.Verifier,
) -> None:
    for round_ in range(20):
        private, public = _key()
        message = os.urandom(round_ * 37)
        signature = private.sign(message)
        assert verify(public, signature, message)
        assert not verify(public, _flip(signature, round_ % 64), message)
        assert not verify(_flip(public, round_ % 32), signature, message)
        if message:
            assert not verify(public, signature, _flip(message, round_ % len(message)))
        other, other_public = _key()
        assert not verify(other_public, signature, message)
        assert not verify(public, other.sign(message), message)


@pytest.mark.parametrize(
    ("public", "signature"),
    [
        (b"", b""),
        (b"\x00" * 31, b"\x00" * 64),
        (b"\x00" * 33, b"\x00" * 64),
        (None, b"\x00" * 63),
        (None, b"\x00" * 65),
        (b"\xff" * 32, b"\x00" * 64),  # not a point on the curve
    ],
)
def test_malformed_keys_and_signatures_are_refused(
    verify: ed25519.Verifier, public: bytes | None, signature: bytes
) -> None:
    _, real_public = _key()
    assert not verify(real_public if public is None else public, signature, b"message")


def test_a_non_canonical_s_is_refused(verify: ed25519.Verifier) -> None:
    private, public = _key()
    signature = private.sign(b"pay 10")
    s = int.from_bytes(signature[32:], "little")
    malleated = signature[:32] + (s + _L).to_bytes(32, "little")
    assert verify(public, signature, b"pay 10")
    assert not verify(public, malleated, b"pay 10")


def test_a_check_leaves_no_error_on_the_threads_openssl_queue() -> None:
    """Else the next ssl call on the thread could report a failure of ours as its own."""
    checker = _openssl()
    library = ed25519.loaded_libcrypto()
    assert library is not None
    lib = ctypes.CDLL(str(library))
    peek = lib.ERR_peek_error
    peek.restype = ctypes.c_ulong
    new_key = lib.EVP_PKEY_new_raw_public_key
    new_key.restype = ctypes.c_void_p
    new_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    assert not new_key(1087, None, b"\x00" * 31, 31)  # a short key: OpenSSL queues an error
    assert peek() != 0
    _, public = _key()
    assert not checker(public, b"\x00" * 64, b"x")
    assert peek() == 0


def test_a_small_order_key_gets_the_same_answer_as_from_cryptography() -> None:
    """The all-zero key is a point of order 4: OpenSSL's check (cofactorless, like
    ``cryptography``'s, which is the same call) accepts some forged signatures under it. Keys
    come from the root-signed keyring, so an attacker cannot choose one; this pins that the two
    paths agree rather than that one is stricter."""
    checker = _openssl()
    for message in (b"x", b"message", b"", b"pay 10"):
        zero = (b"\x00" * 32, b"\x00" * 64, message)
        assert checker(*zero) == ed25519.cryptography_verify(*zero)


def test_the_agent_checks_with_the_loaded_openssl_where_there_is_one() -> None:
    if ed25519.loaded_libcrypto() is None:
        pytest.skip("this Python's ssl is not linked against a shared libcrypto")
    assert isinstance(ed25519.verify, ed25519.OpenSslEd25519)


@pytest.mark.parametrize(
    ("public", "signature", "document"),
    [
        (None, None, {"x": float("nan")}),  # no canonical form
        (None, None, {"x": float("inf")}),
        ("not base64!", None, {"x": 1}),
        (None, "é", {"x": 1}),  # not ASCII
    ],
)
def test_verify_signature_says_no_to_what_cannot_be_checked(
    public: str | None, signature: str | None, document: object
) -> None:
    """False, never an exception: the caller turns it into a refusal with a reason."""
    key = SigningKey.generate()
    signed = key.sign({"x": 1})
    assert verify_signature(key.public_b64, signed.sig, {"x": 1})
    assert not verify_signature(
        public if public is not None else key.public_b64,
        signature if signature is not None else signed.sig,
        document,
    )
