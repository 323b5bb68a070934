"""Evaluation under the zero-shot COCO protocol (evaluation.md §0), one concern per module.

protocol.py   protocols (resize sides) and prompt sets: GigaGAN's captions.txt (md5), COCO annotations
resize.py     center crop + Lanczos, clean-fid's bicubic 299, GigaGAN's CLIP tensor round trip
features.py   FID features: clean-fid's TF-Inception TorchScript loaded from a URI
clipscore.py  GigaGAN's CLIP score with OpenCLIP (token-level "A photo depicts " prefix)
toy.py        the shapes evaluator as features (shapes-FID) and scorer (prompt accuracy)
sampling.py   images from an exported generator or a teacher (DDIM / DPM-Solver + CFG)
shards.py     the per-shard loop: generate, prepare on CPU threads, measure on the GPU
reference.py  `sidflow data ref-stats`: mu/sigma of real images, stored at a URI
report.py     per-image scores parquet, captioned grid, markdown row
fid.py        Fréchet distance without scipy.sqrtm
local.py      local copies of evaluator files at s3:// URIs
The stage itself (config, validation, sharding over processes, metrics.json) is sidflow/stages/evaluate.py.
"""
