"""The agent's few HTTP calls to the hub (enrolment, a certificate): JSON in, JSON out.

Every failure becomes one error of the caller's kind with what the hub said, so the CLI prints
one line, whatever went wrong: refused, unreachable, or an answer that is not JSON.
"""

import json
import urllib.error
import urllib.request
from typing import Any


def post_json(
    url: str,
    body: dict[str, Any],
    *,
    timeout_s: float,
    error: type[Exception],
    what: str,
    headers: dict[str, str] | None = None,
) -> Any:
    """POST ``body`` to ``url`` and return the decoded answer; ``error`` for any failure
    (``what`` names the call in the message: "enrolment", "the certificate")."""
    request = urllib.request.Request(  # noqa: S310 - the hub URL the operator gave
        url,
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise error(f"hub refused {what} ({exc.code}): {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise error(f"cannot reach the hub at {url}: {exc}") from None
    except json.JSONDecodeError:
        raise error("hub answered with something that is not JSON") from None
