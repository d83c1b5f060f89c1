"""What the hub's message worker has seen: handled, malformed, unknown devices, overflow."""

from fastapi import APIRouter

from hub.dependencies import AdminDep, ContextDep

router = APIRouter(prefix="/api/v1/messages", tags=["messages"], dependencies=[AdminDep])


@router.get("/stats")
def message_stats(ctx: ContextDep) -> dict[str, int]:
    """Counters since the hub started; all zero when messaging is not running."""
    stats = ctx.message_stats
    names = ("handled", "malformed", "unknown_device", "overflow", "failed")
    return {name: getattr(stats, name) if stats is not None else 0 for name in names}
