"""The documentation: the site builds with no warnings, its internal links and anchors
resolve, its pages render what they should (the API reference from the docstrings, the
executed notebook with its plots), and every Python example in the README and the guides
runs and prints what the page says it prints."""

import ast
import contextlib
import html.parser
import io
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PAGES = [p for p in PAGES if "_build" not in p.parts]
FENCE = re.compile(r"```python\n(.*?)```(?:\n\n[^\n]*prints[^\n]*\n\n```text\n(.*?)```)?", re.S)


def test_the_readme_is_a_front_page_with_the_two_commands_first():
  lines = (ROOT / "README.md").read_text().splitlines()
  assert len(lines) < 200, len(lines)
  commands = [l.strip() for l in lines[:12] if l.startswith("    python3 -m venv")]
  assert commands[0].endswith(
    "jaxsoftmax-run --config=feedback_digits --workdir=runs/feedback_digits"
  )
  assert commands[1].endswith('pip install ".[test]" && python -m pytest')


def _examples():
  for page in PAGES:
    for i, match in enumerate(FENCE.finditer(page.read_text())):
      yield pytest.param(match.group(1), match.group(2), id=f"{page.relative_to(ROOT)}:{i}")


@pytest.mark.parametrize("code, printed", list(_examples()))
def test_every_python_example_runs_and_prints_what_the_page_shows(
  code, printed, tmp_path, monkeypatch
):
  # Before: the README's npz example was not self-contained (x_train undefined), and its
  # padding example raised eagerly on the -100 label it called padding.
  ast.parse(code)
  monkeypatch.chdir(tmp_path)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, "<example>", "exec"), {"__name__": "__example__"})
  if printed is not None:
    assert out.getvalue().split() == printed.split(), out.getvalue()


class _Page(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.ids, self.links, self.images, self.text, self._skip = set(), [], [], [], 0
    self.scripts = []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if "id" in attrs:
      self.ids.add(attrs["id"])
    if tag == "a" and attrs.get("href"):
      self.links.append(attrs["href"])
    if tag == "img":
      self.images.append(attrs.get("src", ""))
    if tag in ("script", "style"):
      self._skip += 1
    if tag == "script" and attrs.get("src"):
      self.scripts.append(attrs["src"])

  def handle_endtag(self, tag):
    if tag in ("script", "style"):
      self._skip -= 1

  def handle_data(self, data):
    if not self._skip:
      self.text.append(data)


def _parse(path: Path) -> _Page:
  page = _Page()
  page.feed(path.read_text(encoding="utf-8"))
  page.text = re.sub(r"\s+", " ", " ".join(page.text))
  return page


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  out = tmp_path_factory.mktemp("html")
  done = subprocess.run(
    [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "docs", str(out)],
    cwd=ROOT,  # docs/conf.py keeps JAX on the CPU
    capture_output=True,
    text=True,
    timeout=900,
  )
  # Sphinx's own (the notebook's kernel logs its own "[IPKernelApp] WARNING" lines).
  warnings = re.findall(r".*: (?:WARNING|ERROR|CRITICAL): .*", done.stderr)
  assert done.returncode == 0 and not warnings, done.stderr[-5000:]
  return out, {p.relative_to(out).as_posix(): _parse(p) for p in out.rglob("*.html")}


def test_every_internal_link_and_anchor_resolves(site):
  out, pages = site
  broken = []
  for name, page in pages.items():
    for href in page.links:
      parts = urlsplit(href)
      if parts.scheme or href.startswith(("mailto:", "//")):
        continue
      target = (out / name).parent / unquote(parts.path) if parts.path else out / name
      key = target.resolve().relative_to(out.resolve()).as_posix() if target.exists() else None
      if key is None:
        broken.append((name, href))
      elif parts.fragment and key in pages and parts.fragment not in pages[key].ids:
        broken.append((name, href))
  assert not broken, broken[:20]


def test_the_pages_render_the_guides_the_reference_and_the_notebook(site):
  _, pages = site
  index = pages["index.html"].text
  assert "Getting started" in index and "API reference" in index
  for guide in (
    "feedback",
    "literature",
    "data",
    "runs",
    "mesh",
    "language_models",
    "multilabel",
    "losses",
    "fused",
    "hierarchical",
    "accelerators",
    "speed",
  ):
    assert f"guides/{guide}.html" in pages, guide
  api = pages["api/losses.html"].text
  # Each public loss with its docstring and its example, rendered (not raw reST).
  for name in ("complement_nll", "fused_complement_set_nll", "tree_complement_set_nll"):
    assert re.search(rf"jaxsoftmax\.losses\. ?{name} ?\(", api), name
  assert ">>> " in api and "Parameters" in api
  for name, page in pages.items():
    assert ".. py:" not in page.text and ":class:`" not in page.text, name
  keys = pages["api/config.html"].text
  assert "config.feedback_sets" in keys and "config.vocab_chunk" in keys
  # The notebook, executed at build time (before: tests/experiments/test_notebook.py).
  notebook = pages["notebooks/losses.html"]
  assert len([s for s in notebook.images if s.endswith(".png")]) == 2, notebook.images
  assert "first gap where log(1 - softmax) is not finite" in notebook.text
  assert "complement_likelihood" in notebook.text
  assert "Traceback" not in notebook.text


def test_every_page_has_one_search(site):
  # Before: the header's search button and the sidebar's search field, on every page.
  out, pages = site
  for name in ("index.html", "guides/losses.html", "api/losses.html"):
    html = (out / name).read_text(encoding="utf-8")
    assert html.count("search-button-field") == 0, name
    assert html.count('class="btn btn-sm pst-navbar-icon search-button') == 1, name


def test_the_site_loads_nothing_from_the_network(site):
  # Before: every page with math loaded MathJax from a CDN, so math stayed raw TeX offline.
  out, pages = site
  remote = {(name, src) for name, page in pages.items() for src in page.scripts}
  remote = {(name, src) for name, src in remote if urlsplit(src).scheme or src.startswith("//")}
  assert not remote, sorted(remote)[:5]
  losses = pages["api/losses.html"]
  mathjax = [src for src in losses.scripts if "mathjax" in src.lower()]
  assert mathjax, losses.scripts
  assert all(((out / "api" / src.split("?")[0]).resolve()).is_file() for src in mathjax)


def test_the_speed_guides_loss_tables_summarise_its_full_output():
  # The three summary tables are `python -m experiments.benchmarks.losses --summarize` of
  # the full output the page shows (in its <details>), not figures copied by hand.
  from experiments.benchmarks.losses import summary

  page = (ROOT / "docs" / "guides" / "speed.md").read_text()
  full = page[page.index("<details><summary>python -m experiments.benchmarks.losses") :]
  tables = summary(full[: full.index("</details>")].splitlines()).split("\n\n")
  assert len(tables) == 3 and all(len(t.splitlines()) >= 8 for t in tables)
  for table in tables:
    assert table in page, table.splitlines()[0]
