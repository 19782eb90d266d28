import pytest

from retrieval import atomic


def test_atomic_dir_replaces_previous_content(tmp_path):
    target = tmp_path / "out"
    with atomic.atomic_dir(target) as d:
        (d / "a").write_text("1")
    with atomic.atomic_dir(target) as d:
        (d / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_build_keeps_previous_content(tmp_path):
    target = tmp_path / "out"
    with atomic.atomic_dir(target) as d:
        (d / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic.atomic_dir(target) as d:
        (d / "half").write_text("x")
        raise RuntimeError("killed")
    assert (target / "a").read_text() == "1" and not (target / "half").exists()


def test_stale_temporaries_are_swept(tmp_path):
    stale = tmp_path / ".out.tmp-dead"
    stale.mkdir()
    with atomic.atomic_dir(tmp_path / "out") as d:
        (d / "a").write_text("1")
    assert not stale.exists()


def test_write_bytes_replaces_atomically(tmp_path):
    p = tmp_path / "x" / "f.bin"
    atomic.write_bytes(p, b"one")
    atomic.write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert [q.name for q in p.parent.iterdir()] == ["f.bin"]


def test_write_mode_goes_through_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        atomic.write_text(tmp_path / "shared.html", "x", mode=0o666)
        atomic.write_text(tmp_path / "private.bin", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shared.html").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "private.bin").stat().st_mode) == 0o600
