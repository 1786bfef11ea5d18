"""Build the documentation site `_docs/` from the notebooks: `python tests/build_docs.py` (what `make docs` runs).

The build is `nbdev_docs` without its side effects on tracked files:

1. nbdev's notebook processing (`proc_nbs`: frontmatter, `show_doc` of every exported symbol, links
   to symbols) writes `_proc/`; `nbs/nbdev.yml` and `nbs/sidebar.yml` are regenerated as nbdev does.
2. `quarto render` turns `_proc/` into the site `_docs/` when `quarto` is on PATH (as `nbdev_docs`).
   Without Quarto (it is not on PyPI as a wheel: the `quarto-cli` package downloads the binary from
   GitHub when it is built, which fails offline), nbconvert renders the same processed notebooks to
   one HTML page each, with the page names, titles, navigation and links Quarto would give them.

`nbdev_docs` itself is not used: it also regenerates README.md from `index.ipynb` (`nbdev_readme`),
but README.md is written by hand; and it rewrites `pot/_modidx.py`, which `nbdev_export` owns.
(`readme_nb` in settings.ini names no notebook, so a stray `nbdev_docs`/`nbdev_readme` leaves README.md alone too.)

nbdev runs, while processing, every code cell that has an import (alone, with only the imports and
exported cells before it): keep imports in import-only cells, or the cell fails on names defined
in the notebook. Environment: `DOCS_WORKERS` (default 2) notebooks processed at once.
"""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _frontmatter(nb) -> dict:
    "The YAML frontmatter nbdev puts in the first (raw) cell of a processed notebook."
    import yaml
    if not nb.cells or nb.cells[0].cell_type != "raw": return {}
    m = re.match(r"\s*---\n(.*?)\n---", nb.cells[0].source, re.S)
    return (yaml.safe_load(m.group(1)) or {}) if m else {}


def _directives(src: str) -> tuple[dict, str]:
    "Quarto cell options (`#| key: value`) of a code cell, and its source without them."
    opts, lines = {}, src.splitlines()
    while lines and lines[0].startswith("#|"):
        k, _, v = lines.pop(0)[2:].partition(":")
        opts[k.strip()] = v.strip().strip('"')
    return opts, "\n".join(lines)


def unique_pages(proc: Path) -> dict[str, str]:
    """Give every processed notebook its own page; return {notebook: page}.

    nbdev names a page after its notebook without the number, so `10_train.ipynb` (module `pot.train`)
    and the experiment notebook `train.ipynb` both claim `train.html`. The module keeps the name (nbdev's
    links to its symbols point there); an unnumbered notebook that collides becomes `experiment-<name>.html`.
    """
    import nbformat
    from nbdev.doclinks import _nbpath2html
    nbs = {p.name: nbformat.read(p, as_version=4) for p in sorted(proc.glob("*.ipynb"))}
    page = {n: _frontmatter(nb).get("output-file", _nbpath2html(Path(n)).name) for n, nb in nbs.items()}
    for n, nb in nbs.items():
        if Path(n).stem + ".html" == page[n] and list(page.values()).count(page[n]) > 1:
            new = f"experiment-{page[n]}"
            nb.cells[0].source = nb.cells[0].source.replace(f"output-file: {page[n]}", f"output-file: {new}")
            nbformat.write(nb, proc / n)
            page[n] = new
    clash = {v for v in page.values() if list(page.values()).count(v) > 1}
    assert not clash, f"several notebooks would render to the same page: {clash}"
    return page


def render_nbconvert(proc: Path, docs: Path, sidebar: list[str]) -> None:
    "Render the processed notebooks in `proc` to `docs/<output-file>` with nbconvert (no Quarto)."
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor
    from nbdev.doclinks import _nbpath2html

    pages = {}
    for p in sorted(proc.glob("*.ipynb")):
        nb = nbformat.read(p, as_version=4)
        fm = _frontmatter(nb)
        pages[p.name] = (nb, fm, fm.get("output-file", _nbpath2html(Path(p.name)).name))
    order = [n for n in sidebar if n in pages] + sorted(set(pages) - set(sidebar))
    title = lambda n: pages[n][1].get("title", Path(n).stem)
    nav = " · ".join(f'<a href="{pages[n][2]}">{title(n)}</a>' for n in order)
    nav = f'<nav style="padding:.5rem 1rem;border-bottom:1px solid #ddd;font-family:sans-serif">{nav}</nav>'

    def link(m):
        out = pages.get(m.group(2))
        return m.group(1) + (out[2] if out else _nbpath2html(Path(m.group(2))).name)

    exporter = HTMLExporter()
    tags = TagRemovePreprocessor(remove_cell_tags={"docs-remove"}, remove_input_tags={"docs-hide-input"},
                                 remove_all_outputs_tags={"docs-hide-output"})
    exporter.register_preprocessor(tags, enabled=True)
    docs.mkdir(parents=True)
    for name in order:
        nb, fm, out = pages[name]
        cells = nb.cells[1:] if fm else nb.cells
        head = f"# {fm['title']}" if "title" in fm else ""
        if fm.get("description"): head += f"\n\n> {fm['description']}"
        nb.cells = [nbformat.v4.new_markdown_cell(head)] if head else []
        for c in cells:
            if c.cell_type == "raw": continue
            if c.cell_type == "code":
                opts, c.source = _directives(c.source)
                t = c.metadata.setdefault("tags", [])
                if opts.get("include") == "false": t.append("docs-remove")
                if opts.get("echo") == "false": t.append("docs-hide-input")
                if opts.get("output") == "false": t.append("docs-hide-output")
            nb.cells.append(c)
        html, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": fm.get("title", name)}})
        html = re.sub(r'(href=")([^":#?/]+\.ipynb)', link, html)
        html = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + nav, html, count=1)
        (docs / out).write_text(html, encoding="utf-8")


def build_docs(n_workers: int = 2, renderer: str | None = None) -> str:
    "Build the site into `_docs/` (settings.ini `doc_path`) and return the renderer used."
    os.chdir(ROOT)  # nbdev finds settings.ini from the working directory
    import yaml
    from nbdev.config import get_config
    from nbdev.quarto import nbdev_sidebar, refresh_quarto_yml
    from nbdev.serve import proc_nbs
    cfg = get_config()
    proc, docs = cfg.config_path / "_proc", cfg.doc_path
    shutil.rmtree(proc, ignore_errors=True)
    refresh_quarto_yml()
    nbdev_sidebar.__wrapped__()
    proc_nbs(n_workers=n_workers)
    unique_pages(proc)
    renderer = renderer or ("quarto" if shutil.which("quarto") else "nbconvert")
    shutil.rmtree(docs, ignore_errors=True)
    if renderer == "quarto":
        subprocess.run(["quarto", "render", "--no-cache"], cwd=proc, check=True)
        shutil.move(proc / docs.name, docs)
    else:
        side = yaml.safe_load((cfg.nbs_path / "sidebar.yml").read_text())["website"]["sidebar"]["contents"]
        render_nbconvert(proc, docs, [s for s in side if isinstance(s, str)])
    return renderer


def main() -> None:
    # the environment's tools (quarto when installed there, jupyter) without activating it
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    t0 = time.time()
    used = build_docs(n_workers=int(os.environ.get("DOCS_WORKERS", 2)))
    size = sum(f.stat().st_size for f in (ROOT / "_docs").rglob("*") if f.is_file())
    print(f"docs: _docs/ built with {used} in {time.time() - t0:.0f} s ({size / 2**20:.1f} MiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
