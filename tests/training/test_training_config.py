"""training.config: presets, TOML round trip, typed --set overrides, validation errors."""

from __future__ import annotations

import pytest

from training.config import (
    PRESETS,
    Config,
    ConfigError,
    apply_overrides,
    load_config,
    resolve_config,
    to_dict,
    to_toml,
)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_resolve_and_round_trip_through_toml(preset, tmp_path):
    cfg = resolve_config(preset=preset)
    assert cfg.run.name == preset
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    again = load_config(path).validate()
    assert to_dict(again) == to_dict(cfg)
    assert again == cfg


def test_auto_preset_follows_cuda():
    assert resolve_config(preset="auto", cuda=False).run.name == "cpu"
    assert resolve_config(preset="auto", cuda=True).run.name == "gpu"


def test_defaults_are_the_cpu_preset():
    assert resolve_config(preset="cpu") == Config()


def test_overrides_are_typed():
    base = Config()
    cfg = apply_overrides(
        base,
        [
            "stage1.lr=1e-2",
            "data.patch_size=[64, 64, 32]",
            "stage2.gate=1",
            'run.name="x y"',
            "run.device=cpu",  # a bare word is a string
            "model.dropout=0.25",
            "run.compile=true",
        ],
    )
    assert cfg.stage1.lr == 1e-2
    assert cfg.data.patch_size == (64, 64, 32)
    assert cfg.stage2.gate == 1.0 and isinstance(cfg.stage2.gate, float)
    assert cfg.run.name == "x y" and cfg.run.device == "cpu"
    assert cfg.model.dropout == 0.25 and cfg.run.compile is True
    assert base == Config()  # the input is not modified


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("stage1.nope=1", "unknown config key 'stage1.nope'"),
        ("nosection.lr=1", "unknown config key"),
        ("stage1.max_epochs=2.5", "expected an integer"),
        ("run.compile=1", "expected true or false"),
        ("data.patch_size=7", "expected a list"),
        ("stage1.lr", "expected section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(Config(), [override])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("data.patch_size=[48, 48, 44]", "multiples of 8"),
        ("data.val_cases=0", "data.val_cases"),
        ("run.amp=fp8", "run.amp"),
        ("stage3.k_g=0", "k_d/k_g"),
    ],
)
def test_validation_rejects_inconsistent_values(override, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(preset="cpu", overrides=[override])


def test_toml_file_errors_are_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[stage1\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[stage1]\nlearning_rate = 1e-3\n")
    with pytest.raises(ConfigError, match="stage1.learning_rate"):
        load_config(unknown)


def test_amp_auto_is_bf16_on_cuda_and_on_cpus_with_native_bf16(monkeypatch):
    import torch

    import training.trainer as trainer_module
    from training.trainer import amp_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (True, False):
        monkeypatch.setattr(trainer_module, "cpu_has_native_bf16", lambda native=native: native)
        assert amp_dtype("auto", cpu) is (torch.bfloat16 if native else None)
        assert amp_dtype("auto", cuda) is torch.bfloat16
        assert amp_dtype("off", cpu) is None and amp_dtype("off", cuda) is None
        assert amp_dtype("bf16", cpu) is torch.bfloat16
        assert amp_dtype("fp16", cuda) is torch.float16
    monkeypatch.undo()
    # this machine's own answer comes from torch's CPU feature detection
    assert isinstance(trainer_module.cpu_has_native_bf16(), bool)
