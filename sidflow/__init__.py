"""sidflow: Score identity Distillation of text-to-image diffusion teachers, as a Kubeflow pipeline."""

__version__ = "0.1.0"
