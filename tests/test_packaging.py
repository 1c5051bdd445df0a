"""The distribution is metaopt-jax: install hints name it, and the wheel carries what users need.

The import name is ``metaopt``, but ``metaopt`` on the package index is an unrelated project, so
a hint such as ``pip install metaopt[examples]`` would install the wrong package.
"""

import ast
import email.parser
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

import metaopt
import metaopt.learned

ROOT = pathlib.Path(__file__).resolve().parents[1]
DISTRIBUTION = "metaopt-jax"

_REQUIREMENT = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?")
_QUOTES = "\"'`"


def _normalize(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def install_targets(text):
    """The distributions named after each ``pip install`` in ``text``, in order.

    Options (``-e``, ``-U``) and local paths (``.``, ``".[test]"``) are skipped. A command ends at
    the first word that is not a requirement (``&&``, ``#``, prose) or at punctuation that closes
    it (a closing backtick or quote followed by more characters, as in ``"x[y]"`):``).
    """
    targets = []
    for match in re.finditer(r"pip install\b", text):
        for token in text[match.end() : match.end() + 300].split():
            if token.startswith("-"):
                continue
            bare = token.lstrip(_QUOTES)
            if bare.startswith((".", "/")):
                continue
            requirement = _REQUIREMENT.match(bare)
            if requirement is None:
                break
            targets.append(requirement.group(1))
            if bare[requirement.end() :]:
                break  # "metaopt-jax[examples]"`) or ``...``):
    return targets


def _string_literals(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value
        elif isinstance(node, ast.JoinedStr):
            yield "".join(
                part.value
                for part in node.values
                if isinstance(part, ast.Constant) and isinstance(part.value, str)
            )


def _notebook_text(path):
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(cell["source"]) for cell in cells)


def _documents():
    """(path, text) for every place a user reads an install hint."""
    for path in sorted((ROOT / "metaopt").rglob("*.py")):
        yield path, "\n".join(_string_literals(path))
    for path in sorted((ROOT / "examples").rglob("*.py")):
        yield path, path.read_text()
    for pattern in ("examples/**/*.ipynb", "docs/**/*.ipynb"):
        for path in sorted(ROOT.glob(pattern)):
            if "_build" not in path.parts:
                yield path, _notebook_text(path)
    markdown = [ROOT / "README.md", ROOT / "BUILD_NOTES.md", ROOT / "CHANGELOG.md"]
    markdown += sorted(path for path in (ROOT / "docs").rglob("*.md") if "_build" not in path.parts)
    for path in markdown:
        if path.exists():
            yield path, path.read_text()


def test_install_targets_parses_the_forms_the_docs_use():
    assert install_targets('Install it with: pip install "metaopt[examples]"') == ["metaopt"]
    assert install_targets("``pip install\nmetaopt[examples]``)::\n\n  python x.py") == ["metaopt"]
    assert install_targets('(`pip install "metaopt-jax[examples]"`):\nnext line') == [DISTRIBUTION]
    assert install_targets('pip install -e ".[test]" && .venv/bin/python -m pytest') == []
    assert install_targets("pip install -U jax optax  # the latest") == ["jax", "optax"]
    assert install_targets("pip install metaopt_jax") == ["metaopt_jax"]


def test_every_install_hint_names_the_distribution():
    wrong, ours = [], []
    for path, text in _documents():
        where = path.relative_to(ROOT)
        for target in install_targets(text):
            if not _normalize(target).startswith("metaopt"):
                continue
            (ours if target == DISTRIBUTION else wrong).append(f"{where}: {target}")
        if re.search(r"pip install\s+[\"'`]?metaopt\[", text):
            wrong.append(f"{where}: metaopt[...] as an install target")
    assert not wrong, (
        f"install hints must name {DISTRIBUTION!r} (metaopt on PyPI is another project)"
    )
    # The scan must see the hints that exist (error messages, docs, examples), or it proves nothing.
    places = {entry.split(":")[0] for entry in ours}
    for expected in (
        "metaopt/tasks/_digits.py",
        "metaopt/optimizers/_flax.py",
        "examples/demo.py",
        "docs/tasks.md",
    ):
        assert expected in places, f"no install hint found in {expected}"


def test_installed_distribution_is_metaopt_jax():
    assert importlib.metadata.version(DISTRIBUTION) == metaopt.__version__
    assert importlib.metadata.distribution(DISTRIBUTION).metadata["Name"] == DISTRIBUTION


def _pyproject():
    with open(ROOT / "pyproject.toml", "rb") as file:
        return tomllib.load(file)["project"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel pip builds from this checkout, with the build backend already installed.

    The sources are copied first: setuptools builds in the source tree, and a stale ``build/``
    there would put deleted modules into later wheels.
    """
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "metaopt", source / "metaopt", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--quiet"]
    subprocess.run(
        [*command, "--no-build-isolation", "-w", str(out)],
        check=True,
        env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    (path,) = out.glob("*.whl")
    return zipfile.ZipFile(path)


def test_wheel_ships_license_type_marker_and_only_the_package(wheel):
    names = wheel.namelist()
    dist_info = f"metaopt_jax-{metaopt.__version__}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names
    assert wheel.read(f"{dist_info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
    assert b"Apache License" in (ROOT / "LICENSE").read_bytes()[:200]
    assert "metaopt/py.typed" in names
    assert "metaopt/__init__.py" in names
    # The pretrained learned optimizers load from package data (metaopt.learned.pretrained).
    for name in metaopt.learned.PRETRAINED:
        path = f"metaopt/learned/pretrained/{name}.npz"
        assert path in names
        assert wheel.read(path) == (ROOT / path).read_bytes()
    assert "metaopt/learned/pretrained/README.md" in names
    assert {name.split("/")[0] for name in names} == {"metaopt", dist_info}


def test_wheel_metadata_names_metaopt_jax_and_the_declared_dependencies(wheel):
    dist_info = f"metaopt_jax-{metaopt.__version__}.dist-info"
    metadata = email.parser.Parser().parsestr(wheel.read(f"{dist_info}/METADATA").decode())
    project = _pyproject()
    assert metadata["Name"] == DISTRIBUTION
    assert metadata["Version"] == metaopt.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert "Typing :: Typed" in metadata.get_all("Classifier")
    urls = dict(line.split(", ", 1) for line in metadata.get_all("Project-URL"))
    assert set(urls) == {"Homepage", "Documentation", "Source", "Issues", "Changelog"}
    requires = metadata.get_all("Requires-Dist")
    runtime = [line for line in requires if "extra ==" not in line]
    assert sorted(runtime) == sorted(project["dependencies"])
    # Only what the package imports at runtime; chex and absl-py belong to the extras.
    assert {re.match(r"[A-Za-z0-9_.-]+", line).group() for line in runtime} == {
        "jax",
        "optax",
        "numpy",
    }
    for extra, lines in project["optional-dependencies"].items():
        declared = [line for line in requires if f'extra == "{extra}"' in line]
        assert len(declared) == len(lines), extra


def _module_level_imports(tree):
    """Top-level module names imported when the module is imported (not inside functions)."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]
        elif isinstance(node, ast.If | ast.Try | ast.With):
            for field in ("body", "orelse", "finalbody", "handlers"):
                pending.extend(getattr(node, field, []))
        elif isinstance(node, ast.ExceptHandler):
            pending.extend(node.body)


def test_the_package_imports_only_its_runtime_dependencies():
    runtime = {re.match(r"[A-Za-z0-9_.-]+", line).group() for line in _pyproject()["dependencies"]}
    allowed = runtime | {"jaxlib", "metaopt"} | set(sys.stdlib_module_names)
    found = {}
    for path in sorted((ROOT / "metaopt").rglob("*.py")):
        for name in _module_level_imports(ast.parse(path.read_text())):
            found.setdefault(name, path.relative_to(ROOT))
    assert {"jax", "optax", "numpy"} <= set(found)
    extra = {name: str(path) for name, path in found.items() if name not in allowed}
    assert not extra, f"imported at import time but not a runtime dependency: {extra}"
