"""LangChain's ChatOpenAI and ChatOllama against a real `shoal serve`: only the base URL changes."""
from __future__ import annotations

from langchain_core.messages import HumanMessage, SystemMessage
from langchain_ollama import ChatOllama
from langchain_openai import ChatOpenAI

MESSAGES = [SystemMessage("You answer in one short sentence."), HumanMessage("What is a river?")]


def test_chat_openai_invoke_and_stream(shoal_server) -> None:
    llm = ChatOpenAI(base_url=shoal_server.url + "/v1", api_key="unused", model="smollm2",
                     temperature=0, max_tokens=16, max_retries=0)
    reply = llm.invoke(MESSAGES)
    assert reply.content and reply.usage_metadata["output_tokens"] <= 16
    assert reply.usage_metadata["input_tokens"] > 10
    assert "".join(chunk.content for chunk in llm.stream(MESSAGES)) == reply.content


def test_chat_ollama_invoke_and_stream(shoal_server) -> None:
    llm = ChatOllama(base_url=shoal_server.url, model="smollm2", temperature=0, num_predict=16)
    reply = llm.invoke(MESSAGES)
    assert reply.content and reply.usage_metadata["output_tokens"] <= 16
    assert reply.response_metadata["done_reason"] in ("stop", "length")
    assert "".join(chunk.content for chunk in llm.stream(MESSAGES)) == reply.content
