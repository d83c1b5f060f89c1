"""The machine a benchmark ran on, and what a process costs on it (RSS, CPU, file limits).

Linux only: the figures come from ``/proc``, which is where the floors were measured too.
"""

import os
import platform
import resource
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hub.broker import MosquittoNotFoundError, find_mosquitto

_CLK_TCK = os.sysconf("SC_CLK_TCK")
# The code a benchmark's figures depend on (git pathspecs: ``*`` crosses directories).
_CODE = ("agent/*.py", "hub/*.py", "device-sim/*.py", "bench/*.py")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class FdLimit:
    """RLIMIT_NOFILE before and after ``raise_fd_limit``."""

    soft_before: int
    soft: int
    hard: int

    def describe(self) -> str:
        raised = f", raised from {self.soft_before}" if self.soft != self.soft_before else ""
        return f"{self.soft} soft / {self.hard} hard{raised}"


def raise_fd_limit() -> FdLimit:
    """Raise this process's open-file limit to the hard limit.

    Every socket is a descriptor, and children (Mosquitto, the hub) inherit the limit, so
    this runs before anything is started.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return FdLimit(soft_before=soft, soft=target, hard=hard)


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size now, of this process or of ``pid``."""
    statm = Path(f"/proc/{pid or 'self'}/statm").read_text(encoding="ascii").split()
    return int(statm[1]) * _PAGE_BYTES


def peak_rss_bytes(pid: int | None = None) -> int:
    """The highest resident set size the process has had (VmHWM)."""
    for line in Path(f"/proc/{pid or 'self'}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of every thread of this process, or of ``pid``."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    # The command name (field 2) may hold spaces; the fields after its ')' are fixed.
    fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def listen_overflows() -> int:
    """Connections the kernel dropped at a full listen queue, machine-wide (TcpExt
    ListenOverflows). Each one stalls a blocking connect for a SYN retransmit (1 s, then 3 s)."""
    lines = Path("/proc/net/netstat").read_text(encoding="ascii").splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        if header.startswith("TcpExt:"):
            fields = dict(zip(header.split()[1:], values.split()[1:], strict=False))
            return int(fields.get("ListenOverflows", 0))
    return 0


def find_pid(cmdline_part: str) -> int | None:
    """The first process whose command line contains ``cmdline_part``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if cmdline_part in cmdline:
            return int(entry.name)
    return None


def _first_line(path: str, prefix: str) -> str:
    try:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.startswith(prefix):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown"


def _mosquitto_version() -> str:
    try:
        binary = find_mosquitto()
    except MosquittoNotFoundError:
        return "not installed"
    # `mosquitto -h` prints its version first and exits non-zero; that is expected.
    done = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10, check=False)
    first = (done.stdout or done.stderr).splitlines()
    return first[0].removeprefix("mosquitto version ").strip() if first else "unknown"


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = done.stdout.strip()
    # Others' work in progress changes what was measured; say so rather than name a commit
    # that does not describe the code that ran.
    status = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", *_CODE],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return f"{commit} + uncommitted changes" if status.stdout.strip() else commit


@dataclass(frozen=True)
class Machine:
    cpu_model: str
    cores: int
    ram_gib: float
    kernel: str
    python: str
    mosquitto: str
    paho: str
    fd_limit: str
    commit: str

    @classmethod
    def describe(cls, fd_limit: FdLimit) -> "Machine":
        import paho.mqtt

        mem_kib = _first_line("/proc/meminfo", "MemTotal").split()[0]
        return cls(
            cpu_model=_first_line("/proc/cpuinfo", "model name"),
            cores=os.cpu_count() or 0,
            ram_gib=round(int(mem_kib) / (1024 * 1024), 1) if mem_kib.isdigit() else 0.0,
            kernel=f"{platform.system()} {platform.release()}",
            python=platform.python_version(),
            mosquitto=_mosquitto_version(),
            paho=str(paho.mqtt.__version__),
            fd_limit=fd_limit.describe(),
            commit=_git_commit(),
        )

    def line(self) -> str:
        return (
            f"{self.cpu_model}, {self.cores} cores, {self.ram_gib} GiB RAM, {self.kernel}, "
            f"Python {self.python}, Mosquitto {self.mosquitto}, paho-mqtt {self.paho}, "
            f"open files {self.fd_limit}, commit {self.commit}"
        )
