"""The documentation covers the public API: every symbol in ``parallax.__all__`` has a
docstring naming each of its parameters and an entry on the reference page; the CLI page
renders every command; every environment variable parallax reads is documented; every page
is in the site's navigation. (``mkdocs build --strict`` in .ci/run renders all of it.)"""

from __future__ import annotations

import inspect
import os
import re
import textwrap

import pytest
import yaml

import parallax
from parallax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
SKIPPED_KINDS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _read(*path: str) -> str:
    with open(os.path.join(ROOT, *path), encoding="utf-8") as f:
        return f.read()


def _public_members(cls: type):
    """(name, member) of the public methods and properties ``cls`` defines or inherits
    from parallax classes (not from object or Exception)."""
    seen = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("parallax"):
            continue
        for name, member in vars(klass).items():
            if name.startswith("_") or name in seen:
                continue
            seen.add(name)
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if inspect.isfunction(member) or isinstance(member, property):
                yield name, member


def _documented() -> list[tuple[str, object, object]]:
    """(id, object whose docstring counts, callable whose parameters must be named)."""
    items = []
    for name in parallax.__all__:
        obj = getattr(parallax, name)
        items.append((name, obj, obj))
        if inspect.isclass(obj):
            for mname, member in _public_members(obj):
                items.append((f"{name}.{mname}", member, member))
    return items


def _own_doc(obj) -> str:
    """The docstring written for ``obj`` itself: not inherited (inspect.getdoc would take a
    base class's) and not the signature a dataclass puts there when it has none."""
    doc = vars(obj).get("__doc__") if inspect.isclass(obj) else obj.__doc__
    if inspect.isclass(obj) and doc and re.match(rf"{obj.__name__}\(.*\)$", doc.strip(), re.S):
        return ""
    return inspect.cleandoc(doc or "")


def _args_entries(doc: str) -> list[str]:
    """The names of the entries of a Google-style ``Args:`` section."""
    m = re.search(r"^(?:Args|Arguments|Parameters):\n((?:[ \t]+\S.*\n?|[ \t]*\n)*)", doc, re.M)
    if not m:
        return []
    block = textwrap.dedent(m.group(1))
    return [e.split(" (")[0].lstrip("*") for e in re.findall(r"^(\S[^:\n]*):", block, re.M)]


def _params(fn) -> list[str]:
    if isinstance(fn, property):
        return []
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values()
            if p.name not in ("self", "cls") and p.kind not in SKIPPED_KINDS]


@pytest.mark.parametrize("name, obj, fn", _documented(), ids=[i[0] for i in _documented()])
def test_docstring_names_every_parameter(name, obj, fn):
    doc = _own_doc(obj)
    if inspect.isclass(obj) and "__init__" in vars(obj):
        doc += "\n" + _own_doc(obj.__init__)          # either may hold the Args
    assert doc.strip(), f"{name} has no docstring"
    missing = [p for p in _params(fn) if not re.search(rf"\b{re.escape(p)}\b", doc)]
    assert not missing, f"{name}'s docstring does not mention its parameters {missing}"
    # An Args section documents one parameter per entry, by its name (mkdocstrings renders
    # "tp, pp: ..." as one unknown parameter).
    if _params(fn):
        unknown = [e for e in _args_entries(doc) if e not in _params(fn)]
        assert not unknown, f"{name}'s Args section has entries {unknown} that are not " \
                            f"parameter names {_params(fn)}"


def test_every_public_symbol_has_a_reference_entry():
    page = _read("docs", "api.md")
    entries = set(re.findall(r"^::: parallax\.(\w+)\s*$", page, re.M))
    assert set(parallax.__all__) <= entries, set(parallax.__all__) - entries


def test_cli_page_renders_every_command():
    """docs/hooks/cli_help.py replaces each marker with that command's --help when the site
    is built; every command needs one."""
    page = _read("docs", "cli.md")
    top = cli.build_parser()
    commands = next(a for a in top._actions if a.dest == "command").choices
    for command in ["", *commands]:
        marker = f"<!-- parallax-help {command} -->" if command else "<!-- parallax-help -->"
        assert marker in page, marker


def test_every_environment_variable_is_documented():
    """Each PARALLAX_* variable the code reads (os.environ / os.getenv) is in the
    configuration page's table and the README's."""
    read = re.compile(r"(?:environ\.get\(|environ\[|getenv\()\s*[\"'](PARALLAX_\w+)")
    used = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "src", "parallax")):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(folder, f), encoding="utf-8") as src:
                    used |= set(read.findall(src.read()))
    assert {"PARALLAX_KERNELS", "PARALLAX_CACHE_DIR", "PARALLAX_BIND_CORES"} <= used
    for page in (("docs", "configuration.md"), ("README.md",)):
        text = _read(*page)
        missing = sorted(v for v in used if f"| `{v}` |" not in text)
        assert not missing, f"{os.path.join(*page)} has no table row for {missing}"


def _nav_files(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [f for v in nav.values() for f in _nav_files(v)]
    return [f for v in nav for f in _nav_files(v)]


def test_every_page_is_in_the_navigation():
    config = yaml.safe_load(_read("mkdocs.yml"))
    nav = _nav_files(config["nav"])
    pages = sorted(f for f in os.listdir(DOCS) if f.endswith(".md"))
    assert not set(pages) - set(nav), f"add {sorted(set(pages) - set(nav))} to mkdocs.yml's nav"
    assert all(os.path.exists(os.path.join(DOCS, f)) for f in nav), nav
