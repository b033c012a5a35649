"""The <think> parser: whole outputs, every two- and three-way chunk split, prompts that open
the thinking, and detection from the template and vocabulary."""
from __future__ import annotations

import pytest

from shoal.text.reasoning import (ReasoningFormat, ReasoningParser, detect_reasoning,
                                  prompt_opens_thinking, split_reasoning)

FMT = ReasoningFormat()

CASES = [
    # (output, starts inside thinking, thinking, content)
    ("<think>\nLet me see.\n</think>\n\nParis.", False, "Let me see.", "Paris."),
    ("\n<think>a  b</think>c", False, "a  b", "c"),
    ("Paris.", False, "", "Paris."),
    ("  Paris <think> late", False, "", "  Paris <think> late"),
    ("<think>never closed", False, "never closed", ""),
    ("<thin", False, "", "<thin"),
    ("Let me see.\n</think>\n\nParis.", True, "Let me see.", "Paris."),
    ("still thinking </thi", True, "still thinking </thi", ""),
    ("a</think>b</think>c", True, "a", "b</think>c"),
    ("<think></think>", False, "", ""),
    ("", False, "", ""),
]


@pytest.mark.parametrize("text,inside,thinking,content", CASES)
def test_whole_output(text: str, inside: bool, thinking: str, content: str) -> None:
    assert split_reasoning(text, FMT, inside) == (thinking, content)


@pytest.mark.parametrize("text,inside,thinking,content", CASES)
def test_every_chunk_split_gives_the_same_result(text: str, inside: bool, thinking: str,
                                                  content: str) -> None:
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            parser = ReasoningParser(FMT, inside)
            deltas = [parser.feed(text[:i]), parser.feed(text[i:j]), parser.feed(text[j:]),
                      parser.finish()]
            assert "".join(d[0] for d in deltas) == thinking, (i, j)
            assert "".join(d[1] for d in deltas) == content, (i, j)


def test_thinking_streams_before_the_end_tag() -> None:
    # deltas flow while the model thinks: only a possible tag start or whitespace is held
    parser = ReasoningParser(FMT, in_thinking=True)
    assert parser.feed("one two") == ("one two", "")
    assert parser.feed(" three </") == (" three", "")
    assert parser.feed("think>\n\nok") == ("", "ok")
    assert parser.thinking_done


def test_prompt_opens_thinking() -> None:
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n", FMT)
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n", FMT)
    assert not prompt_opens_thinking("<|im_start|>assistant\n", FMT)


def test_detection_needs_the_template_and_the_tokens() -> None:
    vocab = {"<think>": 5, "</think>": 6}.get
    assert detect_reasoning("{{ x.split('</think>') }}", vocab) == ReasoningFormat()
    qwen = detect_reasoning("{% if enable_thinking %}</think>{% endif %}", vocab)
    assert qwen is not None and qwen.switch == "enable_thinking"
    assert detect_reasoning("{{ reasoning_effort }}</think>", vocab).takes_effort
    assert detect_reasoning("no tags here", vocab) is None
    assert detect_reasoning("</think>", {}.get) is None          # tags not in the vocabulary
    assert detect_reasoning(None, vocab) is None
