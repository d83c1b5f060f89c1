"""Which role each API route needs, and the few routes that take no API token.

The rule, from the method and the route's path template (not the request's path, so a route
cannot be reached under a spelling the rule does not know):

- reads (GET, HEAD) need **viewer**, except under ``ADMIN_READ_PREFIXES`` (tokens, the audit
  log, enrolment tokens): **admin**;
- writes (anything else) need **admin**, except those in ``DEPLOYER_WRITES``: **deployer**.

So a new route is admin-only for writes until it is named here: forgetting fails closed.
Device commands (logs, ping) stay admin: they act on one device directly and bring back its
logs, which a release pipeline has no need of.

``PUBLIC_ROUTES`` is the allowlist of routes without an API token; each says what protects it
instead. tests/hub/test_api_auth.py fails when a route is neither guarded by
``hub.dependencies.require_role`` nor listed here.
"""

from dataclasses import dataclass

from hub.auth.roles import Role

READ_METHODS = frozenset({"GET", "HEAD"})
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

ADMIN_READ_PREFIXES = ("/api/v1/tokens", "/api/v1/audit", "/api/v1/enrollment-tokens")

# (method, path template or a prefix ending in "/"): what a release pipeline does.
DEPLOYER_WRITES: tuple[tuple[str, str], ...] = (
    ("POST", "/api/v1/models"),  # register a model version
    ("POST", "/api/v1/deployments"),  # create a deployment
    ("POST", "/api/v1/deployments/"),  # dry-run, pause, resume, promote, abort, rollback
)


@dataclass(frozen=True)
class PublicRoute:
    """A route reachable without an API token, and why that is safe."""

    guarded_by: str
    # For high-rate machine calls (a broker asking whether a device may connect or publish),
    # which would drown the audit log: only their refusals (401, 403) are recorded.
    quiet: bool = False


PUBLIC_ROUTES: dict[tuple[str, str], PublicRoute] = {
    ("GET", "/healthz"): PublicRoute("nothing: says only that the hub is up"),
    ("POST", "/api/v1/enroll"): PublicRoute("the one-time enrolment token in the body"),
    ("POST", "/api/v1/enroll/bulk"): PublicRoute("the enrolment token in the body"),
    ("POST", "/api/v1/devices/{device_id}/certificate"): PublicRoute(
        "the device's own broker password (HTTP Basic, or in the body)"
    ),
    # An external broker's (EMQX's) HTTP authentication and authorisation of devices.
    ("POST", "/api/v1/broker/authn"): PublicRoute(
        "the broker's shared secret (broker.http_auth_secret)", quiet=True
    ),
    ("POST", "/api/v1/broker/authz"): PublicRoute(
        "the broker's shared secret (broker.http_auth_secret)", quiet=True
    ),
    # FastAPI's own documentation routes: the API's shape, no data.
    ("GET", "/openapi.json"): PublicRoute("nothing: the API's description"),
    ("GET", "/docs"): PublicRoute("nothing: the API's description"),
    ("GET", "/docs/oauth2-redirect"): PublicRoute("nothing: the API's description"),
    ("GET", "/redoc"): PublicRoute("nothing: the API's description"),
}


def _under(path: str, prefix: str) -> bool:
    if prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix


def required_role(method: str, path_template: str) -> Role:
    """The least role that may call ``method`` on the route ``path_template``."""
    method = method.upper()
    if method in READ_METHODS:
        admin_only = any(
            path_template == p or path_template.startswith(p + "/") for p in ADMIN_READ_PREFIXES
        )
        return Role.ADMIN if admin_only else Role.VIEWER
    if any(method == m and _under(path_template, p) for m, p in DEPLOYER_WRITES):
        return Role.DEPLOYER
    return Role.ADMIN


def public_route(method: str, path_template: str) -> PublicRoute | None:
    return PUBLIC_ROUTES.get((method.upper(), path_template))
