"""Chained content hashes of full KV blocks: the keys of the prefix cache."""
from __future__ import annotations

import hashlib
from array import array
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from shoal.engine.request import Request

# NOTE: a 128-bit cryptographic digest, not Python's hash(): the pool confirms a hit by
# comparing the block's own token ids, but it cannot re-check the whole prefix behind
# the parent hash, so a collision of the chain must be practically impossible.
_DIGEST_BYTES = 16


def hash_block(parent_hash: int | None, token_ids: Sequence[int], salt: int) -> int:
    """Hash of one full block, chained on the hash of the block before it."""
    digest = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    if parent_hash is None:
        digest.update(b"\x00")
    else:
        digest.update(b"\x01" + parent_hash.to_bytes(_DIGEST_BYTES, "little"))
    salt_bytes = str(salt).encode()
    digest.update(len(salt_bytes).to_bytes(4, "little") + salt_bytes)
    digest.update(array("q", token_ids).tobytes())
    return int.from_bytes(digest.digest(), "little")


def prompt_block_hashes(token_ids: Sequence[int], block_size: int, salt: int) -> list[int]:
    """The chained hashes of a prompt's full blocks, as the prefix cache keys them (a
    router outside the engine computes them here, so its keys match the engine's)."""
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        hashes.append(hash_block(hashes[-1] if hashes else None, token_ids[start:start + block_size], salt))
    return hashes


def update_block_hashes(request: Request, block_size: int) -> None:
    """Extends `request.block_hashes` with the hash of every newly full block."""
    tokens = request.all_token_ids
    hashes = request.block_hashes
    num_full = len(tokens) // block_size
    for index in range(len(hashes), num_full):
        parent = hashes[index - 1] if index else None
        start = index * block_size
        hashes.append(hash_block(parent, tokens[start:start + block_size], request.cache_salt))
