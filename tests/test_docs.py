"""The documentation site builds without a single warning and documents every public name.

The pages' ``>>>`` examples are doctests of their own (``pytest docs``, through the
``--doctest-glob='*.md'`` option in pyproject.toml); this file checks the site as a whole.
"""

import importlib
import inspect
import os
import pathlib
import pkgutil
import re
import shutil
import subprocess
import sys

import pytest

import metaopt


def _public_namespaces():
    """Every public namespace (the package and each public subpackage) and the names it exports.

    Subpackages are discovered, so a new one is covered without editing this file. A name that
    a subpackage re-exports at the top level (the optimizers) is documented once, at the top.
    """
    namespaces = {"metaopt": list(metaopt.__all__)}
    for info in pkgutil.iter_modules(metaopt.__path__):
        if not info.ispkg or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"metaopt.{info.name}")
        namespaces[module.__name__] = [
            name
            for name in module.__all__
            if getattr(metaopt, name, None) is not getattr(module, name)
        ]
    return namespaces


PUBLIC = _public_namespaces()
PUBLIC_NAMES = [f"{module}.{name}" for module, names in PUBLIC.items() for name in names]

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
API_PAGES = sorted((DOCS / "api").glob("*.md"))
DIRECTIVE = re.compile(
    r"^\.\. (currentmodule|module|autofunction|autoclass|autodata|py:type)::\s+([\w.]+)\s*$",
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


def _obj(name):
    module, _, attribute = name.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


def _files(root):
    """Every file below ``root`` with its size and modification time."""
    return {
        str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
    }


def _set_writable(root, writable):
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode | 0o200 if writable else mode & ~0o222)


@pytest.fixture(scope="module")
def read_only_sources(tmp_path_factory):
    """A read-only copy of what the build reads (docs/, examples/, metaopt/) and its files."""
    root = tmp_path_factory.mktemp("checkout")
    for name in ("docs", "examples", "metaopt"):
        ignore = shutil.ignore_patterns("__pycache__", "_build", ".ipynb_checkpoints")
        shutil.copytree(DOCS.parent / name, root / name, ignore=ignore)
    return root, _files(root)


@pytest.fixture(scope="module")
def built_site(tmp_path_factory, read_only_sources):
    """Builds the HTML site once, from a read-only checkout, with warnings turned into errors."""
    root, _ = read_only_sources
    out = tmp_path_factory.mktemp("docs-html")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    command += ["-d", str(out / ".doctrees"), str(root / "docs"), str(out / "html")]
    # A read-only checkout gets no bytecode caches either.
    environment = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    # The timeout only guards against a hang: the build needs about 15 s of CPU, but took
    # over 3 minutes of wall time beside other jobs on a 2-core machine.
    _set_writable(root, False)
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=600, check=False, env=environment
        )
    finally:
        _set_writable(root, True)  # so that pytest can delete its temporary directory
    return result, out / "html"


def test_the_build_writes_nothing_into_the_checkout(built_site, read_only_sources):
    # Permissions alone do not stop a build run as root, so compare the files as well.
    root, before = read_only_sources
    result, _ = built_site
    assert result.returncode == 0, f"the build failed:\n{result.stderr}"
    after = _files(root)
    changed = sorted(
        name for name in before.keys() | after.keys() if before.get(name) != after.get(name)
    )
    assert not changed, f"the docs build created or changed these files in the checkout: {changed}"


def test_site_builds_with_warnings_as_errors(built_site):
    result, _ = built_site
    assert result.returncode == 0, (
        f"sphinx-build -W failed with exit code {result.returncode}; every warning below is an "
        f"error.\n--- stderr ---\n{result.stderr}\n--- stdout ---\n{result.stdout[-3000:]}"
    )


def test_every_public_name_is_on_a_built_api_page(built_site):
    result, html = built_site
    assert result.returncode == 0, "the site did not build; see the test above"
    pages = "".join(path.read_text(encoding="utf-8") for path in (html / "api").glob("*.html"))
    missing = [name for name in PUBLIC_NAMES if f'id="{name}"' not in pages]
    assert not missing, f"public names without an entry in the built API reference: {missing}"


def test_api_pages_document_exactly_the_public_names():
    assert DOCS / "api" / "index.md" in API_PAGES, "the API reference starts at docs/api/index.md"
    documented = [
        name for page in API_PAGES for name in _documented_names(page.read_text(encoding="utf-8"))
    ]
    duplicated = sorted({name for name in documented if documented.count(name) > 1})
    assert not duplicated, f"documented more than once in docs/api/: {duplicated}"
    missing = sorted(set(PUBLIC_NAMES) - set(documented))
    assert not missing, f"add an autodoc directive to a page of docs/api/ for: {missing}"
    stale = sorted(set(documented) - set(PUBLIC_NAMES))
    assert not stale, f"docs/api/ documents names that are not public: {stale}"


def test_every_api_page_is_reachable_from_the_api_index():
    index = (DOCS / "api" / "index.md").read_text(encoding="utf-8")
    unlisted = [page.stem for page in API_PAGES if page.stem != "index" if page.stem not in index]
    assert not unlisted, f"add these pages to the toctree of docs/api/index.md: {unlisted}"


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_public_name_has_its_own_docstring(name):
    obj = _obj(name)
    doc = inspect.getdoc(obj) or ""
    assert doc.strip(), f"{name} has no docstring"
    if inspect.isclass(obj) and hasattr(obj, "_fields"):
        # A NamedTuple without a docstring gets an automatic one: "Name(field, field, ...)".
        automatic = f"{obj.__name__}({', '.join(obj._fields)})"
        assert doc.strip() != automatic, f"{name} has only the automatic docstring"


CALLABLES = [
    name for name in PUBLIC_NAMES if inspect.isfunction(_obj(name)) or inspect.isclass(_obj(name))
]


@pytest.mark.parametrize("name", CALLABLES)
def test_public_function_or_class_has_a_runnable_example(name):
    # Doctests run with the module's tests (--doctest-modules), so an example here is checked.
    doc = inspect.getdoc(_obj(name)) or ""
    assert re.search(r"^Examples?\b", doc, re.MULTILINE) and ">>>" in doc, (
        f"{name}: add an 'Example:' section with a '>>>' example that checks something"
    )


ALIASES = [
    name
    for name in metaopt.__all__
    if f"scale_by_{name}" in metaopt.__all__ and inspect.isfunction(getattr(metaopt, name))
]


def test_the_aliases_are_found():
    assert {"ademamix", "sam", "shampoo", "soap"} <= set(ALIASES), ALIASES


@pytest.mark.parametrize("name", ALIASES)
def test_alias_cites_the_papers_of_its_core(name):
    alias, core = (
        inspect.getdoc(getattr(metaopt, name)),
        inspect.getdoc(getattr(metaopt, f"scale_by_{name}")),
    )
    assert "References:" in alias, f"metaopt.{name}: add a References: section"
    papers = set(re.findall(r"<(https?://[^>]+)>", core.split("References:")[1].split("Args:")[0]))
    cited = set(re.findall(r"<(https?://[^>]+)>", alias.split("References:")[1]))
    assert papers <= cited, (
        f"metaopt.{name} should cite {sorted(papers - cited)}, as scale_by_{name} does"
    )
