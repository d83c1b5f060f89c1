"""The scoring endpoint's keys as the key file says now.

``outpost-agent key rotate`` rewrites ``scoring-keys.json`` atomically (a new file renamed over
the old); the running endpoint asks this object for the keys on every request, and it re-reads
the file only when its identity changed (inode, mtime, size), so a rotation takes effect on the
next request without a restart, and the old key is refused from then on.

The identity is looked at (one ``stat``) only after an inotify event for the file
(``agent.filewatch``): a ``stat`` on every request cost ~10-25 µs of its latency on a cold VM.
The event of a rename is queued before ``key rotate`` returns, and the event loop reads it
before a request that arrives after it. Without inotify every request looks, as before.
"""

import logging
import os
import weakref

from agent.errors import AgentError
from agent.filewatch import FileWatch
from agent.state import ScoringKeys, StateDir

logger = logging.getLogger(__name__)

_FileIdentity = tuple[int, int, int]


class ScoringKeyFile:
    """A callable for ``ScoringServer(keys=...)``: the current (primary, secondary) keys."""

    def __init__(self, state: StateDir) -> None:
        self._state = state
        self._path = state.scoring_keys_path
        self._path_text = str(self._path)  # os.stat on a str: pathlib adds ~1 µs a look
        self._watch = FileWatch(self._path)
        weakref.finalize(self, self._watch.close)
        self._watch_tried = False
        self._keys: ScoringKeys = state.scoring_keys()
        self._seen = self._identity()

    def _identity(self) -> _FileIdentity | None:
        try:
            st = os.stat(self._path_text)  # noqa: PTH116 - see __init__
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    @property
    def watching(self) -> bool:
        """Whether changes are known from inotify (else every call looks at the file)."""
        return self._watch.watching

    def __call__(self) -> tuple[str, str]:
        if not self._watch_tried:
            # The first call comes from the endpoint, on the loop that is to read the events.
            self._watch_tried = True
            self._watch.start()
        if self._watch.look():
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
