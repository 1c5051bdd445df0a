"""The documentation site builds without a single warning and documents every public name.

The pages' ``>>>`` examples are doctests of their own (``pytest docs``, through the
``--doctest-glob='*.md'`` option in pyproject.toml); this file checks the site as a whole.
"""

import inspect
import pathlib
import re
import subprocess
import sys

import pytest

import metaopt
import metaopt.tasks

# Every public namespace and the names it exports.
PUBLIC = {
    "metaopt": metaopt.__all__,
    "metaopt.implicit": metaopt.implicit.__all__,
    "metaopt.bilevel": metaopt.bilevel.__all__,
    "metaopt.meta": metaopt.meta.__all__,
    "metaopt.tasks": metaopt.tasks.__all__,
}
PUBLIC_NAMES = [f"{module}.{name}" for module, names in PUBLIC.items() for name in names]

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
API_PAGE = DOCS / "api.md"
DIRECTIVE = re.compile(
    r"^\.\. (currentmodule|module|autofunction|autoclass|autodata)::\s+([\w.]+)\s*$",
    re.MULTILINE,
)


def _documented_names(text):
    """Fully qualified names of the autodoc directives, following ``currentmodule``."""
    module, names = None, []
    for directive, argument in DIRECTIVE.findall(text):
        if directive in ("currentmodule", "module"):
            module = argument
        else:
            names.append(f"{module}.{argument}")
    return names


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    """Builds the HTML site once, outside the repository, with warnings turned into errors."""
    out = tmp_path_factory.mktemp("docs-html")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    command += ["-d", str(out / ".doctrees"), str(DOCS), str(out / "html")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    return result, out / "html"


def test_site_builds_with_warnings_as_errors(built_site):
    result, _ = built_site
    assert result.returncode == 0, (
        f"sphinx-build -W failed with exit code {result.returncode}; every warning below is an "
        f"error.\n--- stderr ---\n{result.stderr}\n--- stdout ---\n{result.stdout[-3000:]}"
    )


def test_every_public_name_is_on_the_built_api_page(built_site):
    result, html = built_site
    assert result.returncode == 0, "the site did not build; see the test above"
    page = (html / "api.html").read_text(encoding="utf-8")
    missing = [name for name in PUBLIC_NAMES if f'id="{name}"' not in page]
    assert not missing, f"public names without an entry in the built API reference: {missing}"


def test_api_page_documents_exactly_the_public_names():
    documented = _documented_names(API_PAGE.read_text(encoding="utf-8"))
    duplicated = sorted({name for name in documented if documented.count(name) > 1})
    assert not duplicated, f"documented more than once in docs/api.md: {duplicated}"
    missing = sorted(set(PUBLIC_NAMES) - set(documented))
    assert not missing, f"add an autodoc directive to docs/api.md for: {missing}"
    stale = sorted(set(documented) - set(PUBLIC_NAMES))
    assert not stale, f"docs/api.md documents names that are not public: {stale}"


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_public_name_has_its_own_docstring(name):
    module, _, attribute = name.rpartition(".")
    obj = getattr(sys.modules[module], attribute)
    doc = inspect.getdoc(obj) or ""
    assert doc.strip(), f"{name} has no docstring"
    if inspect.isclass(obj) and hasattr(obj, "_fields"):
        # A NamedTuple without a docstring gets an automatic one: "Name(field, field, ...)".
        automatic = f"{obj.__name__}({', '.join(obj._fields)})"
        assert doc.strip() != automatic, f"{name} has only the automatic docstring"
