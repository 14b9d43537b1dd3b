"""The README's settings table is the documentation of `settings/__init__.py`; they must agree."""

from __future__ import annotations

from pathlib import Path

from settings import SETTINGS

README = Path(__file__).resolve().parents[2] / "README.md"


def test_settings_table_matches_the_code() -> None:
    rows = {}
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1].startswith("`--"):
            env, flag, default = (c.strip("`") for c in cells[:3])
            rows[env] = (flag, default, cells[3])
    assert rows == {s.env: (s.flag, s.default, s.help) for s in SETTINGS}
