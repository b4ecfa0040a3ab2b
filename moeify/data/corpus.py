"""Built-in training text that needs no download: the Python standard library's own docstrings.

`data.path: builtin:python-docstrings` in a recipe uses it (the CPU demo recipe does). The corpus is the same on
every machine with the same Python: modules are taken in a fixed order and each docstring once.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

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


def builtin_corpus(name: str) -> list[str]:
    """The texts of a built-in corpus, by the name after `builtin:`."""
    corpora = {"python-docstrings": python_docstrings}
    if name not in corpora:
        from ..errors import MoeifyError

        raise MoeifyError(f"data.path builtin:{name}: no such built-in corpus; built in: {', '.join(corpora)}.")
    return corpora[name]()
