"""No tracked file refers to a path outside the repository: a clone has only what is in it."""

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Pieces joined at run time, so this file does not match itself.
NOTES = re.compile(r"\.\./" + "shared|" + "shared" + "/docs")  # the team's notes beside the checkout
MACHINE = re.compile("|".join([                     # paths of the machines the project was built and measured on
    r"(?<![\w.~$-])/" + r"work/",
    r"(?<![\w.~$-])/" + r"(?:home|Users)/[A-Za-z]",  # someone's home directory
    r"(?<![\w.~$-])/" + r"root/",
    r"~/(?!\.)",                                    # home-relative (not ~/.cache-style tool defaults)
]))
# A Dockerfile's paths are the image's own filesystem (WORKDIR /home/sidflow), not this machine's.
IMAGE_FILES = ("containers/",)


def _tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [REPO / name for name in out.decode().split("\0") if name]


def outside_references(text: str, image: bool = False) -> list[str]:
    """Return the lines of `text` that name a path outside the repository (`image`: a container file, whose
    absolute paths are inside its image)."""
    return [line.strip() for line in text.splitlines()
            if NOTES.search(line) or (not image and MACHINE.search(line))]


def test_the_pattern_finds_what_it_should_and_leaves_urls_alone():
    bad = ["see ../" + "sha" + "red/" + "docs/method.md", '"out": "/' + 'work/main/benchmarks"',
           "/" + "home/alice/x.py", "cp /" + "root/.cache/x y", "ls ~/" + "data"]
    good = ["https://example.com/work/x", "s3://bucket/work/x", "docs/method.md", "~/.cache/huggingface",
            "/tmp/x", "a/home/b"]
    assert [line for line in bad if not outside_references(line)] == []
    assert [line for line in good if outside_references(line)] == []
    assert outside_references("WORKDIR /" + "home/sidflow", image=True) == []
    assert outside_references("COPY ../" + "shared/x .", image=True) != []


def test_no_tracked_file_names_a_path_outside_the_repo():
    found = []
    for path in _tracked():
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary: images, weights
            continue
        name = path.relative_to(REPO).as_posix()
        if name == "tests/test_repo_paths.py":  # the patterns' own definitions and examples
            continue
        found += [f"{name}: {line[:160]}" for line in
                  outside_references(data.decode("utf-8", errors="replace"), name.startswith(IMAGE_FILES))]
    assert found == [], "\n".join(found)


# `method.md §4`, `evaluation.md §0`, and the sections listed after one: `(method.md §1, §3, §6.4)`.
CITATION = re.compile(r"\b(method|evaluation)\.md ((?:§\d+(?:\.\d+)?(?:, |\b))+)")


def sections(doc: str) -> set[str]:
    """The sections a docs/ page defines: `## §N` headings and `- §N.M:` items."""
    found = set(re.findall(r"^#+ §(\d+)\b", doc, flags=re.M))
    return found | set(re.findall(r"^\s*[-*] §(\d+\.\d+):", doc, flags=re.M))


def test_every_cited_section_of_the_docs_exists():
    defined = {name: sections((REPO / "docs" / f"{name}.md").read_text()) for name in ("method", "evaluation")}
    dangling = []
    for path in _tracked():
        if path.suffix not in (".py", ".md", ".yaml", ".txt", ".toml") or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for doc, cited in CITATION.findall(line):
                dangling += [f"{path.relative_to(REPO)}:{number}: {doc}.md §{s}"
                             for s in re.findall(r"§(\d+(?:\.\d+)?)", cited) if s not in defined[doc]]
    assert not dangling, "\n".join(dangling)
