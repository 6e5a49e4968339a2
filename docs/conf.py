"""Sphinx configuration of fastnet's documentation.

Build it from the repository's root (warnings are errors)::

    python3 -m sphinx -W --keep-going -b html docs docs/_build/html

No network access is needed: the theme is Sphinx's own and nothing is
fetched (no intersphinx).
"""
import contextlib
import importlib
import inspect
import io
import os
import pathlib
import sys

from docutils import nodes
from docutils.parsers.rst import Directive

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The reference is read from the pure-Python twins of the kernels: the same
# API as the compiled set, with Python signatures and source links, and no
# compiled build needed to produce the docs.
os.environ["FASTNET_PURE"] = "1"

import fastnet  # noqa: E402

project = "fastnet"
author = "fastnet developers"
copyright = "fastnet developers"
version = release = fastnet.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.viewcode"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_theme_options = {"description": "fast, safe message transport for Python",
                      "fixed_sidebar": True}
html_static_path = []
templates_path = []
pygments_style = "sphinx"

autodoc_member_order = "bysource"

# Every cross-reference must resolve; only the standard library, which is
# not linked (no intersphinx), is exempt.
nitpicky = True
_STDLIB = ("builtins", "socketserver", "multiprocessing", "socket", "ssl", "concurrent",
           "threading", "wsgiref", "collections", "io", "os", "select", "signal", "xmlrpc")
# Type hints also name numpy's types and typing-only helpers, imported under
# ``if TYPE_CHECKING:`` (``Buffer`` is the buffer protocol); none is linked.
_TYPING = ("typing", "typing_extensions", "_typeshed", "types", "numpy", "npt")
_TYPING_ONLY = ("Buffer", "WSGIApplication", "WSGIEnvironment", "StartResponse", "OptExcInfo",
                "Address", "Self")
nitpick_ignore_regex = [
    (r"py:.*", r"(%s)(\..*)?" % "|".join(_STDLIB + _TYPING)),
    (r"py:.*", r"(%s)" % "|".join(_TYPING_ONLY)),
    # private names (type variables, aliases, helper classes) are not documented
    (r"py:.*", r"_\w+"),
    (r"py:.*", r"fastnet\.(\w+\.)*_\w+(\.\w+)*"),
]
# Private classes that the public ones build on; they are not documented.
nitpick_ignore = [
    ("py:class", "fastnet._pure.framing.Channel"),
]


class FastnetHelp(Directive):
    """``.. fastnet-help:: [SUBCOMMAND]``: the ``--help`` text of the fastnet command."""

    optional_arguments = 1

    def run(self):
        from fastnet import cli

        argv = list(self.arguments) + ["--help"]
        out = io.StringIO()
        old = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "88"
        try:
            with contextlib.redirect_stdout(out):
                try:
                    cli.main(argv)
                except SystemExit:
                    pass
        finally:
            if old is None:
                del os.environ["COLUMNS"]
            else:
                os.environ["COLUMNS"] = old
        text = out.getvalue().rstrip()
        if not text:
            raise self.error(f"`fastnet {' '.join(argv)}` printed nothing")
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def _drop_type_docstrings(app, what, name, obj, options, lines):
    """A constant without a ``#:`` comment shows its value, not its type's docstring."""
    if what not in ("data", "attribute") or callable(obj) or isinstance(obj, property):
        return
    own = inspect.getdoc(type(obj))
    if own and lines and lines[0].strip() == own.splitlines()[0].strip():
        del lines[:]


def _lookup(name):
    """The object a dotted name reaches by import and attribute access, or None."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for part in parts[i:]:
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj
    return None


def _documented_names(env):
    """``id(object) -> documented name`` for the classes, functions and methods documented."""
    table = getattr(env, "_fastnet_documented", None)
    if table is None:
        table = {}
        for name in sorted(env.get_domain("py").objects):
            obj = _lookup(name)
            if obj is not None and (callable(obj) or isinstance(obj, property)):
                table.setdefault(id(obj), (name, obj))
        env._fastnet_documented = table
    return table


def _resolve_by_identity(app, env, node, contnode):
    """Resolve a Python reference to the place its object is documented.

    ``fastnet.Listener`` is ``fastnet.connection.Listener``, and a name a
    module imported (``TLSTransport`` in :mod:`fastnet.loop`) is the object
    documented where it is defined.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    module = node.get("py:module")
    cls = node.get("py:class")
    candidates = [target]
    if module and cls:
        candidates.append(f"{module}.{cls}.{target}")
    if module:
        candidates.append(f"{module}.{target}")
    table = _documented_names(env)
    for candidate in candidates:
        if not candidate.startswith("fastnet"):
            continue
        obj = _lookup(candidate)
        entry = table.get(id(obj)) if obj is not None else None
        if entry is not None and entry[1] is obj and entry[0] != target:
            return env.get_domain("py").resolve_xref(env, node["refdoc"], app.builder,
                                                     node["reftype"], entry[0], node, contnode)
    return None


def _distributed_installed():
    try:
        import distributed  # noqa: F401
    except ImportError:
        return False
    return True


# Pages generated from a module that imports an optional dependency.
_OPTIONAL = {"api/dask": ("fastnet.dask", _distributed_installed, "distributed",
                          "pip install 'fastnet[dask]'")}


def _without_optional_dependency(app, docname, source):
    """A page whose module cannot be imported here keeps its title and says why it has no reference.

    The build stays free of warnings where the dependency is missing; the
    reference appears wherever it is installed.
    """
    entry = _OPTIONAL.get(docname)
    if entry is None:
        return
    module, installed, dependency, install = entry
    if installed():
        return
    title = source[0].split(".. automodule::", 1)[0]
    source[0] = (f"{title}.. module:: {module}\n\n"
                 f"This build had no ``{dependency}`` to import :mod:`{module}` with, so its reference "
                 f"is missing here: ``{install}`` and build the documentation again.\n")


def setup(app):
    app.add_directive("fastnet-help", FastnetHelp)
    app.connect("source-read", _without_optional_dependency)
    app.connect("missing-reference", _resolve_by_identity)
    app.connect("autodoc-process-docstring", _drop_type_docstrings)
    return {"parallel_read_safe": True}
