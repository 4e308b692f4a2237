"""The ``"distclip"`` section of a DeepSpeed config, the version gate and the lazy import.

Single process. Everything here is decided before ``deepspeed.initialize`` runs, so the
checks that go through :func:`distclip.deepspeed.initialize` replace it with a function
that fails the test if it is reached.
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import distclip
import distclip.integrations.deepspeed as dsclip
from distclip.clippers import AutoClipConfig, LayerWiseConfig, NormClipConfig, ValueConfig
from distclip.integrations.deepspeed import _verified as _hooks
from distclip.integrations.deepspeed._config import config_from_arguments, load_deepspeed_config

SECTION = {"method": "autoclip", "q": 0.1, "window": 200, "max_norm": 5.0}

#: (section, exception type, words the message must contain)
BAD_SECTIONS: list[tuple[Any, type[Exception], tuple[str, ...]]] = [
    (["autoclip"], TypeError, ("must be a dict", "list")),
    ("autoclip", TypeError, ("must be a dict", "str")),
    (3, TypeError, ("must be a dict",)),
    ({"method": "autoclipp"}, ValueError, ("unknown clipping method", "'autoclipp'", "zclip")),
    ({"method": 1}, TypeError, ("method must be a string",)),
    ({"q": 1.5}, ValueError, ("q must be in [0, 1]",)),
    ({"q": "high"}, TypeError, ("q must be a real number",)),
    ({"window": 0}, ValueError, ("window",)),
    ({"window": 2.5}, TypeError, ("window",)),
    ({"max_norm": -1.0}, ValueError, ("max_norm",)),
    ({"method": "norm", "max_norm": 0}, ValueError, ("max_norm",)),
    ({"qq": 0.1}, TypeError, ("unknown option", "'qq'")),
    ({"method": "zclip", "alpha": 1.0}, ValueError, ("alpha",)),
    ({"nonfinite": "ignore"}, ValueError, ("nonfinite",)),
    ({"norm_type": 1.0}, ValueError, ("norm_type must be 2",)),
    ({"eps": 1e-8}, ValueError, ("eps must be 1e-06",)),
    ({"method": "layer_wise", "max_norm": 0.0}, ValueError, ("max_norm",)),
    ({"method": "layer_wise", "norm_type": 1.0}, ValueError, ("norm_type must be 2",)),
    ({"method": "agc", "clip_factor": -1.0}, ValueError, ("clip_factor",)),
    ({"method": "value", "clip_value": 0.0}, ValueError, ("clip_value",)),
    ({"method": "value", "norm_type": 1.0}, ValueError, ("norm_type must be 2",)),
]


def _ids(case: tuple[Any, type[Exception], tuple[str, ...]]) -> str:
    return f"{case[1].__name__}-{json.dumps(case[0])[:40]}"


# ------------------------------------------------------------------ the section
def test_section_read_like_clipped_optimizer() -> None:
    section = dsclip.parse_section(SECTION)
    assert section.method == "autoclip"
    assert section.present
    assert isinstance(section.config, AutoClipConfig)
    assert (section.config.q, section.config.window, section.config.max_norm) == (0.1, 200, 5.0)
    assert section.options == {"q": 0.1, "window": 200, "max_norm": 5.0}
    # The same options build the same configuration as the native wrapper's.
    native = distclip.ClippedOptimizer(torch.optim.SGD, "autoclip", q=0.1, window=200, max_norm=5.0)
    assert native._distclip_config == section.config


def test_missing_section_and_missing_method_mean_autoclip() -> None:
    missing = dsclip.parse_section(None)
    assert (missing.method, missing.present) == ("autoclip", False)
    assert missing.config == AutoClipConfig()
    no_method = dsclip.parse_section({"q": 0.2})
    assert no_method.method == "autoclip"
    assert no_method.config.q == 0.2  # type: ignore[attr-defined]
    norm = dsclip.parse_section({"method": "norm", "max_norm": 2})
    assert norm.config == NormClipConfig(max_norm=2.0)


def test_deepspeed_methods_are_every_method() -> None:
    assert set(dsclip.deepspeed_methods()) == {
        "norm",
        "autoclip",
        "auto_clip",
        "linear_stoch_norm",
        "quadratic_stoch_norm",
        "linear_stoch_autoclip",
        "quadratic_stoch_autoclip",
        "zclip",
        "value",
        "coordinate_wise",
        "layer_wise",
        "agc",
    }
    assert set(distclip.available_methods()) == set(dsclip.deepspeed_methods())
    for method in dsclip.deepspeed_methods():
        section = dsclip.parse_section({"method": method})
        assert section.method == method
        assert section.elementwise == (method in ("value", "coordinate_wise"))
        assert section.per_unit == (method in ("layer_wise", "agc"))


def test_per_unit_sections() -> None:
    """layer_wise and agc apply their own eps (AGC's is its 1e-3 weight floor)."""
    agc = dsclip.parse_section({"method": "agc", "clip_factor": 0.05})
    assert agc.per_unit
    assert not agc.elementwise
    assert agc.config.eps == 1e-3
    layer_wise = dsclip.parse_section({"method": "layer_wise", "max_norm": 2.0, "eps": 1e-8})
    assert layer_wise.config == LayerWiseConfig(max_norm=2.0, eps=1e-8)


def test_elementwise_sections() -> None:
    for method in ("value", "coordinate_wise"):
        section = dsclip.parse_section({"method": method, "clip_value": 0.25})
        assert section.config == ValueConfig(clip_value=0.25)
        assert section.elementwise
    # eps plays no part in a clamp (nor in DeepSpeed's clip, which is off for it).
    assert dsclip.parse_section({"method": "value", "eps": 1e-8}).config.eps == 1e-8


@pytest.mark.parametrize("case", BAD_SECTIONS, ids=_ids)
def test_bad_sections_fail_with_a_clear_error(
    case: tuple[Any, type[Exception], tuple[str, ...]],
) -> None:
    section, error, words = case
    with pytest.raises(error) as info:
        dsclip.parse_section(section)
    message = str(info.value)
    assert "'distclip' section" in message
    for word in words:
        assert word in message, (word, message)


# ------------------------------------------------------------- reading a config
def test_config_forms(tmp_path: Path) -> None:
    config = {"train_micro_batch_size_per_gpu": 2, "distclip": SECTION}
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    encoded = base64.urlsafe_b64encode(json.dumps(config).encode()).decode()
    for form in (config, str(path), path, encoded):
        assert load_deepspeed_config(form) == config
        assert dsclip.read_section(form).config == dsclip.parse_section(SECTION).config
    # hjson (DeepSpeed's reader) accepts comments; plain JSON is read either way.
    assert dsclip.read_section({"gradient_clipping": 1.0}).present is False


def test_unreadable_configs(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="config must be a dict"):
        load_deepspeed_config(3)
    with pytest.raises(ValueError, match="none of those"):
        load_deepspeed_config("no/such/file.json")
    not_object = tmp_path / "list.json"
    not_object.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        load_deepspeed_config(not_object)
    broken = tmp_path / "broken.json"
    broken.write_text('{"distclip": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_deepspeed_config(broken)


def test_config_found_where_deepspeed_looks() -> None:
    assert config_from_arguments({"config": {"a": 1}}) == {"a": 1}
    assert config_from_arguments({"config_params": "x.json"}) == "x.json"
    args = argparse.Namespace(deepspeed_config="ds.json")
    assert config_from_arguments({"args": args}) == "ds.json"
    assert config_from_arguments({"args": argparse.Namespace(deepscale_config="old.json")}) == (
        "old.json"
    )
    assert config_from_arguments({}) is None


# --------------------------------------------- initialize: refused before DeepSpeed
@pytest.fixture
def deepspeed_never_initialized(monkeypatch: pytest.MonkeyPatch) -> Any:
    """DeepSpeed, with ``deepspeed.initialize`` replaced by a tripwire."""
    deepspeed = pytest.importorskip("deepspeed")

    @functools.wraps(deepspeed.initialize)  # keeps the signature distclip binds against
    def tripwire(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("deepspeed.initialize ran although the configuration is invalid")

    monkeypatch.setattr(deepspeed, "initialize", tripwire)
    return deepspeed


@pytest.mark.parametrize("case", BAD_SECTIONS, ids=_ids)
def test_initialize_refuses_bad_sections_before_deepspeed_starts(
    deepspeed_never_initialized: Any,
    case: tuple[Any, type[Exception], tuple[str, ...]],
    tmp_path: Path,
) -> None:
    section, error, words = case
    config = {"train_micro_batch_size_per_gpu": 2, "distclip": section}
    model = torch.nn.Linear(2, 1)
    with pytest.raises(error, match="distclip") as info:
        dsclip.initialize(model=model, config=config)
    assert all(word in str(info.value) for word in words), str(info.value)
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(error, match="distclip"):
        dsclip.initialize(args=argparse.Namespace(deepspeed_config=str(path)), model=model)


def test_version_gate(deepspeed_never_initialized: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    deepspeed = deepspeed_never_initialized
    assert _hooks._is_verified(deepspeed.__version__)  # the pinned version is verified
    monkeypatch.setattr(deepspeed, "__version__", "0.20.1")
    monkeypatch.setattr(_hooks, "_warned_versions", set())
    model = torch.nn.Linear(2, 1)
    with pytest.raises(dsclip.DeepSpeedVersionError, match=r"0\.20\.1.*allow_unverified=True"):
        dsclip.initialize(model=model, config={"distclip": SECTION})
    with pytest.raises(dsclip.DeepSpeedVersionError):
        dsclip.attach(object())
    with (
        pytest.warns(RuntimeWarning, match=r"0\.20\.1"),
        pytest.raises(TypeError, match="DeepSpeedEngine"),
    ):
        dsclip.attach(object(), allow_unverified=True)
    # Warned once per version.
    with pytest.raises(TypeError, match="DeepSpeedEngine"):
        dsclip.attach(object(), allow_unverified=True)
    for version in ("0.19.0", "0.19.8", "0.19.10rc1"):
        assert _hooks._is_verified(version)
    for version in ("0.18.9", "0.20.0", "1.19.0", "unknown"):
        assert not _hooks._is_verified(version)


def test_supported_wrappers_listed() -> None:
    assert dsclip.SUPPORTED_WRAPPERS == (
        "DeepSpeedZeroOptimizer",
        "DeepSpeedZeroOptimizer_Stage3",
        "BF16_Optimizer",
        "FP16_Optimizer",
        "FP16_UnfusedOptimizer",
    )
    assert set(_hooks._WRAPPER_MODULES) == set(dsclip.SUPPORTED_WRAPPERS)


# ------------------------------------------------------------------ lazy import
def test_import_distclip_does_not_import_deepspeed() -> None:
    code = (
        "import sys, distclip, distclip.deepspeed\n"
        "assert distclip.deepspeed.initialize is not None\n"
        "assert distclip.deepspeed is sys.modules['distclip.deepspeed']\n"
        "import distclip.integrations.deepspeed\n"
        "loaded = sorted(m for m in sys.modules if m == 'deepspeed' or m.startswith('deepspeed.'))\n"
        "assert not loaded, loaded\n"
        "try:\n"
        "    distclip.no_such_attribute\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('distclip.no_such_attribute did not raise')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
