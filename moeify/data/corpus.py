"""Built-in training text that needs no download, taken from the Python that runs moeify.

- `builtin:python-docstrings`: the standard library's docstrings (about 600 texts; the CPU demo recipe uses it).
- `builtin:python-stdlib`: the standard library's own source files, one document each (code, comments and
  docstrings), and the language reference topics `help()` shows (`pydoc_data`, English prose): on CPython 3.11,
  639 documents, 11 M characters, 3.2 M Gemma 3 tokens (the docstrings: 95 k), and more varied.

Each corpus is the same on every machine with the same Python: sources and modules are taken in a fixed order.
"""

from __future__ import annotations

import importlib
import inspect
import sysconfig
import warnings
from pathlib import Path

BUILTIN_PREFIX = "builtin:"
# Pure-Python modules with long, well-written docstrings, importable everywhere without side effects.
MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools", "gettext",
    "glob", "gzip", "heapq", "hashlib", "html", "http.client", "http.server", "imaplib", "inspect", "ipaddress",
    "itertools", "json", "logging", "mailbox", "math", "mimetypes", "operator", "optparse", "os", "pathlib",
    "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "shlex", "shutil", "smtplib", "socket",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "traceback", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "xml.dom.minidom", "zipfile",
)  # fmt: skip


def python_docstrings(min_chars: int = 200) -> list[str]:
    """Docstrings of `MODULES` and their public classes, functions and methods, each at least `min_chars` long."""
    seen: set[str] = set()
    texts: list[str] = []

    def add(obj: object) -> None:
        doc = inspect.getdoc(obj)
        if doc and len(doc) >= min_chars and doc not in seen:
            seen.add(doc)
            texts.append(doc)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:  # a module missing from this build of Python
                continue
            add(module)
            for attr, value in sorted(vars(module).items()):
                if attr.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                    continue
                add(value)
                if inspect.isclass(value):
                    for _, member in sorted(vars(value).items()):
                        if inspect.isfunction(member):
                            add(member)
    return texts


# Folders of the standard library left out of `python_stdlib`: test suites (generated and repetitive data), the IDLE
# and turtle demos, Tk bindings, bundled wheels, and installed packages (not part of Python).
_SKIPPED_FOLDERS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "turtledemo", "tkinter", "ensurepip", "lib2to3", "site-packages"}
)


def python_stdlib() -> list[str]:
    """The language reference topics of `pydoc_data`, then every standard-library source file outside
    `_SKIPPED_FOLDERS`, sorted by path, each file one document."""
    from pydoc_data.topics import topics

    texts = [topics[key] for key in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if _SKIPPED_FOLDERS.isdisjoint(path.relative_to(root).parts[:-1]):
            text = path.read_text(encoding="utf-8", errors="replace").strip()
            if text:
                texts.append(text)
    return texts


def builtin_corpus(name: str) -> list[str]:
    """The texts of a built-in corpus, by the name after `builtin:`."""
    corpora = {"python-docstrings": python_docstrings, "python-stdlib": python_stdlib}
    if name not in corpora:
        from ..errors import MoeifyError

        raise MoeifyError(f"data.path builtin:{name}: no such built-in corpus; built in: {', '.join(corpora)}.")
    return corpora[name]()
