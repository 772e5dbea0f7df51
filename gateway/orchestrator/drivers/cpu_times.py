"""Pure: a command's CPU seconds from what a POSIX shell's ``times`` printed after it.

``times`` prints two lines, the shell's own user and system time and then its children's, each as
``<minutes>m<seconds>s``. A driver whose command is not the gateway's child (runc exec --detach) runs it
under a small wrapper shell inside the VM that waits for it: the children line is then the command's own
CPU (with whatever it waited for), not the VM's, so other commands and servers in the VM do not count.
"""

from __future__ import annotations

import re

# One time: minutes, then seconds with a fraction (a comma where a locale says so; some shells pad).
_TIME = re.compile(r"(\d+)m\s*(\d+(?:[.,]\d+)?)s")


def children_cpu_s(times_output: str) -> float | None:
    """User plus system seconds of the shell's children, or None when the text is not ``times``'s."""
    lines = [line for line in times_output.splitlines() if line.strip()]
    if len(lines) != 2:
        return None
    found = _TIME.findall(lines[1])
    if len(found) != 2 or _TIME.sub("", lines[1]).strip():
        return None
    return sum(int(minutes) * 60 + float(seconds.replace(",", ".")) for minutes, seconds in found)
