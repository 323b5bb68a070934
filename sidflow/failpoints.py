"""Named points where a test can kill the process (SIGKILL, as the OOM killer or a node loss would).

`SIDFLOW_FAILPOINT=<name>[@<n>]` kills the process the n-th time (default: the first) it reaches `hit(name)`; with
`SIDFLOW_FAILPOINT_ONCE=<path>` only the first process to get there dies (it creates the file first), so a test can
show that a retried child resumes. The fault
matrix test uses this to cut a run at exact places (mid-publish, mid-export, after a checkpoint) and shows that the
next run ends with the same weights as an uninterrupted one. Unset, `hit` is a dictionary lookup.
"""

import os
import signal

_seen: dict[str, int] = {}


def hit(name: str) -> None:
    """Kill this process with SIGKILL if SIDFLOW_FAILPOINT names this point (and this is its n-th hit)."""
    spec = os.environ.get("SIDFLOW_FAILPOINT")
    if not spec:
        return
    point, _, nth = spec.partition("@")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] != int(nth or 1):
        return
    once = os.environ.get("SIDFLOW_FAILPOINT_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL))
        except FileExistsError:  # an earlier process already died here
            return
    os.kill(os.getpid(), signal.SIGKILL)
