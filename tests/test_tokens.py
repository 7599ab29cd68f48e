import pytest

from persres.errors import ConceptNotFound, PromptError
from persres.tokens import BoundConcept, concept_positions, expand_prompt, identifier_candidates, split_concept_option
from persres.toy.build import build_tokenizer

DOG = BoundConcept("mydog", "sks", "dog")
CAT = BoundConcept("mycat", "zwx", "cat")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def lookup(name):
    known = {"mydog": DOG, "mycat": CAT}
    if name not in known:
        raise ConceptNotFound(f"unknown concept {name!r}")
    return known[name]


def test_identifier_and_class_word_tokens(tok):
    prompt = "a photo of a sks circle"
    pos = concept_positions(tok, prompt, "sks", "circle")
    ids = tok(prompt).input_ids
    assert tok.convert_ids_to_tokens([ids[p] for p in pos]) == ["sks</w>", "circle</w>"]


def test_multi_token_class_word_owns_all_its_tokens(tok):
    # the toy tokenizer does not know "plushie": it splits into pieces
    n = len(tok("plushie", add_special_tokens=False).input_ids)
    assert n > 1
    pos = concept_positions(tok, "a sks plushie on a red background", "sks", "plushie")
    assert pos == tuple(range(2, 2 + 1 + n))


def test_identifier_without_its_class_word(tok):
    assert concept_positions(tok, "a sks on the beach", "sks", "dog") == (2,)


def test_absent_identifier_is_an_error(tok):
    with pytest.raises(PromptError, match="does not contain"):
        concept_positions(tok, "a red circle", "sks", "circle")


def test_concept_cut_off_by_the_token_limit_is_an_error(tok):
    long = " ".join(["red"] * 40) + " sks circle"
    with pytest.raises(PromptError, match="cut off"):
        concept_positions(tok, long, "sks", "circle")
    concept_positions(tok, "sks circle " + " ".join(["red"] * 40), "sks", "circle")  # early enough: fine


@pytest.mark.parametrize(
    "prompt,given,expected,used",
    [
        ("a V1 dog and a V2 cat", [DOG, CAT], "a sks dog and a zwx cat", ["mydog", "mycat"]),
        ("a V2 cat and a V1 dog", [DOG, CAT], "a zwx cat and a sks dog", ["mycat", "mydog"]),
        ("a V* dog on the beach", [DOG], "a sks dog on the beach", ["mydog"]),
        ("a <mycat> cat", [], "a zwx cat", ["mycat"]),
        ("a <mydog> dog with a V1 cat", [CAT], "a sks dog with a zwx cat", ["mydog", "mycat"]),
        ("a sks dog", [DOG], "a sks dog", ["mydog"]),
        ("VV1 and V10x stay", [], "VV1 and V10x stay", []),
    ],
)
def test_expand_prompt(prompt, given, expected, used):
    text, concepts = expand_prompt(prompt, given, lookup)
    assert text == expected
    assert [c.name for c in concepts] == used


@pytest.mark.parametrize(
    "prompt,given,error,match",
    [
        ("a V2 cat", [DOG], PromptError, "V2 is not bound"),
        ("a V* dog", [DOG, CAT], PromptError, "exactly one"),
        ("a V* dog", [], PromptError, "exactly one"),
        ("a <nobody> dog", [], ConceptNotFound, "nobody"),
        ("a V1 dog", [DOG, CAT], PromptError, "'mycat' is not in the prompt"),
    ],
)
def test_expand_prompt_errors(prompt, given, error, match):
    with pytest.raises(error, match=match):
        expand_prompt(prompt, given, lookup)


def test_strengths_in_the_prompt_and_on_c():
    from dataclasses import replace

    _, used = expand_prompt("a <mydog:0.5> dog and a <mycat> cat", [], lookup)
    assert [(c.name, c.strength) for c in used] == [("mydog", 0.5), ("mycat", 1.0)]
    _, used = expand_prompt("a V1 dog with a <mydog> hat", [replace(DOG, strength=1.5)], lookup)
    assert [(c.name, c.strength) for c in used] == [("mydog", 1.5)]  # <name> of a -c concept keeps its -c strength
    assert split_concept_option("mydog:0.25") == ("mydog", 0.25) and split_concept_option("mydog") == ("mydog", 1.0)


@pytest.mark.parametrize(
    "prompt,given,match",
    [
        ("a <mydog:0.5> dog and a <mydog:0.8> dog", [], "strengths 0.5 and 0.8"),
        ("a <mydog:0.5> dog", [DOG], "strengths 0.5 and 1"),
        ("a <mydog:2.5> dog", [], "from 0 to 2"),
        ("a <mydog:-1> dog", [], "from 0 to 2"),
        ("a <mydog:nan> dog", [], "from 0 to 2"),
        ("a <mydog:x> dog", [], "got 'x'"),
        ("a <mydog:> dog", [], "got ''"),
    ],
)
def test_bad_strengths_are_prompt_errors(prompt, given, match):
    with pytest.raises(PromptError, match=match):
        expand_prompt(prompt, given, lookup)
    with pytest.raises(PromptError, match="from 0 to 2"):
        split_concept_option("mydog:inf")


def test_identifier_candidates_are_distinct():
    it = identifier_candidates()
    first = [next(it) for _ in range(30)]
    assert len(set(first)) == 30 and first[0] == "sks"
