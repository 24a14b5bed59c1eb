"""Files written atomically get the mode an ordinary write would give them."""

import os


def test_atomic_files_get_the_umask_mode(tmp_path):
    from crosslayer.io import write_json, write_text

    old = os.umask(0o027)
    try:
        write_text("x", tmp_path / "a.txt")
        write_json({"a": 1}, tmp_path / "b.json")
    finally:
        os.umask(old)
    for name in ("a.txt", "b.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
    write_text("y", tmp_path / "c.txt")
    assert (tmp_path / "c.txt").stat().st_mode & 0o777 == 0o666 & ~old
