"""MkDocs hook: pages made from the README's sections, and the benchmark results and examples
added from where they live, so the site never holds a second copy that drifts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent

# page -> (title, the README's "## " sections it is made of, in order)
PAGES: dict[str, tuple[str, list[str]]] = {
    "index.md": ("cachesync", ["", "Quick start", "What it guarantees"]),
    "using.md": ("Caching", ["Options of `cached`", "Batch reads", "Tags and memory budgets"]),
    "transports.md": ("Transports and scaling out", ["Transports", "Scaling out"]),
    "owner.md": ("The owner side", ["The owner side"]),
    "sync.md": ("Sync services", ["Django, Flask and gunicorn"]),
    "operations.md": ("Operations", ["Operating it"]),
    "benchmarks.md": ("Benchmarks", ["The numbers"]),
    "contributing.md": (
        "Contributing",
        ["Contributing: where things go", "Running the tests", "Documentation site"],
    ),
}

# Where a section's links point on the site (README links are relative to the repository).
LINKS = [
    (re.compile(r"\]\(docs/"), "]("),
    (re.compile(r"\]\(benchmarks/results/\)"), "](benchmarks/RESULTS.md)"),  # the folder
    (re.compile(r"\]\(benchmarks/results/"), "](benchmarks/"),
    (re.compile(r"\]\(#the-numbers\)"), "](benchmarks.md#the-numbers)"),
]


def _sections(readme: str) -> dict[str, str]:
    """The README split at its "## " headings ("" is what comes before the first one)."""
    sections: dict[str, str] = {}
    title, lines = "", []
    in_code = False
    for line in readme.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if not in_code and line.startswith("## "):
            sections[title] = "\n".join(lines)
            title, lines = line[3:].strip(), [line]
            continue
        if not in_code and line.startswith("# ") and not sections and not lines:
            continue  # the README's own title
        lines.append(line)
    sections[title] = "\n".join(lines)
    return sections


def on_files(files: Files, config: Any) -> Files:
    sections = _sections((ROOT / "README.md").read_text())
    for name, (title, wanted) in PAGES.items():
        missing = [w for w in wanted if w not in sections]
        if missing:
            raise ValueError(f"docs/hooks.py: the README has no section {missing} for {name}")
        text = f"# {title}\n\n" + "\n\n".join(sections[w] for w in wanted) + "\n"
        for pattern, replacement in LINKS:
            text = pattern.sub(replacement, text)
        files.append(File.generated(config, name, content=text))
    results = ROOT / "benchmarks" / "results"
    for path in sorted(results.rglob("*")):
        if path.suffix in (".md", ".png"):
            name = f"benchmarks/{path.relative_to(results).as_posix()}"
            files.append(File.generated(config, name, abs_src_path=str(path)))
    for path in sorted((ROOT / "examples").iterdir()):
        if path.suffix in (".md", ".py") and path.name != "__init__.py":
            files.append(File.generated(config, f"examples/{path.name}", abs_src_path=str(path)))
    return files
