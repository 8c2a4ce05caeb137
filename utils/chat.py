"""The Gemma chat template, tokenizer set-up, the loss-mask view, checks for any template, and chatting with a model."""

from __future__ import annotations

import html
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

from utils.errors import CourseError

# Gemma's turn format, as in the official instruct template, plus {% generation %} markers around each
# reply and its <end_of_turn>, so apply_chat_template(return_assistant_tokens_mask=True) and TRL's
# assistant_only_loss know which tokens to train on. Gemma has no system role: it is folded into turn 1.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- generation -%}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>' }}"
    "{%- endgeneration -%}"
    "{{ '\n' }}"
    "{%- else -%}"
    "{{ '<start_of_turn>user\n' + (first_user_prefix if loop.first else '') + message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)

# Zephyr's format (HuggingFaceH4/zephyr-7b-beta), written out to compare another family's choices.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

ROLES = ("system", "user", "assistant")
END_OF_TURN = "<end_of_turn>"
TURN_TOKENS = ("<start_of_turn>", END_OF_TURN)


def validate_messages(messages: list[dict]) -> None:
    """Raise CourseError unless messages are a valid conversation for the Gemma template."""
    if not isinstance(messages, list) or not messages:
        raise CourseError("The conversation is empty: pass a list of {'role': ..., 'content': ...} messages.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message:
            raise CourseError(f"Message {i} must be a dict with 'role' and 'content', got {message!r}.")
        role, content = message["role"], message.get("content")
        if role not in ROLES:
            raise CourseError(f"Message {i} has unknown role {role!r}; Gemma's template knows {', '.join(ROLES)}.")
        if role == "system" and i != 0:
            raise CourseError(f"Message {i} is a system message; only the first message may be one.")
        if not isinstance(content, str) or not content.strip():
            raise CourseError(f"Message {i} ({role}) has empty or non-text content; every turn needs text.")
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if not turns:
        raise CourseError("The conversation has only a system message; add a user turn.")
    for i, role in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise CourseError(
                f"Turn {i} is {role!r} but {expected!r} was expected: roles must alternate user/assistant, "
                "starting with user (two user turns in a row? merge them into one)."
            )


def setup_tokenizer(tokenizer, max_length: int, padding_side: str = "right"):
    """Install the Gemma chat template, <pad> as padding, the padding side and max length; returns it."""
    tokenizer.chat_template = GEMMA_TEMPLATE
    tokenizer.pad_token = "<pad>"  # not <eos>: a pad masked out of the loss would hide the end of text
    tokenizer.padding_side = padding_side
    tokenizer.model_max_length = max_length
    return tokenizer


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as the exact text the model sees."""
    validate_messages(messages)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> dict:
    """Token ids of the rendered conversation (one BOS, from the template) and the assistant mask."""
    validate_messages(messages)
    return tokenizer.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        add_generation_prompt=add_generation_prompt,
        return_assistant_tokens_mask=not add_generation_prompt,
    )


# The template's parts, abbreviated, for render_steps' table (the full Jinja text is GEMMA_TEMPLATE).
TEMPLATE_PARTS = {
    "start": "{{ bos_token }}",
    "user": "'<start_of_turn>user\\n' + (system + '\\n\\n' if first) + content | trim + '<end_of_turn>\\n'",
    "assistant": "'<start_of_turn>model\\n' {% generation %} content | trim + '<end_of_turn>' {% endgeneration %} "
                 "'\\n'",
}


def render_steps(tokenizer, messages: list[dict]) -> list[dict]:
    """What each part of the template renders for this conversation, and which of it sits inside {% generation %}."""
    enc = encode(tokenizer, messages)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    rows, start = [], 1
    rows.append({"part": "start", "jinja": TEMPLATE_PARTS["start"], "renders": tokenizer.decode(ids[:1]),
                 "inside {% generation %}": ""})
    for k, message in enumerate(messages, 1):
        if message["role"] == "system":
            continue  # folded into the first user turn: it renders there
        end = len(encode(tokenizer, messages[:k])["input_ids"])
        trained = [i for i, m in zip(ids[start:end], mask[start:end]) if m]
        rows.append({"part": message["role"], "jinja": TEMPLATE_PARTS[message["role"]],
                     "renders": tokenizer.decode(ids[start:end]), "inside {% generation %}": tokenizer.decode(trained)})
        start = end
    return rows


def mask_rows(tokenizer, messages: list[dict]) -> list[tuple[str, int, bool]]:
    """(token, id, trained?) for every token of the rendered conversation."""
    enc = encode(tokenizer, messages)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    return list(zip(tokens, enc["input_ids"], [bool(m) for m in enc["assistant_masks"]]))


def mask_text(tokenizer, messages: list[dict]) -> str:
    """Plain-text loss-mask view: trained tokens in [[...]], the rest as they are."""
    parts = [f"[[{tok!r}:{i}]]" if trained else f"{tok!r}:{i}" for tok, i, trained in mask_rows(tokenizer, messages)]
    return " ".join(parts)


class MaskView:
    """Loss-mask view that renders as coloured HTML in Jupyter and as plain text elsewhere."""

    def __init__(self, tokenizer, messages: list[dict]):
        self.rows = mask_rows(tokenizer, messages)
        self.text = mask_text(tokenizer, messages)

    def _repr_html_(self) -> str:
        spans = []
        for tok, i, trained in self.rows:
            colour = "#c8f7c5" if trained else "#eeeeee"
            label = html.escape(tok.replace("\n", "\\n"))
            spans.append(
                f'<span style="background:{colour};margin:1px;padding:1px 3px;border-radius:3px;'
                f'display:inline-block;font-family:monospace" title="id {i}">{label}<sub>{i}</sub></span>'
            )
        legend = "<p><b>green</b>: trained on (loss counted) · <b>grey</b>: context only (label -100)</p>"
        return legend + "".join(spans)

    def __repr__(self) -> str:
        return "[[token:id]] = trained on, token:id = context only\n" + self.text


# The conversation check_template renders: two exchanges, so the mask must find two separate replies.
CHECK_CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]
NOT_ALTERNATING = {  # conversations a template must refuse (raise_exception), by what is wrong with them
    "user, user": [{"role": "user", "content": "Hi."}, {"role": "user", "content": "Hello?"}],
    "user, assistant, assistant": [*CHECK_CONVERSATION[:2], {"role": "assistant", "content": "Or Lyon."}],
    "starts with assistant": [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Hello."}],
}


def _apply(tokenizer, template: str, messages: list[dict], **kwargs):
    return tokenizer.apply_chat_template(messages, chat_template=template, **kwargs)


def _check_renders(tokenizer, template: str, end_of_turn: str) -> tuple[bool, str]:
    text = _apply(tokenizer, template, CHECK_CONVERSATION, tokenize=False)
    missing = [m["content"] for m in CHECK_CONVERSATION if m["content"] not in text]
    return not missing, f"missing {missing}: {text!r}" if missing else text.replace("\n", "\\n")


def _check_one_bos(tokenizer, template: str, end_of_turn: str) -> tuple[bool, str]:
    ids = _apply(tokenizer, template, CHECK_CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    count = ids.count(tokenizer.bos_token_id)
    first = tokenizer.convert_ids_to_tokens(ids[0])
    return count == 1 and ids[0] == tokenizer.bos_token_id, f"{count} {tokenizer.bos_token}, first token {first!r}"


def _check_system(tokenizer, template: str, end_of_turn: str) -> tuple[bool, str]:
    system = {"role": "system", "content": "Answer in one word."}
    text = _apply(tokenizer, template, [system, *CHECK_CONVERSATION[:2]], tokenize=False)
    return system["content"] in text, text.replace("\n", "\\n")


def _check_generation_prompt(tokenizer, template: str, end_of_turn: str) -> tuple[bool, str]:
    question = CHECK_CONVERSATION[:1]
    plain = _apply(tokenizer, template, question, tokenize=False)
    prompt = _apply(tokenizer, template, question, tokenize=False, add_generation_prompt=True)
    with_reply = _apply(tokenizer, template, CHECK_CONVERSATION[:2], tokenize=False)
    added = prompt[len(plain):] if prompt.startswith(plain) else None
    if not added:
        return False, "add_generation_prompt=True appends nothing after the conversation"
    if not with_reply.startswith(prompt):
        return False, f"appends {added!r}, but a reply in training data does not start that way"
    return True, f"appends {added!r}, the start of the assistant's turn"


def _check_mask(tokenizer, template: str, end_of_turn: str) -> tuple[bool, str]:
    enc = _apply(tokenizer, template, CHECK_CONVERSATION, tokenize=True, return_dict=True,
                 return_assistant_tokens_mask=True)
    spans, previous = [], 0
    for token_id, on in zip(enc["input_ids"], enc["assistant_masks"]):
        if on and not previous:
            spans.append([])
        if on:
            spans[-1].append(token_id)
        previous = on
    trained = [tokenizer.decode(span) for span in spans]
    expected = [m["content"] + end_of_turn for m in CHECK_CONVERSATION if m["role"] == "assistant"]
    if not trained:
        return False, "no token is marked: wrap each reply in {% generation %} ... {% endgeneration %}"
    return trained == expected, f"trained on {trained}" + ("" if trained == expected else f", expected {expected}")


def _check_alternation(tokenizer, template: str, end_of_turn: str) -> tuple[bool, str]:
    _apply(tokenizer, template, CHECK_CONVERSATION, tokenize=False)  # a template that cannot render fails here
    accepted, error = [], ""
    for name, messages in NOT_ALTERNATING.items():
        try:
            _apply(tokenizer, template, messages, tokenize=False)
            accepted.append(name)
        except Exception as err:  # raise_exception() raises jinja2's TemplateError
            error = str(err)
    if accepted:
        return False, f"no error for: {'; '.join(accepted)}"
    return True, f"raises on all {len(NOT_ALTERNATING)}: {error}"


TEMPLATE_CHECKS = {
    "renders the conversation": _check_renders,
    "one <bos>, at the start": _check_one_bos,
    "keeps the system text": _check_system,
    "generation prompt opens the reply": _check_generation_prompt,
    "mask = replies + end of turn": _check_mask,
    "raises on non-alternating roles": _check_alternation,
}


def check_template(tokenizer, template: str, end_of_turn: str = END_OF_TURN) -> list[dict]:
    """Run the course's checks on a chat template without raising: one {"check", "passed", "detail"} row each.

    end_of_turn is the text that closes a reply in this template (Gemma: <end_of_turn>, ChatML: <|im_end|>).
    """
    rows = []
    for name, check in TEMPLATE_CHECKS.items():
        try:
            passed, detail = check(tokenizer, template, end_of_turn)
        except Exception as err:  # a template error, or one the learner's Jinja raised: the check fails
            passed, detail = False, f"{type(err).__name__}: {err}"
        rows.append({"check": name, "passed": passed, "detail": detail})
    return rows


def turn_token_ids(tokenizer) -> list[int]:
    """Ids of <start_of_turn> and <end_of_turn>, the tokens a base model never learned."""
    return tokenizer.convert_tokens_to_ids(list(TURN_TOKENS))


def stop_token_ids(tokenizer) -> list[int]:
    """Generation stops on <end_of_turn> (the end of a reply) or <eos>."""
    return [tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.eos_token_id]


@contextmanager
def fast_inference(model) -> Iterator[None]:
    """While the model only infers: PEFT's trained token rows written into the embedding (taken out after), and the
    output layer fed contiguous rows. Both compute exactly the same, much faster on a CPU.

    Unmerged, PEFT rebuilds the whole 262k-row embedding on every forward pass (twice with the tied output layer).
    PyTorch's CPU bf16 linear on a sliced batch (generation's last positions) copies the 262k-row weight once per row:
    6 s instead of 0.03 s for 8 rows.
    """
    layers = [m for m in model.modules()
              if isinstance(m, TrainableTokensLayer) and not m.merged and not m.disable_adapters]
    for layer in layers:
        layer.merge()
    hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda _, args: tuple(a.contiguous() if torch.is_tensor(a) else a for a in args))
    try:
        yield
    finally:
        hook.remove()
        for layer in reversed(layers):
            layer.unmerge()


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 48, batch_size: int = 8) -> list[dict]:
    """Greedy replies to each prompt through the chat template; each dict has the reply and how it ended."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # pad on the left: generation appends on the right
    was_training = model.training
    model.eval()
    results = []
    stops = stop_token_ids(tokenizer)
    try:
        with fast_inference(model):
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                texts = [render(tokenizer, [{"role": "user", "content": p}], add_generation_prompt=True) for p in chunk]
                batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
                out = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=stops,
                    pad_token_id=tokenizer.pad_token_id,
                )
                for prompt, ids in zip(chunk, out[:, batch["input_ids"].shape[1] :].tolist()):
                    results.append(describe_reply(tokenizer, prompt, ids))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return results


def describe_reply(tokenizer, prompt: str, ids: list[int]) -> dict:
    """Split generated ids at the first special token; say whether the reply ended its turn properly."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.convert_tokens_to_ids(["<start_of_turn>", END_OF_TURN]))
    tokens = tokenizer.convert_ids_to_tokens(ids)
    cut = next((k for k, (i, t) in enumerate(zip(ids, tokens)) if i in special or t.startswith("<unused")), None)
    body = ids if cut is None else ids[:cut]
    reply = tokenizer.decode(body).strip()
    stop = "(token limit)" if cut is None else tokenizer.convert_ids_to_tokens(ids[cut])
    return {"prompt": prompt, "reply": reply, "stop": stop, "ends_turn": bool(reply) and stop == END_OF_TURN}
