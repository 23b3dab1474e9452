"""Errors the Python API gives for inputs of the wrong shape: a ParallaxError naming the fix,
never a raw TypeError from deep inside."""

from __future__ import annotations

import pytest

import parallax

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    with parallax.LLM(tiny_llama) as llm:
        yield llm


@pytest.mark.parametrize("prompts", [CONVERSATION, [CONVERSATION, CONVERSATION]],
                         ids=["one conversation", "two conversations"])
def test_chat_messages_passed_to_generate_point_to_chat(llm, prompts):
    """Chat messages (dicts with role and content) are not prompts: generate says to use
    LLM.chat instead of failing in int()."""
    with pytest.raises(parallax.PromptError, match=r"LLM\.chat"):
        llm.generate(prompts, max_new_tokens=2)


def test_chat_messages_passed_to_stream_point_to_chat(llm):
    with pytest.raises(parallax.PromptError, match=r"LLM\.chat"):
        next(iter(llm.stream(CONVERSATION, max_new_tokens=2)))
