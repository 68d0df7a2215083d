"""Shared fixtures. One Ray cluster per test session: two nodes on loopback (`ray start --head` plus a
second `ray start --address` with its own `node2` resource), which every runner test uses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import SHARED, write_prompts

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback test cluster: no token files to hand around
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def _ray(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", *args], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, f"ray {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout + out.stderr


@pytest.fixture(scope="session")
def ray_cluster():
    """Address of a two-node Ray cluster on loopback; the test process is connected to it."""
    import ray

    common = ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--object-store-memory=200000000", "--disable-usage-stats"]
    _ray("start", "--head", "--port=0", "--include-dashboard=false", *common)
    address = Path("/tmp/ray/ray_current_cluster").read_text().strip()
    _ray("start", f"--address={address}", *common[:-1], '--resources={"node2": 2}', "--disable-usage-stats")
    os.environ["RAY_ADDRESS"] = address
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield address
    ray.shutdown()
    _ray("stop", "--force")
    os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture
def prompts(tmp_path) -> Path:
    """40 prompts with ids, three of them bad (empty, null, far too long)."""
    return write_prompts(tmp_path / "prompts.parquet")


@pytest.fixture(scope="session")
def shared():
    if not (SHARED / "models" / "pycoder-22m").is_dir():
        pytest.skip("../shared is not beside this checkout")
    return SHARED
