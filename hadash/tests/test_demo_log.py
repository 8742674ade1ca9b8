"""The demo's logs (issue 10 item 7): with a log directory the supervisor writes each
process's output to <dir>/<name>.log instead of the terminal and counts lines, warnings
and errors for the demo's once-a-minute summary line."""

from __future__ import annotations

import time

from hadash.management.commands.demo import Command
from hadash.supervisor import Supervisor

CHILD = r"""
import sys
for i in range(30):
    print(f"2026-12-01 10:00:00,000 INFO hadash.x line {i}")
print("2026-12-01 10:00:00,000 WARNING hadash.x slow")
print("2026-12-01 10:00:00,000 ERROR hadash.x broken pipe")
"""


def test_logs_go_to_files_and_are_summarised(tmp_path, capsys):
    sup = Supervisor(log_dir=tmp_path / "log", grace=2)
    try:
        child = sup.python("web", "-c", CHILD)
        child.proc.wait(timeout=30)
        for _ in range(200):  # the pump thread reads what the child wrote
            if child.lines >= 32:
                break
            time.sleep(0.05)
    finally:
        sup.stop()
    text = (tmp_path / "log" / "web.log").read_text()
    assert "line 29" in text and "ERROR hadash.x broken pipe" in text
    assert "line 29" not in capsys.readouterr().out  # nothing flooded the terminal
    counts = sup.take_counts()
    assert counts == [("web", 32, 1, 1, "2026-12-01 10:00:00,000 ERROR hadash.x broken pipe")]
    line = Command.summary(counts)
    assert "web 32 lines (1 warnings, 1 errors)" in line and "broken pipe" in line
    assert sup.take_counts() == [("web", 0, 0, 0, "")]  # counted afresh each minute
