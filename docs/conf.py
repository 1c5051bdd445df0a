"""Sphinx configuration for the metaopt documentation.

Build (output outside the repository):

    python -m sphinx -W --keep-going -b html docs /tmp/docs-out

The build needs no network: there is no intersphinx mapping, and MathJax is loaded by the
reader's browser, not at build time.
"""

import os
import re
import sys

# Document the checkout this file lives in, even when another metaopt is installed.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
# Autodoc imports metaopt and therefore JAX; a docs build never needs an accelerator.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import metaopt

project = "metaopt"
author = "metaopt authors"
copyright = "2025, metaopt authors"
release = metaopt.__version__
version = release

extensions = [
    "myst_nb",  # MyST markdown and the example notebooks, rendered with their saved outputs
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "myst-nb", ".rst": "restructuredtext", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**/.ipynb_checkpoints"]

# The notebooks in examples/ are committed executed (tests/test_notebooks.py checks it): the docs
# show those outputs and never run them. Sphinx reads sources only below docs/, so each notebook
# has a committed stub docs/examples/<name>.nblink naming it, and notebook_link.read returns the
# notebook for it: the build writes nothing into the checkout (it works from a read-only one).
nb_execution_mode = "off"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import notebook_link  # noqa: E402

nb_custom_formats = {notebook_link.SUFFIX: "notebook_link.read"}

# MyST: $...$ and $$...$$ maths, and bare LaTeX environments (align, gather, ...).
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3

# Docstrings follow optax: Google-style sections, RST maths, :func: roles.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # NamedTuple ``Attributes:`` as fields, not duplicate objects
napoleon_attr_annotations = False  # no "(jax.jaxlib._jax.Array)" in those fields

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Keep the hyperparameter type readable instead of expanding the union in every signature, and
# link it to its entry in the API reference (api/index.md), shown without the module prefix.
autodoc_type_aliases = {"ScalarOrSchedule": "metaopt.ScalarOrSchedule"}
python_use_unqualified_type_names = True
autosummary_generate = False

# Every cross-reference to a metaopt object must resolve. Types that live in other libraries
# cannot (no intersphinx inventories at build time), so they are listed here.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(optax|jax|jnp|np|numpy|chex|typing|collections|os)\..*"),
    # Private aliases in signatures (metaopt.learned's Estimator and MetaTrainStep are spelled
    # out in the docstrings that use them).
    (r"py:.*", r"Any|Callable|GradFn|Direction|NamedTuple|Literal|Estimator|MetaTrainStep"),
    (r"py:.*", r"int|float|str|bool|None|tuple|list|dict|object"),
]


def _readable_aliases(app, what, name, obj, options, signature, return_annotation):
    """Shows ``ScalarOrSchedule | None`` instead of ``TypeAliasForwardRef('ScalarOrSchedule')``.

    Sphinx renders a type alias that sits inside a union through its internal forward-reference
    wrapper; strip the wrapper so the signature reads like the source.
    """
    pattern = re.compile(r"TypeAliasForwardRef\('([^']+)'\)")
    if signature is not None:
        signature = pattern.sub(r"\1", signature)
    if return_annotation is not None:
        return_annotation = pattern.sub(r"\1", return_annotation)
    return signature, return_annotation


def _track_linked_notebook(app, docname, source):
    """Rebuilds a notebook's page when the notebook changes, not only when its stub does."""
    if str(app.env.doc2path(docname)).endswith(notebook_link.SUFFIX):
        app.env.note_dependency(str(notebook_link.target(source[0])))


def setup(app):
    app.connect("autodoc-process-signature", _readable_aliases)
    app.connect("source-read", _track_linked_notebook)


html_theme = "furo"
html_title = f"metaopt {release}"
html_static_path: list[str] = []
pygments_style = "sphinx"
pygments_dark_style = "monokai"
