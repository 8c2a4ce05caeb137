"""The Gemma chat template: exact strings, the assistant mask, one BOS, and clear errors for bad input."""

from __future__ import annotations

import pytest

from utils import chat
from utils.data import for_sft_trainer, load_sft_dataset
from utils.errors import CourseError

# The official Gemma instruct template (google/gemma-3-*-it), for comparison on user/assistant conversations.
OFFICIAL_GEMMA = "".join([
    "{{ bos_token }}",
    "{%- if messages[0]['role'] == 'system' -%}",
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}",
    "{%- set loop_messages = messages[1:] -%}",
    "{%- else -%}",
    "{%- set first_user_prefix = \"\" -%}",
    "{%- set loop_messages = messages -%}",
    "{%- endif -%}",
    "{%- for message in loop_messages -%}",
    "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}",
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}",
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}",
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}",
])

TWO_TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def test_single_turn_exact(tokenizer):
    assert chat.render(tokenizer, TWO_TURNS[:2]) == (
        "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\nParis.<end_of_turn>\n"
    )


def test_multi_turn_exact(tokenizer):
    assert chat.render(tokenizer, TWO_TURNS) == (
        "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\nParis.<end_of_turn>\n"
        "<start_of_turn>user\nAnd of Italy?<end_of_turn>\n"
        "<start_of_turn>model\nRome.<end_of_turn>\n"
    )


def test_system_is_folded_into_first_user_turn(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, *TWO_TURNS[:2]]
    assert chat.render(tokenizer, messages) == (
        "<bos><start_of_turn>user\nBe brief.\n\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\nParis.<end_of_turn>\n"
    )


def test_generation_prompt_exact(tokenizer):
    assert chat.render(tokenizer, TWO_TURNS[:1], add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
    )


@pytest.mark.parametrize("messages", [TWO_TURNS[:2], TWO_TURNS, [{"role": "system", "content": "Hi"}, *TWO_TURNS]])
def test_same_text_as_official_gemma_template(tokenizer, messages):
    ours = chat.render(tokenizer, messages)
    official = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=OFFICIAL_GEMMA)
    assert ours == official


def test_assistant_mask_covers_exactly_replies_and_end_of_turn(tokenizer):
    rows = chat.mask_rows(tokenizer, TWO_TURNS)
    trained = [tok for tok, _, on in rows if on]
    assert trained == ["Paris", ".", "<end_of_turn>", "Rome", ".", "<end_of_turn>"]
    # the newline after each reply's <end_of_turn> and every user/template token stay context
    assert sum(on for _, _, on in rows) == len(trained)


def test_mask_view_renders_text_and_html(tokenizer):
    view = chat.MaskView(tokenizer, TWO_TURNS[:2])
    assert "[['Paris':" in repr(view)
    assert "background:#c8f7c5" in view._repr_html_()


def test_template_without_generation_markers_gives_no_mask(tokenizer):
    """Control for the test above: dropping the markers empties the mask (TRL then refuses to train)."""
    no_markers = chat.GEMMA_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    enc = tokenizer.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                        chat_template=no_markers)
    assert sum(enc["assistant_masks"]) == 0


def test_one_bos_through_the_data_pipeline(tokenizer):
    """Shipped data -> SFT columns -> the chat template tokenization TRL uses: exactly one <bos>."""
    ds = for_sft_trainer(load_sft_dataset("data/ultrachat_mini", max_rows=20)["train_sft"])
    for row in ds:
        ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
        assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    text = chat.render(tokenizer, TWO_TURNS)
    assert tokenizer(text, add_special_tokens=False)["input_ids"].count(tokenizer.bos_token_id) == 1
    assert tokenizer(text)["input_ids"][:2] == [2, 2]  # the pitfall the notebook shows


def test_setup_tokenizer_pads_with_pad_not_eos(tokenizer):
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 0 != tokenizer.eos_token_id
    assert tokenizer.padding_side == "right" and tokenizer.model_max_length == 128


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([], "empty"),
        ([{"role": "robot", "content": "hi"}], "unknown role"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "user", "content": ""}], "empty"),
        ([{"role": "user", "content": "   "}], "empty"),
        ([{"role": "user", "content": None}], "non-text"),
        ([{"role": "assistant", "content": "hi"}], "starting with user"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only the first"),
        ([{"role": "system", "content": "only me"}], "only a system"),
    ],
)
def test_bad_conversations_raise_clear_errors(tokenizer, messages, fragment):
    with pytest.raises(CourseError, match=fragment):
        chat.render(tokenizer, messages)


def test_describe_reply_splits_at_end_of_turn(tokenizer):
    ids = tokenizer("Paris.", add_special_tokens=False)["input_ids"] + [106, 1]
    reply = chat.describe_reply(tokenizer, "q", ids)
    assert reply == {"prompt": "q", "reply": "Paris.", "stop": "<end_of_turn>", "ends_turn": True}
    runaway = chat.describe_reply(tokenizer, "q", tokenizer("Paris is", add_special_tokens=False)["input_ids"])
    assert runaway["stop"] == "(token limit)" and not runaway["ends_turn"]
    unused = chat.describe_reply(tokenizer, "q", [tokenizer.convert_tokens_to_ids("<unused67>")])
    assert not unused["ends_turn"]


def test_render_steps_split_the_rendering_into_template_parts(tokenizer):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                    {"role": "assistant", "content": "Paris."}]
    rows = chat.render_steps(tokenizer, conversation)
    assert [r["part"] for r in rows] == ["start", "user", "assistant"]
    assert "".join(r["renders"] for r in rows) == chat.render(tokenizer, conversation)
    assert "Be brief." in rows[1]["renders"] and rows[1]["inside {% generation %}"] == ""
    assert rows[2]["inside {% generation %}"] == "Paris.<end_of_turn>"  # the reply and its end, not the header


# A solution to notebook 01's exercise: ChatML turns, a system turn of its own, Gemma's checks.
CHATML = "".join([
    "{{ bos_token }}",
    "{%- if messages[0]['role'] == 'system' -%}",
    "{{ '<|im_start|>system\n' + messages[0]['content'] | trim + '<|im_end|>\n' }}",
    "{%- set loop_messages = messages[1:] -%}",
    "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}",
    "{%- for message in loop_messages -%}",
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}",
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}",
    "{%- endif -%}",
    "{{ '<|im_start|>' + message['role'] + '\n' }}",
    "{%- if message['role'] == 'assistant' -%}",
    "{%- generation -%}{{ message['content'] | trim + '<|im_end|>' }}{%- endgeneration -%}{{ '\n' }}",
    "{%- else -%}{{ message['content'] | trim + '<|im_end|>\n' }}{%- endif -%}",
    "{%- endfor -%}",
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}",
])


def _failed(rows: list[dict]) -> set[str]:
    assert [r["check"] for r in rows] == list(chat.TEMPLATE_CHECKS)
    return {r["check"] for r in rows if not r["passed"]}


def test_check_template_passes_the_course_template_and_a_chatml_solution(tokenizer):
    assert _failed(chat.check_template(tokenizer, chat.GEMMA_TEMPLATE)) == set()
    rows = chat.check_template(tokenizer, CHATML, end_of_turn="<|im_end|>")
    assert _failed(rows) == set()
    assert rows[4]["detail"] == "trained on ['Paris.<|im_end|>', 'Rome.<|im_end|>']"


def test_check_template_leaves_the_tokenizer_template_alone(tokenizer):
    chat.check_template(tokenizer, CHATML, end_of_turn="<|im_end|>")
    assert tokenizer.chat_template == chat.GEMMA_TEMPLATE


@pytest.mark.parametrize(
    ("template", "failed"),
    [
        (chat.GEMMA_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", ""),
         {"mask = replies + end of turn"}),
        # the header inside the markers: the model would be trained to write "model\n" itself
        (chat.GEMMA_TEMPLATE.replace("{{ '<start_of_turn>model\n' }}{%- generation -%}",
                                     "{%- generation -%}{{ '<start_of_turn>model\n' }}"),
         {"mask = replies + end of turn"}),
        # <end_of_turn> outside the markers: the model never learns to stop
        (chat.GEMMA_TEMPLATE.replace("{{ '<end_of_turn>' }}{%- endgeneration -%}",
                                     "{%- endgeneration -%}{{ '<end_of_turn>' }}"),
         {"mask = replies + end of turn"}),
        (chat.GEMMA_TEMPLATE.replace("{%- if add_generation_prompt -%}", "{%- if false -%}"),
         {"generation prompt opens the reply"}),
        (chat.GEMMA_TEMPLATE.replace("{{ bos_token }}", ""), {"one <bos>, at the start"}),
        (chat.GEMMA_TEMPLATE.replace("{{ bos_token }}", "{{ bos_token }}{{ bos_token }}"), {"one <bos>, at the start"}),
        (chat.GEMMA_TEMPLATE.replace("{{ raise_exception('Conversation roles must alternate", "{{ ('"),
         {"raises on non-alternating roles"}),  # prints the message instead of raising it
        # Gemma 7B's official template refuses a system message
        ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
         + chat.GEMMA_TEMPLATE, {"keeps the system text"}),
        (chat.ZEPHYR_TEMPLATE, {"one <bos>, at the start", "mask = replies + end of turn",
                                "raises on non-alternating roles"}),
    ],
    ids=["no-markers", "header-trained", "end-untrained", "no-generation-prompt", "no-bos", "two-bos",
         "no-alternation-check", "no-system", "zephyr"],
)
def test_check_template_names_what_a_broken_template_gets_wrong(tokenizer, template, failed):
    assert _failed(chat.check_template(tokenizer, template)) == failed


def test_check_template_reports_a_syntax_error_on_every_row_without_raising(tokenizer):
    rows = chat.check_template(tokenizer, "{% for message in messages %}{{ message['content'] }}")
    assert not any(r["passed"] for r in rows)
    assert all(r["detail"].startswith("TemplateSyntaxError") for r in rows)
