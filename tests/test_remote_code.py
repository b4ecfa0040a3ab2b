"""The code saved beside a moeify-format model is the model definition only: what a person reads before running
`trust_remote_code=True` must be short and inert, and the format's version travels in config.json.

Each saved file may import only the standard library, torch, transformers and its sibling files, and may do nothing
at import but define (classes, functions, constants): no call at module level, no registration, no writes to
transformers' state. A config from a newer moeify is refused with what to upgrade.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

from moeify.convert.converter import convert
from moeify.convert.options import ConvertOptions
from moeify.modeling import MoeifyConfig
from moeify.modeling.configuration_moeify import FORMAT_VERSION

ALLOWED_ROOTS = set(sys.stdlib_module_names) | {"torch", "transformers"}
# Names whose call at module level would change state beyond the file's own definitions.
STATEFUL_CALLS = {"register", "register_for_auto_class", "setattr", "update", "setdefault", "append", "extend"}


@pytest.fixture(scope="module")
def moeify_output(tmp_path_factory: pytest.TempPathFactory, dense_llama: Path) -> Path:
    out = tmp_path_factory.mktemp("remote") / "moe"
    convert(str(dense_llama), out, ConvertOptions(num_experts=4, top_k=2, format="moeify"), progress=False)
    return out


def _imports(tree: ast.Module) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def _stateful_calls(tree: ast.Module) -> list[str]:
    """Calls that run at import: a bare call statement, or a call to a state-changing name inside a module-level
    assignment or `if` / `try` block (function and class bodies run later, or only define)."""
    bad = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                bad.append(ast.unparse(node))
            elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
                for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
                    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
                    if name in STATEFUL_CALLS:
                        bad.append(ast.unparse(node))
            elif isinstance(node, ast.If | ast.Try):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return bad


def test_saved_code_imports_only_stdlib_torch_transformers(moeify_output: Path) -> None:
    files = sorted(moeify_output.glob("*.py"))
    assert {f.name for f in files} == {"configuration_moeify.py", "modeling_moeify.py", "experts.py", "router.py"}
    siblings = {f.stem for f in files}
    for file in files:
        tree = ast.parse(file.read_text())
        for module, level in _imports(tree):
            if level:  # `from .router import ...`: a file saved beside it
                assert module.split(".")[0] in siblings, (file.name, module)
            else:
                assert module.split(".")[0] in ALLOWED_ROOTS, (file.name, module)
        assert "ctypes" not in file.read_text(), file.name
        assert "moeify." not in {m for m, _ in _imports(tree)}, file.name


def test_saved_code_only_defines_at_import(moeify_output: Path) -> None:
    for file in sorted(moeify_output.glob("*.py")):
        assert _stateful_calls(ast.parse(file.read_text())) == [], file.name


def test_checker_catches_a_registration() -> None:
    """The check above is not vacuous: the kernels' registration, at module level, is what it refuses."""
    tree = ast.parse("from transformers.integrations.moe import ExpertsInterface\nExpertsInterface.register('x', f)\n")
    assert _stateful_calls(tree) == ["ExpertsInterface.register('x', f)"]
    tree = ast.parse("try:\n    import ctypes\nexcept ImportError:\n    pass\nX = MAPPING.register('a', 1)\n")
    assert _stateful_calls(tree) == ["X = MAPPING.register('a', 1)"]


def test_config_carries_the_format_version(moeify_output: Path) -> None:
    saved = json.loads((moeify_output / "config.json").read_text())
    assert saved["moeify_format_version"] == FORMAT_VERSION


def test_newer_format_is_refused_with_what_to_upgrade(moeify_output: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig

    saved = json.loads((moeify_output / "config.json").read_text())
    saved["moeify_format_version"] = FORMAT_VERSION + 1
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"format version 2, written by a newer moeify.*Upgrade moeify"):
        AutoConfig.from_pretrained(tmp_path)
    del saved["moeify_format_version"]  # configs written before the key existed are version 1
    assert MoeifyConfig.from_dict(saved).moeify_format_version == 1
