"""The few hub REST calls a scenario makes: an enrolment token, a deployment and following it
(its state, waves and history), the hub's message counters."""

import socket
from dataclasses import dataclass
from typing import Any

import httpx

from agent.errors import AgentError


class HubApiError(AgentError):
    """The hub refused a call or could not be reached; the detail says which and why."""


@dataclass
class HubApi:
    url: str
    admin_token: str | None
    timeout_s: float = 60.0

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        if not self.admin_token:
            raise HubApiError(
                f"{method} {path} needs the hub's admin token: set hub.admin_token_file in the"
                " scenario or OUTPOST_SIM_ADMIN_TOKEN"
            )
        # The deployment history names the simulator as the one who acted.
        headers = {
            "authorization": f"Bearer {self.admin_token}",
            "x-outpost-actor": f"outpost-sim@{socket.gethostname()}",
        }
        try:
            response = httpx.request(
                method,
                self.url.rstrip("/") + path,
                headers=headers,
                timeout=self.timeout_s,
                **kwargs,
            )
        except httpx.HTTPError as exc:
            raise HubApiError(f"cannot reach the hub at {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise HubApiError(
                f"hub refused {method} {path} ({response.status_code}): {response.text[:500]}"
            )
        return response.json()

    def create_enrollment_token(self, uses: int, ttl_s: int = 3600) -> str:
        body = self._call("POST", "/api/v1/enrollment-tokens", json={"uses": uses, "ttl_s": ttl_s})
        return str(body["token"])

    def deploy(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create a deployment (the body of POST /api/v1/deployments); returns it as created."""
        created: dict[str, Any] = self._call("POST", "/api/v1/deployments", json=body)
        return created

    def deployment(self, deployment_id: str, *, devices: bool = False) -> dict[str, Any]:
        """The rollout's state, waves and counts; ``devices`` adds the per-device rows."""
        view: dict[str, Any] = self._call(
            "GET",
            f"/api/v1/deployments/{deployment_id}",
            params={"devices": "true" if devices else "false"},
        )
        return view

    def history(self, deployment_id: str) -> list[dict[str, Any]]:
        """Who did what to the deployment, and what the rollout did by itself, oldest first."""
        entries: list[dict[str, Any]] = self._call(
            "GET", f"/api/v1/deployments/{deployment_id}/history"
        )
        return entries

    def message_stats(self) -> dict[str, int]:
        body: dict[str, int] = self._call("GET", "/api/v1/messages/stats")
        return body
