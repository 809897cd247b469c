"""One compact table over several `ktinject bench --json` files (stdlib only, so it still works
when a benchmark step failed half-way).

    python3 benchmarks/summarize.py out/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [
    ("decode_tok_s", "decode@P", "{:.1f}"),
    ("long_decode_tok_s", "decode@L", "{:.1f}"),
    ("long_prefill_tok_s", "prefill@L", "{:.0f}"),
    ("ttft_ms", "TTFT@P ms", "{:.1f}"),
    ("first_call_s", "1st call s", "{:.1f}"),
    ("peak_memory_gib", "peak GiB", "{:.2f}"),
]


def rows(path: Path) -> list[list[str]]:
    """One row per system of one result file, then one per ratio."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return [[path.stem, f"unreadable: {exc}"]]
    settings = result["settings"]
    title = f"{path.stem} P={settings['prompt_len']} L={settings['long_context']}"
    out = []
    for name, system in result["systems"].items():
        cells = [_fmt(system["metrics"].get(key), fmt) for key, _, fmt in COLUMNS]
        match = system.get("matches_reference") or {}
        tokens = (
            "ref"
            if name == result["reference"]
            else "/".join(
                "-" if m is None else ("yes" if m["equal"] else "no") for m in match.values()
            )
        )
        out.append([title, name, *cells, tokens, system.get("error") or ""])
        title = ""
    for name, ratios in result["ratios"].items():
        cells = [_fmt(ratios.get(key), "{:.2f}x") for key, _, _ in COLUMNS]
        out.append(["", name, *cells, "", ""])
    if settings.get("interrupted"):
        out.append(["", "(interrupted: partial results)"])
    return out


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def main(paths: list[str]) -> int:
    header = ["run", "system", *[label for _, label, _ in COLUMNS], "tokens=ref", "error"]
    table = [header]
    for path in paths:
        table += rows(Path(path))
    widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
