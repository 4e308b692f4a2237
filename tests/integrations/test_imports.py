"""``import distclip`` (and its integration modules) imports no training framework.

Checked in a fresh interpreter: the frameworks are installed in the test environment,
so only an import that does not happen keeps them out of ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys

#: Optional dependencies that ``import distclip`` must leave alone.
FRAMEWORKS = (
    "transformers",
    "accelerate",
    "lightning",
    "pytorch_lightning",
    "deepspeed",
    "matplotlib",
    "tensorboard",
    "tensorboardX",
)

_PROBE = """
import json, sys
import distclip
first = sorted(m for m in sys.modules if m.split(".")[0] in {frameworks})
# The integration modules are reached lazily and import no framework either, even when
# they refuse an object that is not a framework's.
import distclip.hf, distclip.accelerate, distclip.deepspeed
refused = []
for attach in (distclip.hf.attach, distclip.accelerate.attach):
    try:
        attach(object())
    except TypeError as exc:
        refused.append(str(exc))
after = sorted(m for m in sys.modules if m.split(".")[0] in {frameworks})
print(json.dumps({{"first": first, "after": after, "refused": refused}}))
"""


def test_import_distclip_imports_no_framework() -> None:
    code = _PROBE.format(frameworks=set(FRAMEWORKS))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["first"] == []
    assert report["after"] == []
    assert report["refused"] == [
        "trainer must be a transformers.Trainer, got object",
        "accelerator must be an accelerate.Accelerator, got object",
    ]
