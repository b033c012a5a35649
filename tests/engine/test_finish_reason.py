"""FinishReason is a str enum: the dialects compare and serialize it as the plain strings of
their wire formats, so it must behave as exactly those strings."""
from __future__ import annotations

import json
from typing import Literal

import pydantic

from shoal.engine.request import FinishReason, RequestStatus


def test_the_values_are_the_wire_strings() -> None:
    assert [reason.value for reason in FinishReason] == ["stop", "length", "abort"]
    assert FinishReason.STOP == "stop" and FinishReason.ABORT != "stop"
    assert f"{FinishReason.LENGTH}" == str(FinishReason.LENGTH) == "length"
    assert {"abort": 1}[FinishReason.ABORT] == 1          # hashes as its string


def test_json_and_pydantic_see_a_plain_string() -> None:
    assert json.dumps({"finish_reason": FinishReason.STOP}) == '{"finish_reason": "stop"}'

    class Choice(pydantic.BaseModel):
        finish_reason: Literal["stop", "length", "abort"] | None

    choice = Choice(finish_reason=FinishReason.LENGTH)
    assert choice.model_dump_json() == '{"finish_reason":"length"}'
    assert json.loads(choice.model_dump_json())["finish_reason"] == "length"


def test_every_finished_status_maps_to_its_reason() -> None:
    assert RequestStatus.FINISHED_STOPPED.finish_reason is FinishReason.STOP
    assert RequestStatus.FINISHED_LENGTH.finish_reason is FinishReason.LENGTH
    assert RequestStatus.FINISHED_ABORTED.finish_reason is FinishReason.ABORT
    for status in (RequestStatus.WAITING, RequestStatus.RUNNING, RequestStatus.PREEMPTED):
        assert status.finish_reason is None
