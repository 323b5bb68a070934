"""Compile the sid-distill pipeline to IR YAML, or run it on this machine with kfp.local.

    python -m sidflow.kfp.compile [--out sidflow/kfp/sid_distill.yaml]   (also `sidflow pipeline compile --out …`)
"""

import argparse
from pathlib import Path

DEFAULT_OUT = str(Path(__file__).with_name("sid_distill.yaml"))


def compile(path: str = DEFAULT_OUT, max_parallel: int | None = None) -> str:
    """Compile the sid-distill pipeline to `path` (IR YAML: pipeline spec + kubernetes platform spec); return path.
    `max_parallel` bounds the teachers distilled at once (default sid_distill.MAX_PARALLEL)."""
    from kfp import compiler

    from sidflow.kfp import sid_distill

    pipeline = sid_distill.build(max_parallel or sid_distill.MAX_PARALLEL)
    try:
        compiler.Compiler().compile(pipeline, package_path=path)
    finally:
        sid_distill.build()  # the module's pipeline keeps its defaults
    return path


def run_local(pipeline_root: str, **arguments):
    """Run the whole pipeline here with kfp.local (SubprocessRunner in this interpreter; pod settings ignored)."""
    from kfp import local

    from sidflow.kfp.sid_distill import sid_distill

    unknown = sorted(set(arguments) - set(sid_distill.component_spec.inputs))
    if unknown:
        raise ValueError(f"unknown sid-distill parameter(s): {', '.join(unknown)}")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root, raise_on_error=True)
    return sid_distill(**arguments)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--max-parallel", type=int, help="teachers distilled at once (default 1)")
    args = parser.parse_args()
    print(compile(args.out, args.max_parallel))
