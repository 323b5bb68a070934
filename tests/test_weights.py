"""Air-gapped evaluation: `sidflow data stage-weights` copies the evaluator's two weight files to a URI once (here
from a loopback stand-in of the hub and of the Inception URL: no download), evaluate takes their URIs, and a tag that
would need the hub under HF_HUB_OFFLINE fails in one line before anything loads."""

import json

import pytest

from sidflow import storage
from sidflow.cli import main
from sidflow.evaluate.clipscore import check_openclip
from sidflow.evaluate.weights import StageWeightsConfig, stage

CLIP_REPO = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"  # open_clip's pretrained.py: _VITg14["laion2b_s12b_b42k"]


def test_stage_weights_copies_both_files_and_evaluate_takes_them(hub, s3_bucket, capsys):
    clip_bytes, inception_bytes = b"stand-in for open_clip_pytorch_model.bin", b"stand-in for the TorchScript"
    hub.commit(CLIP_REPO, {"open_clip_pytorch_model.bin": clip_bytes, "README.md": b"# ViT-g-14\n"})
    hub.commit("cdn/metrics", {"inception-2015-12-05.pt": inception_bytes})
    dest = s3_bucket + "/weights"
    url = f"{hub.url}/cdn/metrics/resolve/main/inception-2015-12-05.pt"
    assert main(["data", "stage-weights", "--dest", dest, "--inception-url", url]) == 0
    staged = json.loads(capsys.readouterr().out)
    assert staged == {"clip_weights": f"{dest}/ViT-g-14-laion2b_s12b_b42k/open_clip_pytorch_model.bin",
                      "inception_weights": f"{dest}/inception-2015-12-05.pt"}
    assert storage.read_bytes(staged["clip_weights"]) == clip_bytes
    assert storage.read_bytes(staged["inception_weights"]) == inception_bytes
    check_openclip("ViT-g-14", staged["clip_weights"])  # a URI: evaluate reads it, no hub involved


def test_stage_weights_refuses_bad_inputs_before_downloading(tmp_path):
    for change, match in [(dict(dest=""), "dest is empty"), (dict(clip_model="ViT-nope"), "not an OpenCLIP arch"),
                          (dict(clip_weights="nope"), "'nope' is not a pretrained tag of ViT-g-14")]:
        with pytest.raises(ValueError, match=match) as err:
            stage(StageWeightsConfig(**{"dest": str(tmp_path / "w"), **change}))
        assert "\n" not in str(err.value)
    assert not (tmp_path / "w").exists()


def test_offline_tag_without_a_cached_copy_is_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE forbids its download: stage it once with `sidflow "
                                                "data stage-weights`") as err:
        check_openclip("ViT-g-14", "laion2b_s12b_b42k")
    assert "\n" not in str(err.value)

    # A copy in the cache (open_clip's safetensors name first) is what open_clip then loads offline: accepted.
    snap = tmp_path / "hub" / ("models--" + CLIP_REPO.replace("/", "--"))
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("a" * 40)
    (snap / "snapshots" / ("a" * 40)).mkdir(parents=True)
    (snap / "snapshots" / ("a" * 40) / "open_clip_model.safetensors").write_bytes(b"stand-in")
    check_openclip("ViT-g-14", "laion2b_s12b_b42k")
