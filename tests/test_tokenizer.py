"""Tokenizer tests: SentencePiece trained here and a Hugging Face `tokenizers` BPE, checked by
value (round trips, exact ids, labels decoded back to the assistant's words, transformers'
apply_chat_template as the reference for chat rendering)."""
from __future__ import annotations

import json
import random
import re

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from minivlm.data.chat_template import CHATML, MINIVLM, template_from_jinja
from minivlm.data.hf_tokenizer import HFTokenizer, load_hf_tokenizer
from minivlm.data.sentencepiece_tokenizer import SentencePieceTokenizer, train_sentencepiece
from minivlm.data.load_tokenizer import load_tokenizer

CHATML_JINJA = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# SmolLM2-Instruct's template, as in its tokenizer_config.json (a hard-coded default system prompt).
SMOLLM2_JINJA = ("{% for message in messages %}"
                 "{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by "
                 "Hugging Face<|im_end|>\\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\\n' "
                 "+ message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
                 "{% if add_generation_prompt"
                 " %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

TEXTS = [
    "A small red circle is in the top left of the image.",
    "How many  blue shapes are there?\nThere are 3.",
    "Ünïcödé: café, naïve, 日本語, emoji 🙂🚀 and tabs\tend",
    "<image> What colour is the triangle?",
    "Sure, it is [SEG].",
    "left<image>right [SEG][SEG] <image>\n<image>",
    " leading space and trailing space ",
]
CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "<image>\nWhat colour is the square?"},
    {"role": "assistant", "content": "The square is red."},
    {"role": "user", "content": "Segment the star."},
    {"role": "assistant", "content": "Sure, it is [SEG]."},
]


def shapes_corpus(num_lines: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "white"]
    shapes = ["circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart"]
    places = ["top left", "top right", "bottom left", "bottom right", "centre", "left", "right"]
    lines = []
    for _ in range(num_lines):
        colour, shape, place = rng.choice(colours), rng.choice(shapes), rng.choice(places)
        lines.append(rng.choice([
            f"A {rng.choice(['small', 'large'])} {colour} {shape} is in the {place} of the image.",
            f"How many {colour} shapes are there? There are {rng.randrange(1, 10)}.",
            f"What colour is the {shape}? It is {colour}.",
            f"The {shape} has the same colour as the {rng.choice(shapes)}; both are {colour}.",
        ]))
    return lines


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sp")
    train_sentencepiece(shapes_corpus(3000), out_dir, vocab_size=400)
    return out_dir


@pytest.fixture(scope="module")
def sp_tok(sp_dir):
    return load_tokenizer(sp_dir)


def train_byte_level_bpe() -> tokenizers.Tokenizer:
    """A GPT-2-style byte-level BPE with ChatML markers, like SmolLM2's tokenizer in miniature."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(shapes_corpus(3000), trainer)
    return backend


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("hf")
    train_byte_level_bpe().save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "chat_template": SMOLLM2_JINJA}))
    return out_dir


def expected_chat(tok, turns, add_generation_prompt=False):
    """Ids and labels built turn by turn from the template's pieces: the specification."""
    template = tok.template
    if template.default_system_prompt is not None and turns[0]["role"] != "system":
        turns = [{"role": "system", "content": template.default_system_prompt}] + turns
    ids, labels = [], []
    for turn in turns:
        prefix = tok.encode(template.role_prefixes[turn["role"]])
        body = tok.encode(turn["content"] + template.end_of_turn)
        after = tok.encode(template.after_turn)
        ids += prefix + body + after
        trained = body if turn["role"] == "assistant" else [-100] * len(body)
        labels += [-100] * len(prefix) + trained + [-100] * len(after)
    if add_generation_prompt:
        prompt = tok.encode(template.generation_prompt)
        ids, labels = ids + prompt, labels + [-100] * len(prompt)
    return ids, labels


def labelled_texts(tok, ids, labels):
    """Decoded runs of consecutive labelled positions (one per assistant turn)."""
    runs, run = [], []
    for token_id, label in zip(ids, labels):
        if label != -100:
            assert label == token_id
            run.append(token_id)
        elif run:
            runs.append(tok.decode(run, skip_special=False))
            run = []
    return runs + ([tok.decode(run, skip_special=False)] if run else [])


# ---- SentencePiece ----
def test_sentencepiece_special_ids(sp_tok):
    assert isinstance(sp_tok, SentencePieceTokenizer)
    assert (sp_tok.pad_id, sp_tok.bos_id, sp_tok.eos_id) == (0, 1, 2)
    assert (sp_tok.image_token_id, sp_tok.seg_token_id) == (4, 5)
    assert sp_tok.vocab_size == 400
    end_id = sp_tok.token_to_id("<|end|>")
    assert sp_tok.stop_token_ids == [end_id, 2]
    assert sp_tok.encode("<image>") == [4]
    assert sp_tok.encode("[SEG]") == [5]
    for marker in MINIVLM.special_tokens:
        assert sp_tok.encode(marker) == [sp_tok.token_to_id(marker)]


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_round_trip(sp_tok, text):
    ids = sp_tok.encode(text)
    assert sp_tok.decode(ids) == text
    assert ids.count(sp_tok.image_token_id) == text.count("<image>")
    assert ids.count(sp_tok.seg_token_id) == text.count("[SEG]")
    # Markers split the text: the pieces around them encode on their own, with no extra "▁".
    pieces = re.split(r"(<image>|\[SEG\])", text)
    assert ids == [i for piece in pieces for i in sp_tok.encode(piece)]


def test_sentencepiece_offsets(sp_tok):
    text = TEXTS[2] + "<image>" + TEXTS[0]
    ids, starts = sp_tok.encode_with_offsets(text)
    assert ids == sp_tok.encode(text)
    assert starts == sorted(starts) and starts[0] == 0
    # Tokens sharing a start (the UTF-8 bytes of one character) decode to text[start:next_start].
    boundaries = sorted(set(starts)) + [len(text)]
    for start, next_start in zip(boundaries, boundaries[1:]):
        group = [i for i, s in zip(ids, starts) if s == start]
        assert sp_tok.decode(group, skip_special=False) == text[start:next_start]


def test_sentencepiece_save_load(sp_tok, sp_dir, tmp_path):
    config = json.loads((sp_dir / "tokenizer_config.json").read_text())
    assert config["minivlm"]["kind"] == "sentencepiece"
    sp_tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    for name in ("pad_id", "bos_id", "eos_id", "image_token_id", "seg_token_id", "vocab_size",
                 "stop_token_ids", "special_token_ids"):
        assert getattr(loaded, name) == getattr(sp_tok, name), name
    assert loaded.template == sp_tok.template
    assert [loaded.encode(t) for t in TEXTS] == [sp_tok.encode(t) for t in TEXTS]


def test_sentencepiece_corpus_too_small(tmp_path):
    corpus = shapes_corpus(20)
    with pytest.raises(ValueError, match=r"vocab_size=5000") as error:
        train_sentencepiece(corpus, tmp_path, vocab_size=5000)
    limit = int(re.search(r"at most (\d+)", str(error.value))[1])
    assert limit < 5000
    assert train_sentencepiece(corpus, tmp_path, vocab_size=limit).vocab_size == limit
    with pytest.raises(ValueError, match="empty"):
        train_sentencepiece([], tmp_path)


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_sentencepiece_encode_chat(sp_tok, add_generation_prompt):
    ids, labels = sp_tok.encode_chat(CONVERSATION, add_generation_prompt)
    # Whole rendered string == turn by turn (every boundary of the minivlm template is a marker).
    assert ids == sp_tok.encode(sp_tok.render_chat(CONVERSATION, add_generation_prompt))
    assert (ids, labels) == expected_chat(sp_tok, CONVERSATION, add_generation_prompt)
    assert labelled_texts(sp_tok, ids, labels) == ["The square is red.<|end|>",
                                                   "Sure, it is [SEG].<|end|>"]
    assert sp_tok.render_chat(CONVERSATION[1:3]) == (
        "<|user|><image>\nWhat colour is the square?<|end|><|assistant|>The square is red.<|end|>")
    assert sp_tok.decode(ids) == ("Answer briefly.<image>\nWhat colour is the square?The square is "
                                  "red.Segment the star.Sure, it is [SEG].")
    prompt_ids, prompt_labels = sp_tok.encode_chat(CONVERSATION[:2], add_generation_prompt=True)
    assert prompt_ids[-1] == sp_tok.token_to_id("<|assistant|>")
    assert set(prompt_labels) == {-100}


def test_bad_turn_is_named():
    with pytest.raises(ValueError, match=r"chat turn 1: .*'gpt'"):
        MINIVLM.render([{"role": "user", "content": "hi"}, {"role": "gpt", "content": "x"}])


# ---- Hugging Face tokenizer.json ----
def test_hf_adds_markers_and_matches_tokenizers(hf_dir):
    reference = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    tok = load_hf_tokenizer(hf_dir)
    assert isinstance(tok, HFTokenizer) and tok.template.name == "chatml"
    assert tok.template.default_system_prompt == (
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    assert tok.num_added_tokens == 2
    assert tok.vocab_size == reference.get_vocab_size() + 2
    assert (tok.image_token_id, tok.seg_token_id) == (reference.get_vocab_size(),
                                                      reference.get_vocab_size() + 1)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
    assert tok.stop_token_ids == [2]
    assert tok.encode("<image>") == [tok.image_token_id]
    assert tok.encode("[SEG]") == [tok.seg_token_id]
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
        if "<image>" not in text and "[SEG]" not in text:
            assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode("<|im_start|>user\nhi<|im_end|>")) == "user\nhi"
    # A second load of the saved tokenizer adds nothing and keeps every id.
    tok.save(hf_dir / "saved")
    again = load_tokenizer(hf_dir / "saved")
    assert again.num_added_tokens == 0 and again.template == tok.template
    assert (again.image_token_id, again.seg_token_id, again.vocab_size) == (
        tok.image_token_id, tok.seg_token_id, tok.vocab_size)


@pytest.mark.parametrize("jinja, turns", [(CHATML_JINJA, CONVERSATION),
                                          (SMOLLM2_JINJA, CONVERSATION[1:])])
def test_hf_chatml_matches_transformers(hf_dir, jinja, turns):
    from transformers import PreTrainedTokenizerFast

    # The fixture's config holds SmolLM2's template; CHATML_JINJA is plain ChatML.
    tok = load_hf_tokenizer(hf_dir, chat_template=template_from_jinja(jinja))
    assert (tok.template == CHATML) == (jinja == CHATML_JINJA)
    reference = PreTrainedTokenizerFast(tokenizer_object=tok.backend)
    reference.chat_template = jinja
    for add_generation_prompt in (False, True):
        ids, labels = tok.encode_chat(turns, add_generation_prompt)
        text = reference.apply_chat_template(turns, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
        assert tok.render_chat(turns, add_generation_prompt) == text
        expected = reference.apply_chat_template(turns, tokenize=True, return_dict=True,
                                                 add_generation_prompt=add_generation_prompt)
        assert ids == expected["input_ids"]
        # For this byte-level BPE, "assistant\n" and the answer tokenise apart: labels by offsets
        # equal the turn-by-turn specification.
        assert (ids, labels) == expected_chat(tok, turns, add_generation_prompt)
        assert labelled_texts(tok, ids, labels) == ["The square is red.<|im_end|>",
                                                    "Sure, it is [SEG].<|im_end|>"]


@pytest.mark.parametrize("template", ["minivlm", "chatml"])
def test_saved_hf_dir_loads_in_transformers(hf_dir, tmp_path, template):
    from transformers import AutoTokenizer

    tok = load_hf_tokenizer(hf_dir, chat_template=template)
    assert tok.num_added_tokens == (6 if template == "minivlm" else 2)
    tok.save(tmp_path)
    reference = AutoTokenizer.from_pretrained(tmp_path)
    for add_generation_prompt in (False, True):
        expected = reference.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                                 add_generation_prompt=add_generation_prompt)
        assert tok.encode_chat(CONVERSATION, add_generation_prompt)[0] == expected["input_ids"]


def test_template_from_jinja():
    assert template_from_jinja(CHATML_JINJA) == CHATML
    # GGUF metadata stores the same template with raw newlines instead of "\n" escapes.
    from_gguf = template_from_jinja(SMOLLM2_JINJA.replace("\\n", "\n"))
    assert from_gguf == template_from_jinja(SMOLLM2_JINJA)
    assert from_gguf.default_system_prompt.startswith("You are a helpful AI assistant")
    assert template_from_jinja("{{ bos_token }}[INST] ...") is None
    assert template_from_jinja(None) is None


def test_vocab_too_small_for_the_characters_is_a_clear_error(tmp_path):
    texts = [f"text {chr(0x4e00 + i)} number {i}" for i in range(400)]  # 400 distinct characters
    with pytest.raises(ValueError, match=r"vocab_size=300 is too small: .* at least \d+ pieces"):
        train_sentencepiece(texts, tmp_path, vocab_size=300)
