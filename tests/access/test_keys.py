"""API keys without a server: the keys DB (hash only, expiry, revoke, concurrency, kill -9),
the quota windows (on an injected clock), the auth policy, and `shoal keys`."""
from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from shoal.access.auth import (ENV_ADMIN, Access, Authenticator, is_loopback, keys_required,
                              required_access, startup_problem)
from shoal.access.keydb import SCHEMA_VERSION, KeyDB, KeyDBError, UnknownKeyError, keys_db_path
from shoal.access.keys import new_key, parse_expiry, split_key
from shoal.access.principal import ANONYMOUS, KeyLimits, Principal
from shoal.cli import main
from shoal.core.errors import (AuthenticationError, InvalidParameterError, PermissionDeniedError,
                          RateLimitedError)
from shoal.core.sampling_params import SamplingParams
from shoal.serving.quotas import UNLIMITED, KeyQuotas
from shoal.serving.request import GenerateRequest
from shoal.serving.settings import ServerSettings

# ---- keys and the DB ------------------------------------------------------------------------


def test_key_format_round_trips_and_secrets_are_256_bit() -> None:
    key_id, secret, key = new_key()
    assert key == f"sk-shoal-{key_id}_{secret}"
    assert split_key(key) == (key_id, secret)
    assert len(secret) >= 43            # 32 random bytes, urlsafe base64
    assert new_key()[1] != secret
    for bad in ("", "sk-shoal-", key[:-1], key + "x", "sk-other-" + key[9:], key.replace("_", "-", 1)):
        assert split_key(bad) is None


def _all_cells(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return [str(cell) for t in tables for row in conn.execute(f"SELECT * FROM {t}") for cell in row]
    finally:
        conn.close()


def test_the_db_stores_only_a_hash_of_each_secret(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    with KeyDB(path) as db:
        made = [db.create(f"k{i}", models=["smollm2"]) for i in range(3)]
        # a second connection (another server) sees them while this one is open
        with KeyDB(path) as other:
            assert [r.name for r in other.list()] == ["k0", "k1", "k2"]
    cells = _all_cells(path)
    files = b"".join(p.read_bytes() for p in tmp_path.iterdir())    # the db and any -wal/-shm
    for key, record in made:
        _, secret = split_key(key)
        assert record.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
        assert record.secret_hash in cells
        assert not any(secret in cell or key in cell for cell in cells)
        assert secret.encode() not in files and secret[:16].encode() not in files
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_authenticate_accepts_the_key_and_refuses_wrong_revoked_and_expired(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    with KeyDB(path) as db:
        good, record = db.create("good", models=["smollm2"], limits=KeyLimits(requests_per_minute=5),
                                 priority_class="batch")
        old, _ = db.create("old", expires_at=time.time() - 1)
        soon, soon_record = db.create("soon", expires_at=time.time() + 3600)
        gone, gone_record = db.create("gone")
        db.revoke(gone_record.id)
    auth = Authenticator(path, required=True)
    try:
        principal = auth.authenticate(f"Bearer {good}")
        assert principal == Principal(key_id=record.id, name="good", priority_class="batch",
                                      allowed_models=frozenset({"smollm2:latest"}), admin=False,
                                      limits=KeyLimits(requests_per_minute=5))
        assert auth.authenticate(f"bearer   {soon}").name == "soon"
        assert auth.db.get(soon_record.id).last_used_at is not None
        key_id, secret = split_key(good)
        cases = {None: "missing API key", "": "missing API key", "Basic abc": "missing API key",
                 f"Bearer {good[:-1]}{'B' if good.endswith('A') else 'A'}": "invalid API key",
                 f"Bearer sk-shoal-{key_id}_{new_key()[1]}": "invalid API key",
                 f"Bearer {old}": "expired", f"Bearer {gone}": "revoked"}
        for header, words in cases.items():
            with pytest.raises(AuthenticationError, match=words):
                auth.authenticate(header)
    finally:
        auth.close()


def test_a_write_held_by_another_process_does_not_fail_authentication(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    with KeyDB(path) as db:
        key, record = db.create("busy")
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")          # e.g. `shoal keys create` mid-transaction
    auth = Authenticator(path, required=True)
    try:
        assert auth.authenticate(f"Bearer {key}").key_id == record.id    # the read does not wait
        assert auth.db.get(record.id).last_used_at is None               # the last-use write gave up
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        auth.close()


def test_expiry_durations_and_dates() -> None:
    now = 1_700_000_000.0
    assert parse_expiry("30d", now) == now + 30 * 86400
    assert parse_expiry("12h", now) == now + 12 * 3600
    assert parse_expiry("2w", now) == now + 14 * 86400
    assert parse_expiry("2030-01-31", now) == 1896048000.0
    assert parse_expiry("2030-01-31T12:00:00+02:00", now) == 1896048000.0 + 10 * 3600
    for bad in ("0d", "soon", "2020-01-01", "-5d"):
        with pytest.raises(InvalidParameterError):
            parse_expiry(bad, now)


def test_revoke_is_kept_and_names_are_unique_among_active_keys(tmp_path: Path) -> None:
    with KeyDB(tmp_path / "keys.db") as db:
        _, first = db.create("bot")
        with pytest.raises(InvalidParameterError, match="an active key named 'bot'"):
            db.create("bot")
        revoked = db.revoke(first.id, now=100.0)
        assert revoked.revoked_at == 100.0 and revoked.status() == "revoked"
        assert db.revoke(first.id, now=200.0).revoked_at == 100.0
        db.create("bot")                     # the name is free again
        assert [r.status() for r in db.list()] == ["revoked", "active"]
        with pytest.raises(UnknownKeyError):
            db.revoke("000000000000")
        assert db.has_usable_key()


def test_schema_is_versioned_and_a_newer_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    KeyDB(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(KeyDBError, match="newer shoal"):
        KeyDB(path)
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(KeyDBError, match="junk.db"):
        KeyDB(tmp_path / "junk.db")


def test_concurrent_writers_all_land(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    KeyDB(path).close()

    def create(prefix: str) -> None:
        with KeyDB(path) as db:        # its own connection, as another process would have
            for i in range(15):
                db.create(f"{prefix}-{i}")

    threads = [threading.Thread(target=create, args=(p,)) for p in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with KeyDB(path) as db:
        assert len(db.list()) == 45


_WRITER = """
import sys
from shoal.access.keydb import KeyDB
db = KeyDB(sys.argv[1])
print("ready", flush=True)
i = 0
while True:
    db.create(f"w-{i}", models=["a", "b"])
    i += 1
"""


def test_kill_9_mid_writes_leaves_a_consistent_db(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE)
    try:
        assert writer.stdout.readline().strip() == b"ready"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with KeyDB(path) as db:
                if len(db.list()) >= 20:
                    break
            time.sleep(0.05)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    with KeyDB(path) as db:
        records = db.list()
        assert len(records) >= 20
        assert [r.name for r in records] == [f"w-{i}" for i in range(len(records))]
        assert all(r.models == ("a:latest", "b:latest") and len(r.secret_hash) == 64 for r in records)
        db.create("after-crash")


# ---- quotas ---------------------------------------------------------------------------------

@dataclass
class _Model:
    """What admission reads of a served model: its names and context length."""

    name: str = "smollm2:135m"
    aliases: tuple[str, ...] = ("smollm2",)
    max_model_len: int = 2048


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _principal(**limits: int) -> Principal:
    return Principal(key_id="k1", name="ci-bot", limits=KeyLimits(**limits))


def _req(principal: Principal, prompt: int = 10, max_tokens: int | None = 40, n: int = 1,
         model: _Model | None = None) -> GenerateRequest:
    return GenerateRequest(model=model or _Model(), prompt_token_ids=[1] * prompt,  # type: ignore[arg-type]
                           params=SamplingParams(max_tokens=max_tokens, n=n), principal=principal)


def test_requests_per_minute_slide_and_say_when_to_retry() -> None:
    clock = _Clock()
    quotas = KeyQuotas(clock)
    p = _principal(requests_per_minute=2)
    quotas.admit(_req(p)).finish(3)
    clock.now += 20
    quotas.admit(_req(p)).finish(3)
    clock.now += 10
    with pytest.raises(RateLimitedError) as err:
        quotas.admit(_req(p))
    assert str(err.value) == "rate limit: 2 requests per minute for key 'ci-bot'"
    assert err.value.retry_after == 30 and err.value.model == "smollm2:135m"
    clock.now += 30                            # the first request left the window
    lease = quotas.admit(_req(p))
    with pytest.raises(RateLimitedError) as err:
        quotas.admit(_req(p))
    assert err.value.retry_after == 20
    lease.cancel()                             # never ran: not counted
    quotas.admit(_req(p))
    other = Principal(key_id="k2", name="other", limits=KeyLimits(requests_per_minute=2))
    quotas.admit(_req(other))                  # windows are per key


def test_tokens_per_minute_reserve_then_count_what_was_used() -> None:
    clock = _Clock()
    quotas = KeyQuotas(clock)
    p = _principal(tokens_per_minute=100)
    first = quotas.admit(_req(p))              # reserves 10 + 40
    assert first.reserved == 50
    second = quotas.admit(_req(p))
    with pytest.raises(RateLimitedError, match="100 tokens per minute for key 'ci-bot'") as err:
        quotas.admit(_req(p))
    # running requests count as if they ended now: room in 60 s at the latest
    assert err.value.retry_after == 60
    clock.now += 5
    first.finish(5)                            # used 15 of its 50
    with pytest.raises(RateLimitedError):
        quotas.admit(_req(p))                  # 15 + 50 in use, 50 more asked
    second.finish(5)
    third = quotas.admit(_req(p))              # 15 + 15 + 50 = 80
    with pytest.raises(RateLimitedError) as err:
        quotas.admit(_req(p, max_tokens=20))   # needs 30, 20 free: 10 more must age out
    assert err.value.retry_after == 60         # the first finished entry (15) leaves at +60
    third.finish(40)
    clock.now += 60
    quotas.admit(_req(p, prompt=30, max_tokens=None, n=1))   # the rest is gone; clipped to 100


def test_a_request_larger_than_the_minute_budget_runs_only_when_the_key_is_idle() -> None:
    clock = _Clock()
    quotas = KeyQuotas(clock)
    p = _principal(tokens_per_minute=100)
    big = quotas.admit(_req(p, prompt=500, max_tokens=500))
    assert big.reserved == 100
    with pytest.raises(RateLimitedError):
        quotas.admit(_req(p, prompt=1, max_tokens=1))
    big.finish(500)                            # charged 1000 for the next minute
    clock.now += 59
    with pytest.raises(RateLimitedError) as err:
        quotas.admit(_req(p, prompt=1, max_tokens=1))
    assert err.value.retry_after == 1
    clock.now += 1
    quotas.admit(_req(p, prompt=1, max_tokens=1))


def test_concurrency_is_released_when_a_request_ends() -> None:
    quotas = KeyQuotas(_Clock())
    p = _principal(max_concurrent=1)
    lease = quotas.admit(_req(p))
    with pytest.raises(RateLimitedError, match="1 concurrent requests for key 'ci-bot'") as err:
        quotas.admit(_req(p))
    assert err.value.retry_after == 1
    lease.finish(4)
    lease.finish(4)                            # closing twice changes nothing
    quotas.admit(_req(p))


def test_models_and_request_sizes_are_checked_per_key() -> None:
    quotas = KeyQuotas(_Clock())
    smollm2_only = Principal(key_id="k", name="k", allowed_models=frozenset({"smollm2:latest"}))
    quotas.admit(_req(smollm2_only))           # 'smollm2' is an alias of smollm2:135m
    with pytest.raises(PermissionDeniedError, match="may not use the model 'qwen:0.5b'") as err:
        quotas.admit(_req(smollm2_only, model=_Model(name="qwen:0.5b", aliases=())))
    assert err.value.code == "model_not_allowed"
    sized = _principal(max_prompt_tokens=8, max_tokens=16)
    with pytest.raises(InvalidParameterError, match="the prompt has 10 tokens"):
        quotas.admit(_req(sized))
    for asked, given in ((40, 16), (None, 16), (5, 5)):
        req = _req(sized, prompt=4, max_tokens=asked)
        quotas.admit(req)
        assert req.params.max_tokens == given
    assert quotas.admit(_req(ANONYMOUS)) is UNLIMITED
    assert quotas.admit(_req(ENV_ADMIN)) is UNLIMITED


# ---- policy and settings --------------------------------------------------------------------

def test_keys_are_required_off_loopback_unless_turned_off() -> None:
    for host in ("127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host) and not keys_required("auto", host)
    for host in ("0.0.0.0", "::", "10.1.2.3", "my-host"):
        assert not is_loopback(host) and keys_required("auto", host)
    assert keys_required("on", "127.0.0.1") and not keys_required("off", "0.0.0.0")


def test_which_paths_need_which_key() -> None:
    expect = {("GET", "/"): Access.OPEN, ("GET", "/health"): Access.OPEN,
              ("GET", "/api/version"): Access.OPEN, ("GET", "/livez"): Access.OPEN,
              ("GET", "/metrics"): Access.OPEN, ("OPTIONS", "/v1/models"): Access.OPEN,
              ("POST", "/v1/chat/completions"): Access.CALLER, ("GET", "/api/tags"): Access.CALLER,
              ("POST", "/api/pull"): Access.MODEL_ADMIN, ("POST", "/api/pull/"): Access.MODEL_ADMIN,
              ("DELETE", "/api/delete"): Access.MODEL_ADMIN,
              ("POST", "/api/blobs/sha256:ab"): Access.MODEL_ADMIN,
              ("GET", "/admin/keys"): Access.KEY_ADMIN, ("GET", "/dashboard"): Access.OPEN,
              ("GET", "/dashboard/feed"): Access.ADMIN_VIEW, ("GET", "/dashboard/snapshot"): Access.ADMIN_VIEW}
    for (method, path), access in expect.items():
        assert required_access(method, path, protect_metrics=False) is access, path
    assert required_access("GET", "/metrics", protect_metrics=True) is Access.CALLER


def test_which_callers_are_admitted_to_which_access(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    with KeyDB(path) as db:
        user, _ = db.create("user")
        admin, _ = db.create("admin", admin=True)
    required, optional = Authenticator(path, required=True), Authenticator(path, required=False)
    try:
        assert [required.needs_key(a) for a in Access] == [False, True, True, True, True]
        assert [optional.needs_key(a) for a in Access] == [False, False, False, False, True]
        assert required.admit(Access.CALLER, f"Bearer {user}").name == "user"
        for access in (Access.CALLER, Access.MODEL_ADMIN, Access.ADMIN_VIEW, Access.KEY_ADMIN):
            assert required.admit(access, f"Bearer {admin}").admin
        for access, words in ((Access.MODEL_ADMIN, "managing models"), (Access.KEY_ADMIN, "managing keys"),
                              (Access.ADMIN_VIEW, "the dashboard's live data")):
            with pytest.raises(PermissionDeniedError, match=words) as info:
                required.admit(access, f"Bearer {user}")
            assert info.value.code == "admin_required"
        with pytest.raises(AuthenticationError):
            optional.admit(Access.KEY_ADMIN, None)
    finally:
        required.close()
        optional.close()


def test_serving_publicly_without_a_usable_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    problem = startup_problem("auto", "0.0.0.0", path, None)
    assert "shoal keys create NAME" in problem and "SHOAL_AUTH=off" in problem
    assert not path.exists()                   # the check creates nothing
    assert startup_problem("auto", "127.0.0.1", path, None) is None
    assert startup_problem("off", "0.0.0.0", path, None) is None
    assert startup_problem("on", "0.0.0.0", path, "a-long-admin-key-123") is None
    with KeyDB(path) as db:
        _, record = db.create("only")
        db.revoke(record.id)
    assert startup_problem("on", "127.0.0.1", path, None) is not None
    with KeyDB(path) as db:
        db.create("live")
    assert startup_problem("auto", "0.0.0.0", path, None) is None


@pytest.mark.parametrize("metrics_auth, host, auth, protected", [
    (None, "127.0.0.1", "auto", False),     # no keys required: nothing to protect it with
    (None, "0.0.0.0", "auto", True),        # auto: behind a key whenever keys are required
    (None, "127.0.0.1", "on", True),
    ("0", "0.0.0.0", "auto", False),
    ("1", "0.0.0.0", "auto", True),
    ("auto", "0.0.0.0", "off", False),
])
def test_metrics_need_a_key_whenever_keys_are_required_unless_told(metrics_auth, host, auth,
                                                                   protected) -> None:
    env = {"SHOAL_HOST": host, "SHOAL_AUTH": auth}
    if metrics_auth is not None:
        env["SHOAL_METRICS_AUTH"] = metrics_auth
    authenticator = Authenticator.from_settings(ServerSettings.from_env(env))
    access = required_access("GET", "/metrics", authenticator.protect_metrics)
    assert authenticator.needs_key(access) is protected


def test_a_bad_metrics_auth_value_is_named() -> None:
    with pytest.raises(InvalidParameterError) as err:
        ServerSettings.from_env({"SHOAL_METRICS_AUTH": "sometimes"})
    assert err.value.field == "metrics_auth"


def test_auth_settings_are_checked_and_the_admin_key_stays_out_of_repr() -> None:
    settings = ServerSettings.from_env({"SHOAL_AUTH": "ON", "SHOAL_ADMIN_KEY": "s3cret-admin-key-42",
                                        "SHOAL_METRICS_AUTH": "1", "SHOAL_KEYS_DB": "/x/k.db"})
    assert (settings.auth, settings.metrics_auth, settings.keys_db) == ("on", True, "/x/k.db")
    assert "s3cret" not in repr(settings)
    for env in ({"SHOAL_AUTH": "maybe"}, {"SHOAL_ADMIN_KEY": "short"}):
        with pytest.raises(InvalidParameterError):
            ServerSettings.from_env(env)
    assert keys_db_path(None, {"SHOAL_HOME": "/h"}) == Path("/h/keys.db")
    assert keys_db_path(None, {"SHOAL_HOME": "/h", "SHOAL_KEYS_DB": "/k.db"}) == Path("/k.db")
    assert keys_db_path("/explicit.db", {"SHOAL_KEYS_DB": "/k.db"}) == Path("/explicit.db")


# ---- the command line -----------------------------------------------------------------------

def test_shoal_keys_create_list_revoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SHOAL_HOME", str(tmp_path))
    monkeypatch.delenv("SHOAL_KEYS_DB", raising=False)
    assert main(["keys", "create", "ci-bot", "--models", "smollm2,qwen:0.5b", "--rpm", "60",
                 "--tpm", "10000", "--max-concurrent", "2", "--class", "batch", "--expires", "30d"]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    assert split_key(key) and "shown only now" in out.err
    assert main(["keys", "create", "root", "--admin"]) == 0
    capsys.readouterr()
    assert main(["keys", "list"]) == 0
    table = capsys.readouterr().out
    assert "ci-bot" in table and "smollm2:latest,qwen:0.5b" in table and "batch" in table
    assert "active (admin)" in table and split_key(key)[1] not in table
    assert main(["keys", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    bot = listed[0]
    assert (bot["rpm"], bot["tpm"], bot["max_concurrent"], bot["status"]) == (60, 10000, 2, "active")
    assert "secret_hash" not in bot and "key" not in bot
    assert main(["keys", "revoke", bot["id"]]) == 0
    assert "revoked API key 'ci-bot'" in capsys.readouterr().out
    assert main(["keys", "revoke", "nope"]) == 1
    assert "no API key with id 'nope'" in capsys.readouterr().err
    assert main(["keys", "create", "x", "--expires", "2001-01-01"]) == 1
    assert "already past" in capsys.readouterr().err
    with KeyDB(tmp_path / "keys.db") as db:
        assert [r.status() for r in db.list()] == ["revoked", "active"]
