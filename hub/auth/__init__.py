"""Who may call the hub's API: API tokens with roles, the role each route needs, and the
audit log of every mutating call (see docs/security-api.md)."""
