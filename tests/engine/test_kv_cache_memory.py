"""How the KV cache takes memory on the CPU: lazily by default, all at load with commit
(SHOAL_KV_CACHE_COMMIT). Measured as the RSS of a fresh process."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.core.config import EngineConfig

POOL_MIB = 256

PROBE = f"""
import json, torch
from shoal.engine.kv.tensors import allocate_kv_caches, bytes_per_block
from shoal.model.config import ModelConfig

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

config = ModelConfig(architecture="llama", vocab_size=32, hidden_size=64, intermediate_size=128,
                     num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5,
                     rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False)
num_blocks = ({POOL_MIB} << 20) // bytes_per_block(config, 16, torch.float32)
before = rss()
caches = allocate_kv_caches(config, num_blocks, 16, torch.float32, torch.device("cpu"),
                            blocked=BLOCKED, commit=COMMIT)
print(json.dumps({{"grew": rss() - before, "pool": sum(k.nbytes + v.nbytes for k, v in caches),
                  "zero": all(bool((k == 0).all() and (v == 0).all()) for k, v in caches) if COMMIT else None}}))
"""


def _allocate(commit: bool, blocked: bool) -> dict:
    code = PROBE.replace("COMMIT", str(commit)).replace("BLOCKED", str(blocked))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("blocked", [False, True])
def test_commit_takes_the_whole_pool_at_load_and_lazy_does_not(blocked: bool) -> None:
    lazy = _allocate(commit=False, blocked=blocked)
    committed = _allocate(commit=True, blocked=blocked)
    assert lazy["pool"] == committed["pool"] >= (POOL_MIB - 1) << 20
    assert lazy["grew"] < 0.1 * lazy["pool"]             # only block 0 of each layer is written
    assert committed["grew"] > 0.9 * committed["pool"]
    assert committed["zero"] is True


def test_the_setting_reads_from_the_environment() -> None:
    assert EngineConfig.from_env({"SHOAL_KV_CACHE_COMMIT": "1"}).kv_cache_commit is True
    assert EngineConfig.from_env({}).kv_cache_commit is False
