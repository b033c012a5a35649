"""Without --replicas / --ray / --ray-address the server is today's one process: Ray is never
imported (checked in a fresh interpreter, since this test session may have imported it)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
from shoal.core.config import EngineConfig
from shoal.http.app import create_app
from shoal.serving.model_loading import make_residency
from shoal.serving.settings import ServerSettings

settings = ServerSettings.from_env({})
assert not settings.replicated
residency = make_residency(EngineConfig(model=sys.argv[1], num_threads=1), settings)
create_app(residency, settings)
print("engine", type(residency.loaded()[0].engine).__name__)
print("ray imported", any(name == "ray" or name.startswith("ray.") for name in sys.modules))
"""


def test_the_default_server_never_imports_ray(tiny_llama_dir: Path) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_llama_dir)], check=False,
                          capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "engine AsyncEngine" in done.stdout
    assert "ray imported False" in done.stdout
