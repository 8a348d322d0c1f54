"""Sphinx configuration for jaxsoftmax's documentation.

Build it from the repository's root (warnings are errors):

    pip install ".[docs]" && python -m sphinx -W docs docs/_build/html

Sphinx with autodoc and napoleon (the docstrings are Google style) and MyST-NB (the
guides are Markdown; the notebook is executed at build time), as JAX, Flax and Optax
build theirs. Nothing is downloaded, at build time or when a page is read: MathJax is
copied into the site (sphinx-mathjax-offline), there are no intersphinx inventories, so
references to other projects' objects are plain text (``nitpick_ignore_regex``), while
every reference to jaxsoftmax's own objects must resolve (``nitpicky``).
"""

import os
import pathlib
import sys

# The test extra installs libtpu (the TPU compiler): without this JAX would try to start
# a TPU in the build and in the notebook's kernel, which inherits the environment.
if "JAX_PLATFORMS" not in os.environ:
  os.environ["JAX_PLATFORMS"] = "cpu"

import jaxsoftmax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # _ext

project = "jaxsoftmax"
author = "The jaxsoftmax authors"
copyright = "2026, The jaxsoftmax authors"
release = version = jaxsoftmax.__version__

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx-mathjax-offline",  # MathJax ships with the site: math renders offline
  "myst_nb",
  "_ext.config_keys",
]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "jupyter_execute"]
root_doc = "index"

# Markdown: heading anchors for links between guides; $...$ math.
myst_heading_anchors = 4
myst_enable_extensions = ["dollarmath", "colon_fence"]

# The notebook runs at every build; an error in a cell fails it.
nb_execution_mode = "force"
nb_execution_raise_on_error = True
nb_execution_timeout = 600
nb_execution_in_temp = False

autodoc_default_options = {"members": True, "member-order": "bysource"}
# The docstrings say what each argument holds ("[..., K] floating logits"); the
# annotations (ArrayLike, a long union once expanded) would only repeat it.
autodoc_typehints = "none"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

nitpicky = True
nitpick_ignore_regex = [
  # Other projects' objects (no inventories are downloaded) and typing's.
  (
    r"py:.*",
    r"(jax|jaxlib|jnp|np|numpy|flax|nnx|optax|ml_collections|orbax|chex|collections|typing|matplotlib)\..*",
  ),
  (
    r"py:.*",
    r"(ArrayLike|Array|DTypeLike|Callable|Sequence|Iterable|Iterator|Mapping|NamedTuple|Any|Self|Path|pathlib\..*)",
  ),
  (
    r"py:class",
    r"(int|float|str|bool|bytes|dict|list|tuple|None|object|type|complex|frozenset|slice|Ellipsis)",
  ),
]

html_theme = "sphinx_book_theme"
html_title = f"jaxsoftmax {version}"
# The theme shows a search field in the sidebar and in the persistent header beside the
# article header's search button: one search on every page is enough (the button, and
# Ctrl+K).
html_theme_options = {
  "show_toc_level": 2,
  "use_download_button": False,
  "navbar_persistent": [],
}
html_sidebars = {"**": ["navbar-logo.html", "icon-links.html", "sbt-sidebar-nav.html"]}
