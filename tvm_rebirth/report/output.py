"""Text tables and atomically written JSON, shared by the CLI and the report writers."""

from __future__ import annotations

import json
import os
import tempfile


def table(rows, header) -> str:
    """Left-aligned columns under a dashed header line."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def write_text(path, text: str) -> None:
    """Write to a temporary file beside ``path``, then rename: never a half file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.chmod(f.name, 0o644)  # NamedTemporaryFile creates 0600; a report is for everyone
    os.replace(f.name, path)


def write_json(path, payload) -> None:
    write_text(path, json.dumps(payload, indent=2))
