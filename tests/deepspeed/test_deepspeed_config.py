"""The ``"distclip"`` section of a DeepSpeed config, the version gate and the lazy import.

Single process. Everything here is decided before ``deepspeed.initialize`` runs, so the
checks that go through :func:`distclip.deepspeed.initialize` replace it with a function
that fails the test if it is reached. The sections DeepSpeed's engines must refuse are
rows of the bad-input table (``tests/unit/test_bad_inputs.py``).
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import distclip
import distclip.deepspeed as dsclip
from tests.support import internals
from tests.support.internals import config_class

SECTION = {"method": "autoclip", "q": 0.1, "window": 200, "max_norm": 5.0}


# ------------------------------------------------------------------ the section
def test_section_read_like_clipped_optimizer() -> None:
    section = internals.parse_deepspeed_section(SECTION)
    assert section.method == "autoclip"
    assert section.present
    assert isinstance(section.config, config_class("autoclip"))
    assert (section.config.q, section.config.window, section.config.max_norm) == (0.1, 200, 5.0)
    assert section.options == {"q": 0.1, "window": 200, "max_norm": 5.0}
    # The same options build the same configuration as the native wrapper's.
    native = distclip.ClippedOptimizer(torch.optim.SGD, "autoclip", q=0.1, window=200, max_norm=5.0)
    assert internals.optimizer_config(native) == section.config


def test_missing_section_and_missing_method_mean_autoclip() -> None:
    missing = internals.parse_deepspeed_section(None)
    assert (missing.method, missing.present) == ("autoclip", False)
    assert missing.config == config_class("autoclip")()
    no_method = internals.parse_deepspeed_section({"q": 0.2})
    assert no_method.method == "autoclip"
    assert no_method.config.q == 0.2  # type: ignore[attr-defined]
    norm = internals.parse_deepspeed_section({"method": "norm", "max_norm": 2})
    assert norm.config == config_class("norm")(max_norm=2.0)


def test_deepspeed_methods_are_every_method() -> None:
    assert set(internals.deepspeed_methods()) == {
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
    assert set(distclip.available_methods()) == set(internals.deepspeed_methods())
    for method in internals.deepspeed_methods():
        section = internals.parse_deepspeed_section({"method": method})
        assert section.method == method
        assert section.elementwise == (method in ("value", "coordinate_wise"))
        assert section.per_unit == (method in ("layer_wise", "agc"))


def test_per_unit_sections() -> None:
    """layer_wise and agc apply their own eps (AGC's is its 1e-3 weight floor)."""
    agc = internals.parse_deepspeed_section({"method": "agc", "clip_factor": 0.05})
    assert agc.per_unit
    assert not agc.elementwise
    assert agc.config.eps == 1e-3
    layer_wise = internals.parse_deepspeed_section(
        {"method": "layer_wise", "max_norm": 2.0, "eps": 1e-8}
    )
    assert layer_wise.config == config_class("layer_wise")(max_norm=2.0, eps=1e-8)


def test_elementwise_sections() -> None:
    for method in ("value", "coordinate_wise"):
        section = internals.parse_deepspeed_section({"method": method, "clip_value": 0.25})
        assert section.config == config_class("value")(clip_value=0.25)
        assert section.elementwise
    # eps plays no part in a clamp (nor in DeepSpeed's clip, which is off for it).
    assert internals.parse_deepspeed_section({"method": "value", "eps": 1e-8}).config.eps == 1e-8


# ------------------------------------------------------------- reading a config
def test_config_forms(tmp_path: Path) -> None:
    config = {"train_micro_batch_size_per_gpu": 2, "distclip": SECTION}
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    encoded = base64.urlsafe_b64encode(json.dumps(config).encode()).decode()
    for form in (config, str(path), path, encoded):
        assert internals.load_deepspeed_config(form) == config
        assert (
            internals.read_deepspeed_section(form).config
            == internals.parse_deepspeed_section(SECTION).config
        )
    # hjson (DeepSpeed's reader) accepts comments; plain JSON is read either way.
    assert internals.read_deepspeed_section({"gradient_clipping": 1.0}).present is False


def test_unreadable_configs(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="config must be a dict"):
        internals.load_deepspeed_config(3)
    with pytest.raises(ValueError, match="none of those"):
        internals.load_deepspeed_config("no/such/file.json")
    not_object = tmp_path / "list.json"
    not_object.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        internals.load_deepspeed_config(not_object)
    broken = tmp_path / "broken.json"
    broken.write_text('{"distclip": ')
    with pytest.raises(ValueError, match="not valid JSON"):
        internals.load_deepspeed_config(broken)


def test_config_found_where_deepspeed_looks() -> None:
    assert internals.deepspeed_config_from_arguments({"config": {"a": 1}}) == {"a": 1}
    assert internals.deepspeed_config_from_arguments({"config_params": "x.json"}) == "x.json"
    args = argparse.Namespace(deepspeed_config="ds.json")
    assert internals.deepspeed_config_from_arguments({"args": args}) == "ds.json"
    assert internals.deepspeed_config_from_arguments(
        {"args": argparse.Namespace(deepscale_config="old.json")}
    ) == ("old.json")
    assert internals.deepspeed_config_from_arguments({}) is None


# --------------------------------------------- initialize: refused before DeepSpeed
def test_version_gate(deepspeed_never_initialized: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    deepspeed = deepspeed_never_initialized
    assert internals.deepspeed_version_verified(
        deepspeed.__version__
    )  # the pinned version is verified
    monkeypatch.setattr(deepspeed, "__version__", "0.20.1")
    internals.forget_warned_deepspeed_versions(monkeypatch)
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
        assert internals.deepspeed_version_verified(version)
    for version in ("0.18.9", "0.20.0", "1.19.0", "unknown"):
        assert not internals.deepspeed_version_verified(version)


def test_supported_wrappers_listed() -> None:
    assert internals.deepspeed_supported_wrappers() == (
        "DeepSpeedZeroOptimizer",
        "DeepSpeedZeroOptimizer_Stage3",
        "BF16_Optimizer",
        "FP16_Optimizer",
        "FP16_UnfusedOptimizer",
    )
    assert set(internals.deepspeed_wrapper_modules()) == set(
        internals.deepspeed_supported_wrappers()
    )


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
