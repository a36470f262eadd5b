"""Loss masks, BOS/EOS policy, the prompt/target boundary, chat templates (tagged, untagged, no EOS)."""

from __future__ import annotations

import pytest

from lorafuse.data.formats import Sample
from lorafuse.data.tokenize import IGNORE, bos_prefix, tokenize_samples

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def trained(tok, ids, labels):
    return [t for t, lab in zip(ids, labels) if lab != IGNORE]


def test_plain_masks_prompt_trains_output_and_eos_bos_once(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = "### Instruction:\nTranslate\n\n### Input:\n猫\n\n### Response:\n"
    out = tokenize_samples([Sample(chunks=[(prompt, "cat")])], tok, "plain", 512)
    ids, labels = out.input_ids[0], out.labels[0]
    assert ids == [tok.bos_token_id] + ids_of(tok, prompt + "cat") + [tok.eos_token_id]
    assert ids.count(tok.bos_token_id) == 1 and ids.count(tok.eos_token_id) == 1
    n_prompt = 1 + len(ids_of(tok, prompt))
    assert ids[1:n_prompt] == ids_of(tok, prompt)  # the prompt tokens are the inference prompt's tokens
    assert all(lab == IGNORE for lab in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(trained(tok, ids, labels)) == "cat</s>"
    assert out.boundary_fixes == 0


def test_eos_not_doubled_when_the_target_already_ends_with_it(tiny_tokenizer):
    out = tokenize_samples([Sample(chunks=[("Q:\n", "A</s>")])], tiny_tokenizer, "plain", 512)
    assert out.input_ids[0].count(tiny_tokenizer.eos_token_id) == 1


def test_bpe_merge_across_the_boundary_keeps_the_inference_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt, target = "Answer: ", "the"
    joint = ids_of(tok, prompt + target)
    assert joint[: len(ids_of(tok, prompt))] != ids_of(tok, prompt)  # precondition: a merge across the boundary
    out = tokenize_samples([Sample(chunks=[(prompt, target)])], tok, "plain", 512)
    ids, labels = out.input_ids[0], out.labels[0]
    assert out.boundary_fixes == 1
    n_prompt = 1 + len(ids_of(tok, prompt))
    assert ids[1:n_prompt] == ids_of(tok, prompt)
    assert tok.decode(trained(tok, ids, labels)) == "the</s>"
    assert all(lab == IGNORE for lab in labels[:n_prompt])


def test_text_format_trains_everything_but_the_first_token(tiny_tokenizer):
    tok = tiny_tokenizer
    out = tokenize_samples([Sample(chunks=[("", "hello world")])], tok, "plain", 512)
    ids, labels = out.input_ids[0], out.labels[0]
    assert labels[0] == IGNORE and labels[1:] == ids[1:]
    assert ids[-1] == tok.eos_token_id


def test_completion_only_false_trains_the_prompt_too(tiny_tokenizer):
    out = tokenize_samples([Sample(chunks=[("Q: x\n", "y")])], tiny_tokenizer, "plain", 512, completion_only=False)
    assert out.labels[0][0] == IGNORE and out.labels[0][1:] == out.input_ids[0][1:]


def test_multi_chunk_plain_has_eos_after_every_target(tiny_tokenizer):
    tok = tiny_tokenizer
    out = tokenize_samples([Sample(chunks=[("Q1\n", "A1"), ("Q2\n", "A2")])], tok, "plain", 512)
    ids, labels = out.input_ids[0], out.labels[0]
    assert ids == [tok.bos_token_id] + ids_of(tok, "Q1\nA1") + [tok.eos_token_id] + ids_of(tok, "Q2\nA2") + [
        tok.eos_token_id
    ]
    assert tok.decode(trained(tok, ids, labels)) == "A1</s>A2</s>"


def test_no_bos_tokenizer_gets_no_bos(tiny_tokenizer):
    from tokenizers import processors

    from lorafuse.model.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert bos_prefix(tok) == [] and bos_prefix(tiny_tokenizer) == [tiny_tokenizer.bos_token_id]
    out = tokenize_samples([Sample(chunks=[("Q\n", "A")])], tok, "plain", 512)
    assert tok.bos_token_id not in out.input_ids[0]


def test_chat_with_generation_tags_trains_assistant_turns_only(tiny_tokenizer):
    tok = tiny_tokenizer
    out = tokenize_samples([Sample(messages=CONV)], tok, "chat", 512)
    ids, labels = out.input_ids[0], out.labels[0]
    rendered = tok.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    assert ids == rendered[: len(ids)] and ids[-1] == tok.eos_token_id  # the template's tokens, trailing "\n" cut
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert ids.count(tok.eos_token_id) == 2  # one per assistant turn, none added on top
    assert tok.decode(trained(tok, ids, labels)) == "Hello!<|im_end|></s>4<|im_end|></s>"


def test_chat_prefix_method_equals_generation_tags(tiny_tokenizer, untagged_tokenizer):
    tagged = tokenize_samples([Sample(messages=CONV)], tiny_tokenizer, "chat", 512)
    prefix = tokenize_samples([Sample(messages=CONV)], untagged_tokenizer, "chat", 512)
    assert prefix.input_ids == tagged.input_ids and prefix.labels == tagged.labels


def test_chat_template_without_eos_gets_one_trained_eos(no_eos_template_tokenizer):
    tok = no_eos_template_tokenizer
    out = tokenize_samples([Sample(messages=CONV)], tok, "chat", 512)
    ids, labels = out.input_ids[0], out.labels[0]
    assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    assert tok.decode(trained(tok, ids, labels)) == "Hello!<|im_end|>4<|im_end|></s>"


def test_chat_without_template_is_an_error(tiny_tokenizer):
    from lorafuse.errors import DataError
    from lorafuse.model.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template") as e:
        tokenize_samples([Sample(messages=CONV)], tok, "chat", 512)
    assert "template=plain" in e.value.fix


def test_conversation_without_assistant_turn_is_dropped_and_counted(tiny_tokenizer):
    samples = [Sample(messages=CONV), Sample(messages=[{"role": "user", "content": "alone"}])]
    out = tokenize_samples(samples, tiny_tokenizer, "chat", 512)
    assert out.rows == [0] and list(out.dropped.values()) == [[1]]


def test_truncation_counts_and_drops_rows_whose_targets_are_cut(tiny_tokenizer):
    tok = tiny_tokenizer
    short = ("Q:\n", "yes")
    long_target = ("Q:\n", "word " * 40)
    long_prompt = ("long prompt " * 40 + "\n", "yes")
    out = tokenize_samples([Sample(chunks=[c]) for c in (short, long_target, long_prompt)], tok, "plain", 24)
    assert out.truncated == 2
    assert out.rows == [0, 1]  # the long target keeps its first tokens; the long prompt leaves nothing to train
    assert len(out.input_ids[1]) == 24 and out.input_ids[1][-1] != tok.eos_token_id
    assert sum(len(v) for v in out.dropped.values()) == 1
    assert out.longest_prompt == 1 + len(ids_of(tok, long_prompt[0]))
