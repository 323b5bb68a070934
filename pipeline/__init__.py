"""The sid-distill Kubeflow pipeline (sid_distill.py), its compile and local-run helpers (compile.py)."""
