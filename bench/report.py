"""docs/benchmarks.md is written by several scripts, each owning "## " sections of its own."""
from __future__ import annotations

from pathlib import Path


def emit_section(output: str | None, title: str, section: str) -> None:
    """Print ``section`` (which starts with ``## {title}``), or write it into the markdown file ``output`` in
    place of an earlier section of the same title, keeping every other section."""
    if output is None:
        print(section)
        return
    out = Path(output)
    text = out.read_text(encoding="utf-8") if out.exists() else ""
    parts = text.split("\n## ")
    kept = [parts[0]] + [p for p in parts[1:] if not p.startswith(title)]
    out.write_text("\n## ".join(kept).rstrip() + "\n\n" + section, encoding="utf-8")
