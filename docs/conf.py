"""Sphinx configuration for the streamnorm documentation.

Build with ``sphinx-build -W -b html docs docs/_build/html`` from the repository root.
"""

from __future__ import annotations

import os
import sys

# Document the source tree next to this directory, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import streamnorm  # noqa: E402

project = "streamnorm"
author = "the streamnorm developers"
copyright = "the streamnorm developers"
version = streamnorm.__version__
release = streamnorm.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
]

exclude_patterns = ["_build"]
root_doc = "index"
default_role = "code"

# -- autodoc / numpydoc ---------------------------------------------------------------
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "none"  # the numpydoc sections already give the types
autosummary_generate = False
# Members are listed by autodoc's :members: in api.rst; numpydoc would list them again.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# -- HTML -----------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"streamnorm {release}"
html_theme_options = {
    "navigation_depth": 2,
    "show_toc_level": 2,
}
html_static_path: list[str] = []


# -- docstring shapes -----------------------------------------------------------------
# Docstrings write shapes the way NumPy users read them: (N, C, *S), (*features).  In
# reStructuredText a bare "*" opens emphasis, so outside ``literals`` a star that starts
# a name ended by punctuation or by the end of the line is escaped before the page is
# built.  Emphasis such as *word* is left alone (the name is closed by another star).
import re  # noqa: E402

_SHAPE_STAR = re.compile(r"(?:(?<=[(\s,])|^)\*(?=[A-Za-z_]\w*(?:\s*[,);:]|\.(?:\s|$)|$))")
_LITERAL = re.compile(r"(``.+?``)")


def _escape_shape_stars(app, what, name, obj, options, lines):
    for i, line in enumerate(lines):
        if "*" not in line:
            continue
        parts = _LITERAL.split(line)
        # split() with one group puts the literals at the odd indices
        lines[i] = "".join(p if k % 2 else _SHAPE_STAR.sub(r"\\*", p) for k, p in enumerate(parts))


def setup(app):
    app.connect("autodoc-process-docstring", _escape_shape_stars)
