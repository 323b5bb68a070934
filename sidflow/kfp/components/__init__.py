"""One thin KFP component per sidflow stage; each body calls sidflow.stages.<stage>.run(cfg)."""
