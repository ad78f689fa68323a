import pytest

from recbole_llmser.augment.matching import MatchResult, apply_fallback, match_answer
from recbole_llmser.errors import LLMSeRError

TITLES = ["Blue Hat", "Red Shoe", "Green Scarf", "Yellow Coat", "Black Leather Belt", "White Cotton T-Shirt"]


def match(text, want=3, **kw):
    return match_answer(text, TITLES, want, **kw)


@pytest.mark.parametrize("text, indices", [
    ('{"items": [2, 1, 4]}', [1, 0, 3]),
    ('{"item": 5}', [4]),
    ('{"item": "5"}', [4]),
    ("[3, 1, 2]", [2, 0, 1]),
    ('Sure! Here you go:\n```json\n{"items": [6, 5, 4]}\n```\nHope it helps.', [5, 4, 3]),
    ('My answer is {"items": [1, 2, 3]} as requested.', [0, 1, 2]),
    ("3, 4 and 6", [2, 3, 5]),
    ("Answer: #2, #5, #1", [1, 4, 0]),
    ("1.\n2.\n4.", [0, 1, 3]),
    ("I'd pick [3] and [4]", [2, 3]),
    ('{"items": [{"number": 2, "title": "Red Shoe"}, {"id": 3}]}', [1, 2]),
    ('{"ITEMS": [2.0, 3]}', [1, 2]),
    ("1. 4\n2. 2", [3, 1]),  # a ranked list of numbers: rank 1 -> candidate 4
])
def test_numbers(text, indices):
    result = match(text)
    assert result.indices == indices and result.method == "numbers"
    assert result.status == ("ok" if len(indices) >= 3 else "partial")


def test_numbered_echo_of_titles_maps_via_the_number_or_the_title():
    echo = match("1. Blue Hat\n2. Red Shoe\n3. Green Scarf")
    assert echo.indices == [0, 1, 2] and echo.status == "ok"
    ranked = match("1. Yellow Coat\n2. Blue Hat\n3) Red Shoe")  # a ranked list of titles
    assert ranked.indices == [3, 0, 1] and ranked.method == "titles"
    unknown = match("1. Something else entirely\n5. Also unknown", want=2)
    assert unknown.indices == [0, 4] and unknown.method == "numbers"


def test_titles_exact_prefix_and_fuzzy():
    assert match('{"items": ["red shoe", "  GREEN   scarf ", "Blue Hat."]}').indices == [1, 2, 0]
    prose = match('- Yellow Coat: warm, fits the history\n- Black Leather Belt - a classic', want=2)
    assert prose.indices == [3, 4] and prose.method == "titles"
    fuzzy = match('"Yelow Coat" and "White Coton T-Shirt"', want=2)
    assert fuzzy.indices == [3, 5] and fuzzy.method == "titles"
    assert match('"Yelow Coat"', want=1, fuzzy_cutoff=0.99).status == "hallucinated"
    assert match("Green Scarf", want=1).indices == [2]


def test_mixed_numbers_and_titles():
    result = match('{"items": [2, "Green Scarf", 9]}')
    assert result.indices == [1, 2] and result.method == "numbers+titles" and result.n_hallucinated == 1


def test_same_title_twice_maps_to_both_candidates():
    titles = ["Mug", "Mug", "Plate"]
    assert match_answer('{"items": ["Mug", "Mug"]}', titles, 2).indices == [0, 1]


def test_semantic_callable_for_the_rest():
    calls = []

    def semantic(strings, candidates):
        calls.append(list(strings))
        return [1 if "footwear" in s else None for s in strings]

    result = match('{"items": [3, "crimson footwear", "a spaceship"]}', semantic=semantic)
    assert calls == [["crimson footwear", "a spaceship"]]
    assert result.indices == [2, 1] and result.method == "numbers+semantic" and result.n_hallucinated == 1
    assert result.status == "partial"


@pytest.mark.parametrize("bad", [[99], [-1], [True], ["1"], [None]])
def test_semantic_answers_are_range_checked(bad):
    result = match('{"items": ["crimson footwear"]}', want=1, semantic=lambda s, c: bad)
    assert result.indices == [] and result.status == "hallucinated"


def test_semantic_numpy_indices_are_accepted():
    np = pytest.importorskip("numpy")
    result = match('{"items": ["crimson footwear"]}', want=1, semantic=lambda s, c: [np.int64(1)])
    assert result.indices == [1] and type(result.indices[0]) is int


def test_semantic_returning_too_few_answers():
    result = match('{"items": ["a", "b"]}', want=2, semantic=lambda s, c: [0])
    assert result.indices == [0] and result.n_hallucinated == 1


@pytest.mark.parametrize("text", [
    "I'm sorry, I can't help with that.",
    "I’m sorry, but I cannot determine that.",
    "As an AI language model, I do not have access to user data.",
])
def test_refusal(text):
    result = match(text)
    assert result.status == "refusal" and result.indices == []


def test_refusal_with_an_answer_is_an_answer():
    assert match("I'm sorry for the wait: 1, 2, 3").status == "ok"


def test_out_of_range_numbers_are_hallucinated_never_returned():
    result = match('{"items": [0, 7, 100]}')
    assert result.indices == [] and result.status == "hallucinated" and result.n_hallucinated == 3
    partial = match('{"items": [7, 2]}')
    assert partial.indices == [1] and partial.n_hallucinated == 1 and partial.status == "partial"
    titles = match('{"items": ["Imaginary Gadget", "Phantom Widget"]}')
    assert titles.status == "hallucinated" and titles.n_hallucinated == 2


@pytest.mark.parametrize("text", [None, "", "   ", "hello there", '{"items": []}', '{"foo": 1, "bar": 2}'])
def test_malformed(text):
    assert match(text).status == "malformed"


def test_duplicates_keep_first_and_picks_are_capped_at_want():
    result = match('{"items": [2, 2, 1, 2, 3, 4, 5]}')
    assert result.indices == [1, 0, 2] and result.status == "ok"


def test_indices_never_leave_the_candidates_on_random_junk():
    import random

    rng = random.Random(0)
    alphabet = '0123456789 ,.-[]{}":abcxyz\n#'
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        result = match(text)
        assert all(isinstance(i, int) and 0 <= i < len(TITLES) for i in result.indices)
        assert len(result.indices) == len(set(result.indices)) <= 3


def test_fallback_policies():
    partial = match('{"items": [3]}')
    assert apply_fallback(partial, len(TITLES), 3, "skip") is None
    filled = apply_fallback(partial, len(TITLES), 3, "ccg_order")
    assert filled.indices == [2, 0, 1] and filled.fallback == "ccg_order" and filled.n_filled == 2
    assert filled.status == "partial"  # what the LLM did is still on record
    refused = apply_fallback(match("I'm sorry"), len(TITLES), 2, "ccg_order")
    assert refused.indices == [0, 1] and refused.status == "refusal" and refused.n_filled == 2
    ok = match('{"items": [1, 2, 3]}')
    assert apply_fallback(ok, len(TITLES), 3, "skip") is ok and apply_fallback(ok, len(TITLES), 3, "ccg_order") is ok
    small = apply_fallback(MatchResult([], "malformed"), 2, 5, "ccg_order")
    assert small.indices == [0, 1]
    assert apply_fallback(MatchResult([1], "partial"), 2, 5, "skip") is None
    with pytest.raises(LLMSeRError, match="ccg_order"):
        apply_fallback(partial, len(TITLES), 3, "random")
