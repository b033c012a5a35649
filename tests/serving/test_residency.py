"""Residency: on-demand loading, keep_alive, the loaded-model limit and memory budget, failures.

Real engines over tiny GGUF models (they load in well under a second).
"""
from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import pytest

import tiny_models
from shoal.core.config import EngineConfig
from shoal.access.principal import Principal, current_principal
from shoal.core.errors import InvalidParameterError, ModelLoadError, ServerBusyError, UnknownModelError
from shoal.serving.catalog import ModelSpec, StaticCatalog
from shoal.serving.model_loading import build_served_model
from shoal.serving.residency import ResidencyManager

BASE = EngineConfig(kv_cache_bytes=1 << 20, compute="exact", attention_backend="torch")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("residency")
    paths = []
    for i in range(3):
        path = root / f"tiny{i}.gguf"
        tiny_models.write_gguf_model(path, seed=i)
        paths.append(path)
    return paths


def manager(files: list[Path], **kwargs) -> tuple[ResidencyManager, list[str]]:
    specs = [ModelSpec(name=f"tiny{i}:latest", path=p) for i, p in enumerate(files)]
    built: list[str] = []

    def build(spec: ModelSpec):
        built.append(spec.name)
        return build_served_model(spec, BASE)

    return ResidencyManager(StaticCatalog(specs), build, **kwargs), built


def run(coro):
    return asyncio.run(coro)


def test_loads_on_first_use_once_even_when_many_ask_at_once(tiny_files) -> None:
    async def scenario():
        res, built = manager(tiny_files)
        models = await asyncio.gather(*(res.acquire("tiny0") for _ in range(5)))
        assert len({id(m) for m in models}) == 1 and built == ["tiny0:latest"]
        assert res.active(models[0]) == 5
        for m in models:
            res.release(m)
        again = await res.acquire("TINY0:latest")         # names compare as Ollama's do
        assert again is models[0] and built == ["tiny0:latest"]
        res.release(again)
        with pytest.raises(UnknownModelError):
            await res.acquire("nope")
        await res.shutdown()

    run(scenario())


def test_keep_alive_zero_unloads_when_idle_and_expiry_unloads_later(tiny_files) -> None:
    async def scenario():
        res, built = manager(tiny_files, default_keep_alive=0.3)
        res.start()
        m = await res.acquire("tiny0", keep_alive=0)
        assert res.expires_at(m) is None                   # busy: never expires
        res.release(m)
        await asyncio.sleep(0.2)
        assert res.loaded() == []                          # keep_alive 0: gone when idle
        m = await res.acquire("tiny1")                     # default keep_alive 0.3 s
        res.release(m)
        assert res.expires_at(m) == pytest.approx(time.time() + 0.3, abs=0.1)
        await asyncio.sleep(0.1)
        assert res.get_loaded("tiny1") is m
        await asyncio.sleep(0.6)
        assert res.get_loaded("tiny1") is None             # expired and reaped
        m = await res.acquire("tiny2", keep_alive=-1)
        res.release(m)
        await asyncio.sleep(0.5)
        assert res.get_loaded("tiny2") is m and res.expires_at(m) is None   # negative: never
        assert res.unloads_total == 2
        await res.shutdown()

    run(scenario())


def test_max_loaded_unloads_the_least_recently_used_idle_model(tiny_files) -> None:
    async def scenario():
        res, built = manager(tiny_files, max_loaded=2)
        for name in ("tiny0", "tiny1"):
            res.release(await res.acquire(name))
        res.release(await res.acquire("tiny0"))            # tiny1 is now the least recent
        res.release(await res.acquire("tiny2"))
        assert sorted(m.name for m in res.loaded()) == ["tiny0:latest", "tiny2:latest"]
        await res.shutdown()

    run(scenario())


def test_a_load_waits_for_a_busy_model_then_times_out_or_proceeds(tiny_files) -> None:
    async def scenario():
        res, _ = manager(tiny_files, max_loaded=1, load_timeout=0.5)
        busy = await res.acquire("tiny0")
        started = time.monotonic()
        with pytest.raises(ServerBusyError):
            await res.acquire("tiny1")                     # the only slot stays busy
        assert 0.4 < time.monotonic() - started < 3
        assert res.get_loaded("tiny1") is None
        res.load_timeout = 10
        waiter = asyncio.ensure_future(res.acquire("tiny1"))
        await asyncio.sleep(0.3)
        assert not waiter.done()
        res.release(busy)                                  # the slot frees: the load proceeds
        other = await asyncio.wait_for(waiter, 10)
        assert other.name == "tiny1:latest" and res.get_loaded("tiny0") is None
        res.release(other)
        await res.shutdown()

    run(scenario())


def test_memory_budget_counts_loaded_sizes(tiny_files) -> None:
    async def scenario():
        res, _ = manager(tiny_files, memory_budget=1, estimate=lambda spec: 1)
        res.release(await res.acquire("tiny0"))
        res.release(await res.acquire("tiny1"))            # over budget with both: tiny0 goes
        assert [m.name for m in res.loaded()] == ["tiny1:latest"]
        await res.shutdown()

    run(scenario())


def test_a_failed_load_reports_and_can_be_retried(tmp_path, tiny_files) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)

    async def scenario():
        specs = [ModelSpec(name="broken:latest", path=broken)]
        res = ResidencyManager(StaticCatalog(specs), lambda s: build_served_model(s, BASE))
        results = await asyncio.gather(res.acquire("broken"), res.acquire("broken"),
                                       return_exceptions=True)
        assert all(isinstance(r, ModelLoadError) for r in results)
        assert res.loaded() == []
        broken.write_bytes(tiny_files[0].read_bytes())     # fixed on disk: the retry loads
        model = await res.acquire("broken")
        assert model.name == "broken:latest"
        res.release(model)
        await res.shutdown()

    run(scenario())


def test_pinned_models_never_unload_by_themselves(tiny_files) -> None:
    async def scenario():
        res, _ = manager(tiny_files, max_loaded=1, load_timeout=0.3, default_keep_alive=0)
        pinned = build_served_model(ModelSpec(name="tiny0:latest", path=tiny_files[0]), BASE)
        res.adopt(pinned, pinned=True)
        res.release(await res.acquire("tiny0", keep_alive=0))
        await res.reap()
        assert res.get_loaded("tiny0") is pinned            # neither keep_alive nor expiry
        with pytest.raises(ServerBusyError):
            await res.acquire("tiny1")                      # nor to make room
        assert await res.unload("tiny0") is False           # nor on request (issue 13)
        assert res.get_loaded("tiny0") is pinned
        await res.shutdown()

    run(scenario())


def test_a_pinned_model_is_not_unloaded_on_request(tiny_files) -> None:
    # issue 13: {"keep_alive": 0} with any key unloaded the `serve --model` model
    async def scenario():
        res, _ = manager(tiny_files)
        pinned = build_served_model(ModelSpec(name="tiny0:latest", path=tiny_files[0]), BASE)
        res.adopt(pinned, pinned=True)
        assert await res.unload("tiny0") is False
        assert await res.unload("tiny0:latest") is False
        assert res.get_loaded("tiny0") is pinned
        other = await res.acquire("tiny1")
        res.release(other)
        assert await res.unload("tiny1") is True          # an unpinned idle model still unloads
        await res.shutdown()

    run(scenario())


@pytest.mark.parametrize("principal, asked, gets, may_unload", [
    (Principal(), 0.0, 0.0, True),                                       # keys off: as asked
    (Principal(key_id="a", name="admin", admin=True), 0.0, 0.0, True),   # an admin key: as asked
    (Principal(key_id="k", name="user"), 0.0, 300.0, False),             # a key: not below the default
    (Principal(key_id="k", name="user"), 10.0, 300.0, False),
    (Principal(key_id="k", name="user"), 3600.0, 3600.0, False),         # ... but longer is fine
    (Principal(key_id="k", name="user"), math.inf, math.inf, False),
    (Principal(key_id="k", name="user"), None, None, False),             # unset: the default applies
])
def test_a_non_admin_key_cannot_shorten_keep_alive(tiny_files, principal, asked, gets, may_unload) -> None:
    res, _ = manager(tiny_files, default_keep_alive=300.0)
    token = current_principal.set(principal)
    try:
        assert res.bounded_keep_alive(asked) == gets
        assert res.may_unload() is may_unload
    finally:
        current_principal.reset(token)


def test_names_over_255_bytes_are_refused_before_any_lookup(tiny_files) -> None:
    res, _ = manager(tiny_files)
    res.catalog.resolve = lambda name: pytest.fail("looked up")   # type: ignore[method-assign]
    for name in ("x" * 256, "é" * 128, "m" * 15_000_000):
        with pytest.raises(InvalidParameterError) as info:
            res.resolve(name)
        assert info.value.field == "model" and len(str(info.value)) < 200
