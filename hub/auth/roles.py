"""The API roles, each a superset of the one below: viewer < deployer < admin."""

from enum import StrEnum


class Role(StrEnum):
    VIEWER = "viewer"  # reads everything but tokens and the audit log
    DEPLOYER = "deployer"  # viewer + registers models, creates and steers deployments
    ADMIN = "admin"  # everything: devices, enrolment, commands, tokens, the audit log

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: "Role") -> bool:
        """Whether a caller with this role may do what ``needed`` is required for."""
        return self.rank >= needed.rank


_RANK = {Role.VIEWER: 0, Role.DEPLOYER: 1, Role.ADMIN: 2}
