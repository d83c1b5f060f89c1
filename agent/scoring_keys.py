"""The scoring endpoint's keys as the key file says now.

``outpost-agent key rotate`` rewrites ``scoring-keys.json`` atomically (a new file renamed over
the old); the running endpoint asks this object for the keys on every request, and it re-reads
the file only when its identity changed (inode, mtime, size: one ``stat``, about a microsecond),
so a rotation takes effect on the next request without a restart, and the old key is refused
from then on.
"""

import logging
import os

from agent.errors import AgentError
from agent.state import ScoringKeys, StateDir

logger = logging.getLogger(__name__)

_FileIdentity = tuple[int, int, int]


class ScoringKeyFile:
    """A callable for ``ScoringServer(keys=...)``: the current (primary, secondary) keys."""

    def __init__(self, state: StateDir) -> None:
        self._state = state
        self._path = state.scoring_keys_path
        self._path_text = str(self._path)  # os.stat on a str: pathlib adds ~1 µs a request
        self._keys: ScoringKeys = state.scoring_keys()
        self._seen = self._identity()

    def _identity(self) -> _FileIdentity | None:
        try:
            st = os.stat(self._path_text)  # noqa: PTH116 - on every request; see above
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def __call__(self) -> tuple[str, str]:
        seen = self._identity()
        if seen != self._seen:
            self._reload(seen)
        return (self._keys.primary, self._keys.secondary)

    def _reload(self, seen: _FileIdentity | None) -> None:
        if seen is None:
            # Removed by hand: keep serving with the keys known (refusing every client would
            # be an outage); the next `key rotate` writes a new file.
            logger.warning("scoring key file %s is gone; keeping the last keys", self._path)
        else:
            try:
                self._keys = self._state.scoring_keys()
            except AgentError as exc:
                logger.warning("scoring key file unreadable, keeping the last keys: %s", exc)
            else:
                logger.info("scoring keys re-read from %s", self._path)
        self._seen = seen
