"""`casebase demo` starts Streamlit with its file watcher off (the watcher flooded the demo's
log with "Inotify queue overflowed" once the phantom and the bundle were written)."""

from __future__ import annotations

import subprocess

from retrieval.commands import demo


def test_demo_launches_streamlit_without_a_file_watcher(monkeypatch, tmp_path):
    seen = {}

    def fake_call(cmd, **kw):
        seen["cmd"] = cmd
        return 0

    monkeypatch.setattr(subprocess, "call", fake_call)
    assert demo.launch_app(tmp_path, 8599) == 0
    cmd = seen["cmd"]
    i = cmd.index("--server.fileWatcherType")
    assert cmd[i + 1] == "none"
    assert i < cmd.index("--")  # a Streamlit option, not one of the app's arguments
