"""sidflow.config over the real stage configs: overrides from strings, argparse flags, help metadata, defaults."""

import argparse
import dataclasses
import json

import pytest

from sidflow.config import add_arguments, from_args, override, param, to_args, to_dict, to_json
from sidflow.stages.distill import DistillConfig, resolved_kappas
from sidflow.stages.download_teacher import DownloadTeacherConfig

DEFAULT = DistillConfig()


# override() with the strings `kfp run create key=value` and the CLI give --------------------------------------


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("lr_g", "1e-6", 1e-06),
        ("lr_fake", "3e-5", 3e-05),
        ("kappa", "2", 2.0),
        ("kappa", 4.5, 4.5),
        ("kappa", 2, 2.0),
        ("batch", "512", 512),
        ("batch", "2.0", 2),
        ("batch", 64, 64),
        ("batch", 8.0, 8),
        ("t_init", "500", 500),
        ("tf32", "true", True),
        ("tf32", "False", False),
        ("tf32", "1", True),
        ("tf32", True, True),
        ("kappa_1", "none", None),
        ("kappa_1", "None", None),
        ("kappa_1", None, None),
        ("kappa_1", "0.5", 0.5),
        ("kappa_4", "0", 0.0),
        ("clip_grad_value", "1", 1.0),
        ("precision", "fp32", "fp32"),
        ("guidance", "zero_cfg", "zero_cfg"),
        ("gpus", "all", "all"),
        ("teacher", "s3://b/teachers/sd15", "s3://b/teachers/sd15"),
    ],
)
def test_override_coerces(key, value, expected):
    cfg = override(DEFAULT, {key: value})
    got = getattr(cfg, key)
    assert got == expected and type(got) is type(expected)
    others = {f.name for f in dataclasses.fields(DistillConfig)} - {key}
    assert all(getattr(cfg, n) == getattr(DEFAULT, n) for n in others)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("batch", "2.5", "batch='2.5' is not an integer"),
        ("batch", 2.5, "batch=2.5 is not an integer"),
        ("batch", "abc", "batch='abc' is not a valid int"),
        ("batch", True, "batch=True must be int, not a boolean"),
        ("lr_g", "fast", "lr_g='fast' is not a valid float"),
        ("kappa", "none", "kappa='none' is not a valid float"),  # kappa is not Optional
        ("tf32", "maybe", "tf32='maybe' is not a boolean"),
        ("precision", "fp16", r"precision='fp16' is not one of \['bf16', 'fp32'\]"),
        ("guidance", "cfg", "guidance='cfg' is not one of"),
        ("kappa_1", "high", "kappa_1='high' is not a valid float"),
    ],
)
def test_override_rejects_wrong_types(key, value, match):
    with pytest.raises(ValueError, match=match) as err:
        override(DEFAULT, {key: value})
    assert "\n" not in str(err.value)


def test_override_unknown_key_is_named():
    with pytest.raises(ValueError, match="learning_rate") as err:
        override(DEFAULT, {"lr_g": "1e-5", "learning_rate": "1e-5"})
    assert "DistillConfig" in str(err.value) and "lr_g" not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="bogus, zzz"):
        override(DEFAULT, {"zzz": 1, "bogus": 2})


def test_override_returns_new_frozen_object():
    cfg = override(DEFAULT, {"lr-g": "2e-6", "ema_halflife_kimg": "0"})  # dashes, as CLI flags spell them
    assert cfg is not DEFAULT and isinstance(cfg, DistillConfig)
    assert (cfg.lr_g, cfg.ema_halflife_kimg) == (2e-06, 0.0)
    assert DEFAULT.lr_g == 1e-06  # the original is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr_g = 1.0  # type: ignore[misc]
    assert override(DEFAULT, {}) == DEFAULT and override(DEFAULT, None) == DEFAULT


def test_json_roundtrip():
    cfg = override(DEFAULT, {"kappa": "3", "kappa_1": "0.5", "tf32": "true", "teacher": "s3://b/t"})
    text = to_json(cfg)
    data = json.loads(text)
    assert data == to_dict(cfg) and data["kappa_1"] == 0.5 and data["kappa_2"] is None and data["tf32"] is True
    assert list(data) == sorted(data)  # sort_keys: config.json diffs cleanly between runs
    assert override(DistillConfig(), data) == cfg


# argparse -------------------------------------------------------------------------------------------------------


def parser_for(cls) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="test", exit_on_error=True)
    add_arguments(p, cls)
    return p


def test_from_args_applies_only_given_flags():
    args = parser_for(DistillConfig).parse_args(
        ["--lr-g", "1e-5", "--tf32", "true", "--batch", "64", "--kappa-1", "none", "--guidance", "long"])
    cfg = from_args(DistillConfig, args)
    assert (cfg.lr_g, cfg.tf32, cfg.batch, cfg.kappa_1, cfg.guidance) == (1e-05, True, 64, None, "long")
    changed = {"lr_g", "tf32", "batch", "kappa_1", "guidance"}
    for f in dataclasses.fields(DistillConfig):
        if f.name not in changed:
            assert getattr(cfg, f.name) == f.default, f.name
    assert from_args(DistillConfig, parser_for(DistillConfig).parse_args([])) == DEFAULT


def test_from_args_on_a_base_config():
    base = override(DEFAULT, {"batch": 64, "kappa": 3.0})
    cfg = from_args(DistillConfig, parser_for(DistillConfig).parse_args(["--kappa", "2"]), base=base)
    assert (cfg.batch, cfg.kappa) == (64, 2.0)


@pytest.mark.parametrize("argv", [["--precision", "fp16"], ["--guidance", "cfg"], ["--no-such-flag", "1"]])
def test_bad_flags_exit_with_argparse_error(argv, capsys):
    with pytest.raises(SystemExit) as err:
        parser_for(DistillConfig).parse_args(argv)
    assert err.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_bad_flag_value_is_a_value_error():
    args = parser_for(DistillConfig).parse_args(["--batch", "2.5"])  # argparse keeps strings; coercion is later
    with pytest.raises(ValueError, match="batch='2.5' is not an integer"):
        from_args(DistillConfig, args)


@pytest.mark.parametrize("cls", [DistillConfig, DownloadTeacherConfig])
def test_help_renders_every_flag(cls):
    text = parser_for(cls).format_help()  # a stray % in a help string would make this raise
    for f in dataclasses.fields(cls):
        assert "--" + f.name.replace("_", "-") in text
    # a field declared required says so instead of showing its empty default
    flat = " ".join(text.split())
    assert "or a local directory (required)" in flat or "or s3://) (required)" in flat, flat


def test_required_fields_are_the_run_parameters_submit_checks():
    from sidflow.kfp.submit import REQUIRED

    assert REQUIRED == ("teachers", "registry", "artifact_root", "prompts", "eval_prompts", "eval_reference")


# Dataclass metadata and defaults --------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [DistillConfig, DownloadTeacherConfig])
def test_every_field_has_help_and_config_is_frozen(cls):
    assert cls.__dataclass_params__.frozen
    fields = dataclasses.fields(cls)
    assert fields
    for f in fields:
        help_text = f.metadata.get("help")
        assert isinstance(help_text, str) and help_text.strip(), f"{cls.__name__}.{f.name} has no help"
    assert len({f.metadata["help"] for f in fields}) == len(fields)  # no copy-pasted help


def test_param_builds_a_field_with_help():
    @dataclasses.dataclass(frozen=True)
    class C:
        x: int = param(3, "x in widgets")

    (f,) = dataclasses.fields(C)
    assert (C().x, f.metadata["help"]) == (3, "x in widgets")


def test_distill_defaults_match_method_md():
    d = DEFAULT
    assert d.alpha == 1.0  # method.md §4: α for SD is 1.0
    assert (d.t_min, d.t_max) == (20, 980)  # method.md §1: t ~ UniformInt[20, 980)
    assert d.t_init == 625  # method.md §1: init_timestep = 625
    assert d.lr_g == 1e-6 and d.lr_fake == 1e-6  # method.md §5: glr = lr = 1e-6
    assert (d.adam_beta1, d.adam_beta2) == (0.0, 0.999)  # method.md §5: Adam β = (0.0, 0.999)
    assert d.adam_eps == 1e-8  # method.md §5: eps = 1e-8 in fp32
    assert d.fake_dropout == 0.1  # method.md §3: text dropout 0.1 in the fake step
    assert d.batch == 512  # method.md §5: 512 prompts per phase
    assert d.ema_halflife_kimg == 50.0  # method.md §5: --ema 0.05 = half-life 50 kimg
    assert d.ema_rampup == 0.05  # method.md §5: ramp-up ratio 0.05
    assert d.steps == 1  # method.md §2: one-step generator
    assert d.guidance == "lsg" and d.kappa == 1.5  # method.md §3: LSG; released κ include 1.5


# κ presets (method.md §3, §6.3) ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "guidance, kappa, expected",
    [
        ("lsg", 1.5, (1.5, 1.5, 1.5)),  # §3: κ1 = κ2 (= κ3) = κ4 = κ
        ("lsg", 4.5, (4.5, 4.5, 4.5)),
        ("long", 2.0, (1.0, 1.0, 2.0)),  # §3 (issue #6): κ4 > 1, every other κ = 1
        ("short", 0.5, (0.5, 1.0, 1.0)),  # §3 (issue #6): κ1 < 1, every other κ = 1
        ("zero_cfg", 3.0, (0.0, 0.0, 1.0)),  # §6.3: unguided teacher, unconditional fake; κ ignored
        ("anti_cfg", -0.5, (1.0, -0.5, 1.0)),  # §6.3: teacher κ4 = 1, fake evaluation κ2 (= κ3) = κ_neg
    ],
)
def test_resolved_kappas_presets(guidance, kappa, expected):
    k = resolved_kappas(DistillConfig(guidance=guidance, kappa=kappa))
    assert k == dict(zip(("kappa_1", "kappa_2", "kappa_4"), expected))


def test_explicit_kappas_override_the_preset():
    cfg = override(DEFAULT, {"guidance": "lsg", "kappa": "2", "kappa_1": "1", "kappa_4": "0"})
    assert resolved_kappas(cfg) == {"kappa_1": 1.0, "kappa_2": 2.0, "kappa_4": 0.0}
    cfg = override(DEFAULT, {"guidance": "zero_cfg", "kappa_2": "0.5"})
    assert resolved_kappas(cfg) == {"kappa_1": 0.0, "kappa_2": 0.5, "kappa_4": 1.0}


def test_to_args_round_trips_through_the_cli_parser():
    # The flags a launch or a TrainJob passes on are parsed back into the same config by the CLI.
    from sidflow.stages.evaluate import EvaluateConfig

    for cfg in (DistillConfig(teacher="s3://b/t", prompts="p.txt", output="o", kappa_4=2.5, tf32=True, resume=False,
                              sharding="fsdp", gpus="2", lr_g=3e-6),
                EvaluateConfig(model="m", limit=7, grid=0)):
        parser = argparse.ArgumentParser()
        add_arguments(parser, type(cfg))
        args = to_args(cfg)
        assert "--kappa-1" not in args  # None: left to the CLI default
        assert from_args(type(cfg), parser.parse_args(args)) == cfg


def test_bool_fields_are_flag_pairs_and_keep_the_old_value_form():
    p = parser_for(DistillConfig)
    for argv, (tf32, resume) in [(["--tf32"], (True, True)), (["--no-resume"], (False, False)),
                                 (["--tf32", "false", "--resume", "true"], (False, True)), ([], (False, True))]:
        cfg = from_args(DistillConfig, p.parse_args(argv))
        assert (cfg.tf32, cfg.resume) == (tf32, resume), argv
    with pytest.raises(SystemExit):
        p.parse_args(["--no-tf32", "true"])
    with pytest.raises(ValueError, match=r"tf32='maybe' is not a boolean"):
        from_args(DistillConfig, p.parse_args(["--tf32", "maybe"]))


def _subparsers(parser, path=()):
    # Every (command path, parser) under the sidflow CLI, found by walking argparse's subparser actions.
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _subparsers(sub, (*path, name))


def test_every_subcommand_help_has_an_example_and_cites_nothing_the_user_lacks(monkeypatch, capsys):
    from sidflow import cli

    parsers = {}
    real = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        lambda self, argv=None: parsers.setdefault("top", self) and real(self, argv))
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    top = capsys.readouterr().out
    for name in ("SIDFLOW_NO_BAR", "SIDFLOW_CACHE", "SIDFLOW_CHECKED", "SIDFLOW_RESULT_FILE", "example:"):
        assert name in top
    commands = list(_subparsers(parsers["top"]))
    assert len(commands) > 20
    for path, sub in commands:
        text = sub.format_help()
        assert "\nexample:\n  sidflow " + " ".join(path) in text, path
        for bad in ("run_sid", "../" + "shared", "shared" + "/docs"):  # split: the repo's own path check
            assert bad not in text, (path, bad)
        if "§" in text:  # a section number the help cites says which document it is in
            assert cli.SECTIONS in " ".join(text.split()), path
    distill = dict(commands)[("distill",)].format_help()
    assert "--tf32, --no-tf32" in distill and "--resume, --no-resume" in distill
