"""The Kubeflow side: one KFP component per stage (kfp/components/), the sid-distill pipeline, compile/run-local,
submit/schedule. The compiled pipeline, sid_distill.yaml, ships in the package (and in the repo) for UI upload."""
