"""The one conversation template: what training documents look like, and the exported chat template.

Preprocessing (``--template qa`` rows and ``--input-format llava`` conversations) renders a
conversation with :func:`render`; the exported HF processor's ``chat_template`` is
:func:`chat_template`, the same rules written in Jinja. A test checks that
``processor.apply_chat_template(messages)`` gives exactly the token ids preprocessing wrote.

A conversation is a list of messages ``{"role": "user" | "assistant", "content": str | items}``,
items being ``{"type": "text", "text": str}`` or ``{"type": "image"}`` (HF's format; the Python
side also carries the image itself in ``item["image"]``). A string content is read the way the
LLaVA reader reads a turn (data/preprocess/samples.py ``llava_messages``): each ``<image>`` is an
image item where it stands, the text around it stripped, empty text dropped (:func:`string_items`),
so ``"<image>\nWhat is this?"`` is the image, then the text ``What is this?``. It must alternate
user, assistant, user, ... ; images appear in user turns only. A document reads::

    <s> [images before the turn's first text] Question: <the rest of the user turn>
        Answer: <assistant text></s> Question: ... Answer: ...</s>

(without the ``<s>`` for a tokenizer that has no BOS, as Qwen2's: data/tokenizer.py)
with each image as ``<image_start><image><image_end>``. The loss is on the assistant text and
its ``</s>`` only. A one-turn conversation with its image first is exactly the ``qa``
template's layout: ``[image] Question: q Answer: a``.

The template writes BOS (``bos_token``; nothing when it is None, the tokenizer having none) and
the exported tokenizer adds no special tokens of its own (hf/processor.py), so a rendered chat
has training's one BOS (or none) however it is tokenized: by
``apply_chat_template(tokenize=True)`` (the processor's or the tokenizer's), or rendered with
``tokenize=False`` and then given to the processor or the tokenizer.

The Python side returns *segments* (``("image", value)``, ``("text", str, is_target)``,
``("eos", is_target)``); samples.py encodes them. Text segments next to each other form one
string between special tokens, which the HF tokenizer encodes as one piece: samples.py does
the same and checks that the prompt/answer boundary falls on a token boundary.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from megatron_unihetero.data.tokenizer import IMAGE_END_TOKEN, IMAGE_START_TOKEN, IMAGE_TOKEN

USER_PREFIX = "Question: "
ASSISTANT_PREFIX = " Answer:"
ANSWER_SEPARATOR = " "  # between ASSISTANT_PREFIX and the answer (part of the target)
IMAGE_PLACEHOLDER = IMAGE_START_TOKEN + IMAGE_TOKEN + IMAGE_END_TOKEN
ROLES = ("user", "assistant")

Segment = Tuple[Any, ...]


class ConversationError(ValueError):
    """A conversation that does not fit the template (the detail names the message)."""


def string_items(text: str) -> List[Dict[str, Any]]:
    """A string content as items: an image item for each ``<image>``, where it stands, and the
    stripped non-empty text between them (LLaVA's rule; ``chat_template`` does the same)."""
    items: List[Dict[str, Any]] = []
    for n, piece in enumerate(text.split(IMAGE_TOKEN)):
        if n > 0:
            items.append({"type": "image"})
        if piece.strip():
            items.append({"type": "text", "text": piece.strip()})
    return items


def _items(message: Dict[str, Any], k: int) -> List[Dict[str, Any]]:
    content = message.get("content")
    if isinstance(content, str):
        return string_items(content)
    if not isinstance(content, list):
        raise ConversationError(f"message {k}: content must be a string or a list of items, "
                                f"got {type(content).__name__}")
    for j, item in enumerate(content):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind not in ("text", "image") or (kind == "text" and not isinstance(item.get("text"), str)):
            raise ConversationError(f"message {k} item {j}: expected {{'type': 'text', 'text': str}} or "
                                    f"{{'type': 'image'}}, got {item!r:.80}")
    return content


def check(messages: Sequence[Dict[str, Any]]) -> None:
    """Raise ConversationError unless ``messages`` alternate user/assistant from a user turn,
    end with an assistant turn and hold images in user turns only."""
    if not messages:
        raise ConversationError("empty conversation")
    for k, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        want = ROLES[k % 2]
        if role != want:
            raise ConversationError(f"message {k}: role {role!r}, expected {want!r} (turns alternate user, assistant)")
        items = _items(m, k)
        if role == "assistant" and any(it["type"] == "image" for it in items):
            raise ConversationError(f"message {k}: images are only supported in user turns")
    if messages[-1]["role"] != "assistant":
        raise ConversationError(f"the conversation ends with a {messages[-1]['role']!r} turn, not an assistant turn")


def render(messages: Sequence[Dict[str, Any]]) -> List[Segment]:
    """The document's segments (BOS not included; the last segment is the final ``</s>``)."""
    check(messages)
    segments: List[Segment] = []
    for k, m in enumerate(messages):
        items = _items(m, k)
        if m["role"] == "user":
            started = False  # images before the first text go before "Question:"
            for it in items:
                if it["type"] == "image":
                    segments.append(("image", it.get("image")))
                else:
                    segments.append(("text", ("" if started else USER_PREFIX) + it["text"], False))
                    started = True
            if not started:
                segments.append(("text", USER_PREFIX, False))
        else:
            text = "".join(it["text"] for it in items)
            segments += [("text", ASSISTANT_PREFIX, False), ("text", ANSWER_SEPARATOR + text, True), ("eos", True)]
    return segments


def generation_prompt(messages: Sequence[Dict[str, Any]]) -> List[Segment]:
    """The segments of a prompt for generation: ``messages`` end with a user turn and the
    document stops at the assistant's `` Answer:`` (what :func:`chat_template` writes with
    ``add_generation_prompt``; the answer, its separator space included, is what the model
    generates, then ``</s>``)."""
    if not messages or (messages[-1].get("role") if isinstance(messages[-1], dict) else None) != "user":
        raise ConversationError("a generation prompt ends with a user turn")
    segments = render(list(messages) + [{"role": "assistant", "content": ""}])
    return segments[:-2]  # drop the (empty) answer and its </s>: ... " Answer:" ends it


def render_text(messages: Sequence[Dict[str, Any]], bos_token: Optional[str], eos_token: str,
                add_generation_prompt: bool = False) -> str:
    """The string :func:`chat_template` renders for ``messages`` (``bos_token`` None: the
    tokenizer has no BOS, nothing is written); the export checks its processor against it."""
    parts = [bos_token or ""]
    for seg in generation_prompt(messages) if add_generation_prompt else render(messages):
        parts.append(IMAGE_PLACEHOLDER if seg[0] == "image" else eos_token if seg[0] == "eos" else seg[1])
    return "".join(parts)


def chat_template() -> str:
    """:func:`render` in Jinja, for ``processor.chat_template`` (transformers' variables:
    ``messages``, ``bos_token``, ``eos_token``, ``add_generation_prompt``). The assistant text
    sits in ``{% generation %}`` so ``return_assistant_tokens_mask=True`` marks the tokens
    training computes the loss on."""
    q = _jinja_string(USER_PREFIX)
    image = _jinja_string(IMAGE_TOKEN)
    return (
        # No BOS: transformers leaves bos_token undefined (renders nothing); a caller that
        # passes bos_token=None explicitly would otherwise get the text 'None'.
        "{%- if bos_token -%}{{- bos_token -}}{%- endif -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}"  # string_items
        "{%- set ns = namespace(items=[]) -%}"
        "{%- for piece in message['content'].split(" + image + ") -%}"
        "{%- if not loop.first -%}{%- set ns.items = ns.items + [{'type': 'image'}] -%}{%- endif -%}"
        "{%- if piece.strip() -%}"
        "{%- set ns.items = ns.items + [{'type': 'text', 'text': piece.strip()}] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set items = ns.items -%}"
        "{%- else -%}{%- set items = message['content'] -%}{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- set ns = namespace(started=false) -%}"
        "{%- for item in items -%}"
        "{%- if item['type'] == 'image' -%}" + _jinja_string(IMAGE_PLACEHOLDER).join(("{{- ", " -}}")) +
        "{%- elif item['type'] == 'text' -%}"
        "{%- if not ns.started -%}{{- " + q + " -}}{%- endif -%}"
        "{{- item['text'] -}}{%- set ns.started = true -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if not ns.started -%}{{- " + q + " -}}{%- endif -%}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{%- for item in items -%}{%- if item['type'] == 'image' -%}"
        "{{- raise_exception('images are only supported in user turns') -}}{%- endif -%}{%- endfor -%}"
        "{{- " + _jinja_string(ASSISTANT_PREFIX) + " -}}"
        "{%- generation -%}{{- " + _jinja_string(ANSWER_SEPARATOR) + " -}}"
        "{%- for item in items -%}{%- if item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}{%- endfor -%}"
        "{{- eos_token -}}{%- endgeneration -%}"
        "{%- else -%}{{- raise_exception('roles must be user or assistant, got ' + message['role']) -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- " + _jinja_string(ASSISTANT_PREFIX) + " -}}{%- endif -%}"
    )


def _jinja_string(text: str) -> str:
    """A Jinja string literal for ``text``."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def question_messages(image: Any, question: str) -> List[Dict[str, Any]]:
    """The user turn of :func:`qa_messages`: a question row's generation prompt."""
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def qa_messages(image: Any, question: str, answer: str) -> List[Dict[str, Any]]:
    """The one-turn conversation of a question/answer row (``--template qa``)."""
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
