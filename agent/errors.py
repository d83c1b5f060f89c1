"""Errors of the agent, one tree, each branch answering "what should the caller do".

    AgentError
    ├── RejectedError          the artifact or document is refused: report the reason, keep
    │   │                      serving what was there, never retry the same bytes
    │   ├── TrustError         signature, key, threshold, expiry, replay, wrong device
    │   ├── IntegrityError     hash or length mismatch of a package, chunk or file
    │   ├── UnsafeArchiveError absolute path, "..", link, special file, too many entries
    │   ├── TooLargeError      over the configured size limits
    │   └── IncompatibleError  another device class, framework or agent version
    ├── InstallError           the package was fine but could not be installed here: roll back,
    │   │                      mark the version bad on this device, report
    │   ├── ModelLoadError     the runtime could not load the model
    │   ├── HealthCheckError   the sample input did not give the expected output
    │   └── NoSpaceError       the disk is full
    ├── TransientError         the network or broker failed: retry with backoff
    ├── EnrollmentError        the hub refused or could not be reached during enrolment
    └── SettingsError          the config file, an OUTPOST_AGENT_* variable or a flag is bad

Every error carries a `Reason` code from the contract so the hub and `--wait` can say why.
"""

from agent.protocol.messages import Reason


class AgentError(Exception):
    reason: Reason = Reason.INTERNAL

    def __init__(self, detail: str, *, reason: Reason | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class RejectedError(AgentError):
    reason = Reason.MALFORMED


class TrustError(RejectedError):
    reason = Reason.SIGNATURE


class IntegrityError(RejectedError):
    reason = Reason.HASH


class UnsafeArchiveError(RejectedError):
    reason = Reason.UNSAFE_PATH


class TooLargeError(RejectedError):
    reason = Reason.TOO_LARGE


class IncompatibleError(RejectedError):
    reason = Reason.INCOMPATIBLE


class InstallError(AgentError):
    reason = Reason.INTERNAL


class ModelLoadError(InstallError):
    reason = Reason.MODEL_LOAD


class HealthCheckError(InstallError):
    reason = Reason.HEALTH_CHECK


class NoSpaceError(InstallError):
    reason = Reason.NO_SPACE


class TransientError(AgentError):
    reason = Reason.INTERNAL


class EnrollmentError(AgentError):
    reason = Reason.INTERNAL


class SettingsError(AgentError):
    """A setting's value is refused; the message names the file, variable or flag it came
    from. The agent does not start with it."""

    reason = Reason.MALFORMED

    def __str__(self) -> str:  # for a person at a shell, not the hub: no reason code
        return self.detail


class InputError(AgentError):
    """A scoring request whose data does not fit the model: answer 400 with the detail."""

    reason = Reason.MALFORMED


class ModelCallError(Exception):
    """A scoring call the model could not answer, for a reason the caller should see.

    ``status`` is the HTTP status the endpoint answers with: 500 when the model or entry script
    raised, 503 while a crashed worker restarts (or after it kept crashing), 504 when a call ran
    past its time limit.
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
