"""Imports point down: the layers contract and no circle anywhere (pyproject.toml [tool.importlinter]), and the same
for the benchmark scripts, which import each other by file name."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_the_package_holds_its_layers_and_has_no_import_circle():
    out = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout


def test_benchmark_scripts_have_no_import_circle():
    scripts = {p.stem: p for p in (ROOT / "benchmarks").glob("*.py")}
    imports = {name: {n.module if isinstance(n, ast.ImportFrom) else a.name
                      for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))
                      for a in (n.names if isinstance(n, ast.Import) else [n])} & set(scripts)
               for name, path in scripts.items()}

    def reaches(start: str, goal: str, seen: set) -> bool:
        return any(m == goal or (m not in seen and reaches(m, goal, seen | {m})) for m in imports[start])

    assert [s for s in scripts if reaches(s, s, set())] == []
