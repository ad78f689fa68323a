import json
import re

import pytest

from recbole_llmser.augment import prompts
from recbole_llmser.augment.prompts import (
    ARV_TEMPLATE_VERSION, SNF_TEMPLATE_VERSION, arv_messages, arv_schema, snf_messages, snf_schema,
)
from recbole_llmser.errors import LLMSeRError
from recbole_llmser.item_text import capped_title

HISTORY = ["Red Summer Dress", "Blue Denim Jacket"]
CANDIDATES = [f"Item title {i}" for i in range(1, 21)]


def user_text(messages):
    assert [m["role"] for m in messages] == ["system", "user"]
    return messages[1]["content"]


def test_template_versions():
    assert SNF_TEMPLATE_VERSION == "snf-v1" and ARV_TEMPLATE_VERSION == "arv-v1"


def test_snf_prompt_is_deterministic_and_numbered():
    messages = snf_messages(HISTORY, CANDIDATES, 15)
    assert messages == snf_messages(list(HISTORY), list(CANDIDATES), 15)
    assert json.dumps(messages) == json.dumps(snf_messages(HISTORY, CANDIDATES, 15))
    text = user_text(messages)
    numbered = re.findall(r"^(\d+)\. (.+)$", text, re.MULTILINE)
    assert numbered == [(str(i), title) for i, title in enumerate(CANDIDATES, start=1)]
    history = re.findall(r"^- (.+)$", text, re.MULTILINE)
    assert history == HISTORY  # oldest first, and not numbered (numbers only ever mean candidates)
    assert "Choose exactly 15" in text and '{"items": [' in text and "before or alongside" in text
    assert snf_messages(HISTORY, CANDIDATES, 12) != messages


def test_arv_prompt_asks_for_one_item():
    text = user_text(arv_messages(HISTORY, CANDIDATES[:10]))
    assert re.findall(r"^(\d+)\. ", text, re.MULTILINE) == [str(i) for i in range(1, 11)]
    assert '{"item": ' in text and '"items"' not in text and "ONE" in text
    assert arv_messages(HISTORY, CANDIDATES[:10]) == arv_messages(HISTORY, CANDIDATES[:10])


def test_titles_are_flattened_to_one_line_in_prompts():
    text = user_text(snf_messages(["multi\nline\ttitle"], ["a\n2. fake line", "", "x\u200by"], 1))
    assert "- multi line title" in text
    assert "1. a 2. fake line" in text and f"2. {prompts.UNTITLED}" in text and "3. xy" in text
    assert "- (no items yet)" in user_text(arv_messages([], ["a"]))


def test_schemas():
    snf = snf_schema(15, 20)
    assert snf["name"] == "snf_answer" and snf["strict"] is True
    items = snf["schema"]["properties"]["items"]
    assert items["minItems"] == items["maxItems"] == 15 and items["items"]["maximum"] == 20
    assert snf["schema"]["required"] == ["items"] and snf["schema"]["additionalProperties"] is False
    assert snf_schema(15, 10)["schema"]["properties"]["items"]["maxItems"] == 10
    arv = arv_schema(10)
    assert arv["name"] == "arv_answer" and arv["schema"]["properties"]["item"]["maximum"] == 10
    assert arv["schema"]["required"] == ["item"]


def test_capped_title():
    assert capped_title("  Hello\n\t world\x00! ") == "Hello world !"
    assert capped_title("Zero\u200bwidth") == "Zerowidth"
    assert capped_title(None, fallback="item 7") == "item 7"
    assert capped_title(float("nan"), fallback="item 7") == "item 7"
    assert capped_title(" \n\x07 ", fallback="item 7") == "item 7"
    long = "word " * 40
    capped = capped_title(long, max_chars=30)
    assert len(capped) <= 30 and capped.endswith("…") and capped == "word word word word word…"
    one_long_word = "x" * 50
    assert capped_title(one_long_word, max_chars=10) == "x" * 9 + "…"
    assert capped_title("exactly ten", max_chars=11) == "exactly ten"
    assert capped_title(capped_title(long, max_chars=30), max_chars=30) == capped  # idempotent


def test_bad_inputs_are_clear_errors():
    with pytest.raises(LLMSeRError, match="candidate"):
        snf_messages(HISTORY, [], 3)
    with pytest.raises(LLMSeRError, match="integer >= 1"):
        snf_messages(HISTORY, CANDIDATES, 0)


def test_expected_answer_tokens_grows_with_picks():
    assert prompts.expected_answer_tokens(1) < prompts.expected_answer_tokens(15)
