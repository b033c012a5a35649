"""Workload presets and user prompt files, built to exact token lengths per target.

Prompts are sequences of common English words drawn by a seeded generator: request k of
level L draws the same words on every target, so targets with the same tokenizer get the
same text, and no two requests share more than their first word (no server gets a free ride
from its prefix cache) — except in `chat-rag`, whose turns repeat their conversation so far
on purpose, and `shared-prefix`, whose users share a few long system prompts on purpose.

Token-accurate lengths: `PromptBuilder.calibrate` keeps the words that are exactly one
token for the target's tokenizer and checks that joined words add up (true for byte-level
BPE and SentencePiece tokenizers, which never merge across spaces); a prompt of n tokens is
then n - (special tokens) words. If the check fails the lengths are reported as estimates.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from shoal.bench.client import BenchRequest
from shoal.bench.targets import BenchSetupError
from shoal.bench.tokens import TokenCounter

WORDS = tuple(dict.fromkeys("""
the of and to in is was for on that with as by at from his an were are which this be has had or
one first new their after who its also they two her been other when there all into more time only
over would some most years may three about such city used between school later many where these
then during state world under war while both part known since through film made team series people
before season year born can out name family early area you them until several well government
second house national century like because each four work life use way could include band group
north south around another same did high found home called without game based last long play small
large music local album river east west end town university best county old down water light green
open river book garden stone bridge market winter summer paper glass story night morning field road
window table letter voice heart world island forest valley mountain harbour station tower village
""".split()))
_CHAT_SYSTEM = "You answer questions about the passages the user retrieves, briefly and accurately."


@dataclass(frozen=True, slots=True)
class Preset:
    prompt_tokens: int
    answer_tokens: int
    long_answers: bool


PRESETS: dict[str, Preset] = {
    "short-short": Preset(64, 64, False),
    "long-short": Preset(1024, 64, False),     # RAG-style: a long context, a short answer
    "long-long": Preset(1024, 512, True),
    "short-long": Preset(64, 512, True),
    "chat-rag": Preset(256, 64, False),        # per turn: one retrieved passage of 256 tokens
    "shared-prefix": Preset(1000, 64, False),  # many users behind a few long system prompts
}
CHAT_RAG_TURNS = 4
SHARED_PREFIXES = 16
_QUESTION_TOKENS = 16
WORKLOAD_NAMES = (*PRESETS, "jsonl:PATH")


class PromptBuilder:
    """Text of an exact token count for one target's tokenizer."""

    def __init__(self, counter: TokenCounter) -> None:
        self.counter = counter
        self.words: list[str] = list(WORDS)
        self.special = 0              # tokens the tokenizer adds to any prompt (BOS)
        self.lead: str | None = None  # a first word that is one token at the start of a text
        self.exact = False

    @property
    def accuracy(self) -> str:
        """How the prompt lengths were established, for the results."""
        if not self.exact:
            return "estimate"
        return "exact (the server's /tokenize)" if self.counter.source == "server" else "exact (--tokenizer file)"

    async def calibrate(self, sample_lengths: tuple[int, ...] = (64, 1024)) -> None:
        if self.counter.source == "estimate":
            return
        self.special = await self.counter.count("")
        # NOTE: a word is often one token after a space but two at the start of a text, so
        # every prompt starts with one word checked in that position, and the others are
        # checked after it.
        for word in self.words[:16]:
            if await self.counter.count(word) == self.special + 1:
                self.lead = word
                break
        words = await self._single_token_words(self.words) if self.lead else []
        if len(words) < 16:
            self.lead = None
            return
        self.words = words
        rng = random.Random("calibration")
        for n in sample_lengths:
            for _ in range(3):
                if await self.counter.count(self.text(rng, n)) != n:
                    return
        self.exact = True

    async def _single_token_words(self, words: list[str]) -> list[str]:
        """The words that add exactly one token each after the lead word (bisection: few
        tokenizer calls when most do)."""
        if not words:
            return []
        text = " ".join([self.lead or "", *words])
        if await self.counter.count(text) - self.special - 1 == len(words):
            return words
        if len(words) == 1:
            return []
        half = len(words) // 2
        return await self._single_token_words(words[:half]) + await self._single_token_words(words[half:])

    def text(self, rng: random.Random, n_tokens: int) -> str:
        """A prompt of n_tokens tokens (exact once calibrated, with its special tokens)."""
        if self.lead is None:
            return self.words_text(rng, n_tokens - self.special)
        return " ".join([self.lead, *(rng.choice(self.words) for _ in range(n_tokens - self.special - 1))])

    def words_text(self, rng: random.Random, n_words: int) -> str:
        """Text inside a larger prompt (no special tokens of its own to subtract)."""
        return " ".join(rng.choice(self.words) for _ in range(max(1, n_words)))


class Workload:
    """An endless, seeded series of sessions (a session: requests sent one after another)."""

    name: str
    long_answers: bool
    max_tokens: int
    token_accurate: bool = True
    requests_per_session: int = 1
    cache_free: bool = True          # no two requests share a prefix (a cache hit means reused prompts)

    def session(self, builder: PromptBuilder, key: str, index: int) -> list[BenchRequest]:
        """Session `index` of a level; `key` seeds its words (the same key on every target)."""
        raise NotImplementedError


class PromptPreset(Workload):
    """One prompt of a fixed token length per session."""

    def __init__(self, name: str, preset: Preset, max_tokens: int | None) -> None:
        self.name, self.preset = name, preset
        self.long_answers = preset.long_answers
        self.max_tokens = max_tokens or preset.answer_tokens

    def session(self, builder: PromptBuilder, key: str, index: int) -> list[BenchRequest]:
        n = self.preset.prompt_tokens
        return [BenchRequest(prompt=builder.text(random.Random(key), n), max_tokens=self.max_tokens,
                             prompt_tokens=n if builder.exact else None)]


class ChatRag(Workload):
    """A conversation whose context grows by one retrieved passage per turn.

    Turn t sends the whole conversation so far (system, earlier passages and questions, and
    fixed synthetic answers), so consecutive turns share a growing prefix that a prefix
    cache can reuse; the session's turns go out one after another.
    """

    name = "chat-rag"
    long_answers = False
    requests_per_session = CHAT_RAG_TURNS
    cache_free = False

    def __init__(self, preset: Preset, max_tokens: int | None) -> None:
        self.preset = preset
        self.max_tokens = max_tokens or preset.answer_tokens

    def session(self, builder: PromptBuilder, key: str, index: int) -> list[BenchRequest]:
        rng = random.Random(key)
        messages: list[dict] = [{"role": "system", "content": _CHAT_SYSTEM}]
        requests = []
        for turn in range(CHAT_RAG_TURNS):
            passage = builder.words_text(rng, self.preset.prompt_tokens)
            question = builder.words_text(rng, _QUESTION_TOKENS)
            messages.append({"role": "user", "content": f"Passage {turn + 1}: {passage}\nQuestion: {question}?"})
            requests.append(BenchRequest(messages=tuple(dict(m) for m in messages), max_tokens=self.max_tokens))
            messages.append({"role": "assistant", "content": builder.words_text(rng, self.preset.answer_tokens)})
        return requests


class SharedPrefix(Workload):
    """Many users behind a few long system prompts (issue 16's routing workload).

    Session i is one user: system prompt i mod 16 (~1,000 tokens of words, the same on every
    target and level) and a short question of its own. The sessions cycle through the
    prompts, so each prompt's first request is the only one a prefix cache must compute in
    full: a server (or a router over replicas) that keeps each prompt's cache computes the
    rest's questions only; one whose caches cannot hold them all recomputes the prompts.
    """

    name = "shared-prefix"
    long_answers = False
    cache_free = False

    def __init__(self, preset: Preset, max_tokens: int | None) -> None:
        self.preset = preset
        self.max_tokens = max_tokens or preset.answer_tokens

    def session(self, builder: PromptBuilder, key: str, index: int) -> list[BenchRequest]:
        prompt = index % SHARED_PREFIXES
        system = builder.words_text(random.Random(f"shared-prefix/{prompt}"), self.preset.prompt_tokens)
        question = builder.words_text(random.Random(key), _QUESTION_TOKENS)
        return [BenchRequest(messages=({"role": "system", "content": system},
                                       {"role": "user", "content": f"{question}?"}), max_tokens=self.max_tokens)]


class JsonlPrompts(Workload):
    """The user's prompts, one JSON object a line: {"prompt": ...} or {"messages": [...]}, optional
    "max_tokens"; sessions cycle through the file in order."""

    long_answers = False
    token_accurate = False
    cache_free = False               # the user's prompts may share prefixes, and sessions cycle

    def __init__(self, path: str, max_tokens: int | None) -> None:
        self.name = f"jsonl:{path}"
        self.max_tokens = max_tokens or 128          # for lines that give none
        self.requests = _read_jsonl(Path(path).expanduser(), self.max_tokens)
        self.long_answers = max(r.max_tokens for r in self.requests) >= 256

    def session(self, builder: PromptBuilder, key: str, index: int) -> list[BenchRequest]:
        return [self.requests[index % len(self.requests)]]


def _read_jsonl(path: Path, default_max_tokens: int) -> list[BenchRequest]:
    if not path.is_file():
        raise BenchSetupError(f"--workload jsonl:{path}: no such file")
    requests = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise BenchSetupError(f"{path}:{number}: not JSON ({exc})") from None
        if not isinstance(item, dict) or (("prompt" in item) == ("messages" in item)):
            raise BenchSetupError(f"{path}:{number}: give exactly one of \"prompt\" or \"messages\"")
        max_tokens = item.get("max_tokens", default_max_tokens)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise BenchSetupError(f"{path}:{number}: max_tokens must be a positive integer")
        if "prompt" in item:
            if not isinstance(item["prompt"], str):
                raise BenchSetupError(f"{path}:{number}: \"prompt\" must be a string")
            requests.append(BenchRequest(prompt=item["prompt"], max_tokens=max_tokens))
        else:
            messages = item["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
                raise BenchSetupError(f"{path}:{number}: \"messages\" must be a list of {{\"role\", \"content\"}}")
            requests.append(BenchRequest(messages=tuple(messages), max_tokens=max_tokens))
    if not requests:
        raise BenchSetupError(f"{path}: no prompts in the file")
    return requests


def make_workload(spec: str, max_tokens: int | None) -> Workload:
    if spec.startswith("jsonl:"):
        return JsonlPrompts(spec[len("jsonl:"):], max_tokens)
    if spec == "chat-rag":
        return ChatRag(PRESETS[spec], max_tokens)
    if spec == "shared-prefix":
        return SharedPrefix(PRESETS[spec], max_tokens)
    if spec in PRESETS:
        return PromptPreset(spec, PRESETS[spec], max_tokens)
    raise BenchSetupError(f"--workload {spec!r}: choose one of {', '.join(WORKLOAD_NAMES)}")


def calibration_lengths(workload: Workload) -> tuple[int, ...]:
    """Prompt lengths to check a tokenizer on (the ones this workload builds)."""
    if isinstance(workload, PromptPreset):
        return (workload.preset.prompt_tokens,)
    return (64,)
