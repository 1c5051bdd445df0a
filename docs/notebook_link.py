"""Renders the notebooks of ``examples/`` in the docs without copying them into ``docs/``.

Sphinx reads sources only below its source directory. Each notebook therefore has a committed
stub, ``docs/examples/<name>.nblink``, whose only content is the notebook's path relative to the
repository root. myst-nb hands that text to :func:`read` (``nb_custom_formats`` in
``conf.py``), which returns the notebook itself, with its committed outputs. The build writes
nothing into the checkout, so it works from a read-only one.
"""

import pathlib

import nbformat

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
SUFFIX = ".nblink"


def target(text: str) -> pathlib.Path:
    """The notebook a stub names: its text is a path relative to the repository root."""
    path = REPOSITORY / text.strip()
    if path.suffix != ".ipynb" or not path.is_file():
        raise ValueError(
            f"a {SUFFIX} stub must hold the path of a notebook relative to {REPOSITORY}, "
            f"got {text.strip()!r}"
        )
    return path


def read(text: str) -> nbformat.NotebookNode:
    """The notebook named by a stub's text, as myst-nb's reader for ``.nblink`` files."""
    return nbformat.read(target(text), as_version=4)
