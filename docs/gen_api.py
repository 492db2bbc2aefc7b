"""Generate the API reference pages at build time (mkdocs-gen-files), one per public module of the four packages.

Walks kron/, trials/, search/ and analysis/ on disk, so a moved or new module gets its page with no edit here.
Skipped: private modules (a name part starting with "_", except a package's __init__) and __main__. Each page holds
one mkdocstrings directive; mkdocstrings' Python handler reads the source statically (griffe), so building the site
imports neither torch nor Ray. The nav of the section is written as api/SUMMARY.md for mkdocs-literate-nav.
"""
from pathlib import Path

import mkdocs_gen_files

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kron", "trials", "search", "analysis")

nav = mkdocs_gen_files.Nav()
nav["Overview"] = "index.md"  # docs/api/index.md, written by hand
for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            doc_path = Path(*parts, "index.md")
        else:
            doc_path = Path(*parts).with_suffix(".md")
        if any(part.startswith("_") or part == "__main__" for part in parts):
            continue
        identifier = ".".join(parts)
        nav[tuple(parts)] = doc_path.as_posix()
        with mkdocs_gen_files.open(Path("api", doc_path), "w") as page:
            page.write(f"::: {identifier}\n")
        mkdocs_gen_files.set_edit_path(Path("api", doc_path), path.relative_to(ROOT))

with mkdocs_gen_files.open("api/SUMMARY.md", "w") as summary:
    summary.writelines(nav.build_literate_nav())
