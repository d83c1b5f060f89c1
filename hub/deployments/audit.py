"""The history of a deployment: who created, paused, resumed, promoted, aborted or rolled it
back, and what the rollout did by itself (actor ``rollout``)."""

from datetime import datetime

from sqlmodel import Session, col, select

from hub.database import utcnow
from hub.deployments.models import DeploymentAudit


def record(
    session: Session,
    deployment_id: str,
    actor: str,
    action: str,
    detail: str = "",
    now: datetime | None = None,
) -> None:
    """Add one entry; committed with the change it describes."""
    session.add(
        DeploymentAudit(
            deployment_id=deployment_id,
            at=now or utcnow(),
            actor=actor[:255],
            action=action,
            detail=detail,
        )
    )


def history(session: Session, deployment_id: str) -> list[DeploymentAudit]:
    return list(
        session.exec(
            select(DeploymentAudit)
            .where(DeploymentAudit.deployment_id == deployment_id)
            .order_by(col(DeploymentAudit.at), col(DeploymentAudit.id))
        ).all()
    )
