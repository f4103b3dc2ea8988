"""The core builds its own models without pydantic plugins, and leaves the application's alone.

A real pydantic plugin, installed for the test the way any is (a distribution with an entry point in
the ``pydantic`` group, on ``PYTHONPATH``), records when pydantic loads it. Loading one is what
costs a process logfire's ~20 MiB at start (see ``dara_ws_core/_plugins.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VAR = "PYDANTIC_DISABLE_PLUGINS"

PLUGIN = '''
class _Plugin:
    def new_schema_validator(self, schema, schema_type, schema_type_path, schema_kind, config,
                             plugin_settings):
        return None, None, None

plugin = _Plugin()
'''

# A server process of the websockets adapter: import it, decode a client frame, encode a reply,
# then decode a server frame as a client does; only then the application builds a model.
PROGRAM = f'''
import os, sys
import dara_ws_websockets
from dara_ws_core import codec
from dara_ws_core.connection import ServerConnection
codec.decode_client_frame('{{"type":"ping","message":null}}')
ServerConnection("c1").init_frame
codec.decode_server_frame(codec.PONG_FRAME.decode())
print("core", "probe_plugin" in sys.modules, os.environ.get({VAR!r}, "<unset>"))
import pydantic
class AppModel(pydantic.BaseModel):
    x: int
print("app", "probe_plugin" in sys.modules)
'''


@pytest.fixture
def plugin_path(tmp_path: Path) -> Path:
    (tmp_path / "probe_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "probe_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: probe-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[pydantic]\nprobe = probe_plugin:plugin\n")
    return tmp_path


def run(plugin_path: Path, setting: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != VAR}
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_path), *filter(None, [env.get("PYTHONPATH")])])
    if setting is not None:
        env[VAR] = setting
    result = subprocess.run([sys.executable, "-c", PROGRAM], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=False, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_the_core_loads_no_pydantic_plugin_and_the_application_still_does(plugin_path: Path) -> None:
    assert run(plugin_path, None) == ["core False <unset>", "app True"]


@pytest.mark.parametrize(("setting", "at_core"), [("", True), ("__all__", False), ("other", True)])
def test_an_explicit_setting_is_the_applications_choice(
    plugin_path: Path, setting: str, at_core: bool
) -> None:
    # Empty loads every plugin, for the core's models too; "__all__" loads none, not even later.
    assert run(plugin_path, setting) == [f"core {at_core} {setting}", f"app {at_core}"]
