"""The agent daemon keeps libraries it does not use out of its memory (bench/scoring.py measures
the whole). Each entry below was imported by the daemon once, at the cost noted."""

import subprocess
import sys
from pathlib import Path

import pytest

from agent.protocol import ed25519
from agent.protocol.keys import SigningKey

ROOT = Path(__file__).resolve().parents[2]

KEPT_OUT = {
    # ~9.5 MB resident: a second OpenSSL. Signatures are checked with the one ssl loaded.
    "cryptography": "signing and enrolment only",
    # ~0.7 MB: the settings are layered in agent/settings.py.
    "pydantic_settings": "not used by the agent",
    # ~0.7 MB: only an entry script's declared requirements need it.
    "packaging": "imported when a package declares requirements",
}

PROGRAM = """
import sys
import agent.core, agent.install, agent.main, agent.scoring, agent.trust
import agent.runtimes.onnx, agent.runtimes.script, agent.runtimes.tflite
from agent.protocol.ed25519 import OpenSslEd25519, verify
from agent.protocol.keys import verify_signature
from agent.runtimes.requirements import check_requirements
from agent.settings import AgentSettings

public, signature = sys.argv[1:]
assert isinstance(verify, OpenSslEd25519)
assert verify_signature(public, signature, {"model": "iris", "version": 3})
assert not verify_signature(public, signature, {"model": "iris", "version": 4})
AgentSettings.load(environ={"OUTPOST_AGENT_SCORING__PORT": "9000"})
check_requirements([], needed_by="score.py")
print(" ".join(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_the_daemon_checks_signatures_and_settings_without_what_it_does_not_use() -> None:
    if ed25519.loaded_libcrypto() is None:
        pytest.skip("this Python's ssl is not linked against a shared libcrypto")
    key = SigningKey.generate()
    signed = key.sign({"model": "iris", "version": 3})
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, key.public_b64, signed.sig],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert "agent" in loaded  # the listing is real
    assert loaded.isdisjoint(KEPT_OUT), sorted(loaded & set(KEPT_OUT))
