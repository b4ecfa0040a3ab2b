"""The examples users copy from keep working (run on a tiny model, as users would run them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_upcycle_then_load_with_remote_code(tiny_root: Path, tmp_path: Path) -> None:
    from tiny_models import dense_model

    out = tmp_path / "moe"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    first = subprocess.run(
        [sys.executable, str(EXAMPLES / "upcycle_and_generate.py"), str(dense_model("gemma3", tiny_root)), str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert first.returncode == 0, first.stderr
    assert "Wrote" in first.stdout and "Gemma 3 -> MoeifyForCausalLM" in first.stdout

    # The remote-code example must work where moeify cannot be imported.
    code = (
        f"import sys, runpy; sys.modules['moeify'] = None; sys.argv = ['x', {str(out)!r}]; "
        f"runpy.run_path({str(EXAMPLES / 'load_remote_code.py')!r}, run_name='__main__')"
    )
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith("MoeifyForCausalLM")
