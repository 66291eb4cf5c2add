"""Chat data: conversations rendered with a model's chat template, and which tokens are trained.

A record is ``{"messages": [{"role": ..., "content": ...}, ...]}`` or ``{"prompt": ..., "completion":
...}`` (one user turn and one assistant turn). It is rendered with the ``chat_template`` of the
model directory's ``tokenizer_config.json`` in a sandboxed Jinja environment configured as
transformers' ``apply_chat_template`` configures its own (trimmed blocks, ``raise_exception``,
``tojson``, ``strftime_now``, ``bos_token`` / ``eos_token`` and the other special-token strings),
so the text — and hence the token ids — are the ones transformers produces.

Which tokens count in the loss: the assistant turns. When the template marks them with
``{% generation %} ... {% endgeneration %}`` those spans are used, exactly as transformers'
``return_assistant_tokens_mask=True``. Templates without the markers (most published ones) get
each assistant turn as the text it adds to the conversation: the rendering of the turns before it
with ``add_generation_prompt=True`` must be a prefix of the rendering that includes it, and the rest
— the reply and the template's end-of-turn text, so the model learns to stop — is the target. A
template without that prefix property is refused rather than guessed at. A token is a target when
any of its characters lies in a target span.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

Message = dict[str, Any]
Span = tuple[int, int]


class ChatError(ValueError):
    """A record or template that cannot be rendered; the message says which and why."""


def chat_messages(record: Any) -> list[Message]:
    """The conversation of one input record (see the module docstring); ChatError naming what is
    missing or malformed."""
    if not isinstance(record, dict):
        raise ChatError(f"expected a JSON object with 'messages' or 'prompt'/'completion', got {type(record).__name__}")
    # apply_chat_template hands these to the template, which would render them: not understood here
    unread = [key for key in ("tools", "documents") if record.get(key)]
    if unread:
        raise ChatError(f"the record's {unread[0]!r} would change the rendered text; meshweave renders messages only")
    if "messages" in record and ("prompt" in record or "completion" in record):
        raise ChatError("the record has both 'messages' and 'prompt'/'completion'; keep one")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ChatError("'messages' must be a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ChatError(f"messages[{i}] must be an object with string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise ChatError("the conversation has no assistant turn to train on")
        return messages
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise ChatError("expected 'messages', or string 'prompt' and 'completion'")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


class ChatTemplate:
    """A model directory's chat template, ready to render conversations (see the module docstring)."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = _environment().from_string(source)
        self.marks_generation = "{% generation %}" in source or "{%- generation %}" in source

    @classmethod
    def from_model_dir(cls, path: str | Path) -> ChatTemplate:
        """The ``chat_template`` of ``path/tokenizer_config.json`` (a string, or a list of named
        templates of which ``default`` is used) or of ``path/chat_template.jinja``, with the special
        tokens the config names. ValueError when the directory has none."""
        root = Path(path)
        if root.is_file():
            root = root.parent
        config_path = root / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        template = config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is None and (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        if not isinstance(template, str):
            raise ValueError(
                f"{root}: no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja); "
                "--format chat renders conversations with the model's own template"
            )
        special = {}
        for key, value in config.items():
            if key.endswith("_token"):
                text = value.get("content") if isinstance(value, dict) else value
                if isinstance(text, str):
                    special[key] = text
        return cls(template, special)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> tuple[str, list[Span]]:
        """The conversation's text and the character spans its ``{% generation %}`` blocks covered."""
        spans: list[Span] = []
        pieces: list[str] = []
        context = {
            **self.special_tokens,
            "messages": list(messages),
            "add_generation_prompt": add_generation_prompt,
        }
        tracker = _GenerationTracker(lambda: sum(len(p) for p in pieces), spans)
        try:
            for piece in self._template.generate(**context, _generation=tracker):
                pieces.append(piece)
        except ChatError:
            raise
        except Exception as e:  # jinja2 raises its own and the template's errors
            raise ChatError(f"the chat template failed: {' '.join(str(e).split())}") from None
        return "".join(pieces), spans

    def target_spans(self, messages: Sequence[Message]) -> tuple[str, list[Span]]:
        """The rendered conversation and the character spans of its assistant turns."""
        text, marked = self.render(messages)
        if self.marks_generation:
            return text, marked
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, _ = self.render(messages[:i], add_generation_prompt=True)
            through, _ = self.render(messages[: i + 1])
            if not (text.startswith(through) and through.startswith(before)):
                raise ChatError(
                    f"the chat template does not render assistant turn {i} as an extension of the turns before it; "
                    "mark the assistant text with {% generation %} ... {% endgeneration %} in the template"
                )
            spans.append((len(before), len(through)))
        return text, spans


def target_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[int]:
    """1 for each token (character ``offsets`` [start, end)) with a character inside a span, else 0."""
    mask = []
    for start, end in offsets:
        mask.append(int(any(start < hi and lo < max(end, start + 1) for lo, hi in spans)))
    return mask


class _GenerationTracker:
    """Called by the ``{% generation %}`` block with its rendered body: records where it lands in
    the output rendered so far (``length()``) and passes the body through unchanged."""

    def __init__(self, length: Callable[[], int], spans: list[Span]) -> None:
        self._length, self._spans = length, spans

    def __call__(self, body: str) -> str:
        start = self._length()
        self._spans.append((start, start + len(body)))
        return body


def _environment() -> Any:
    """A sandboxed Jinja environment configured as transformers configures the one it renders
    chat templates in, plus the ``generation`` block tag."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_mark", [nodes.Name("_generation", "load")])
            return nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _mark(self, tracker: _GenerationTracker, caller: Callable[[], str]) -> str:
            return tracker(caller())

    def raise_exception(message: str) -> None:
        raise ChatError(f"the chat template refused the conversation: {message}")

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def encode_conversations(
    records: Sequence[Any],
    template: ChatTemplate,
    encode_offsets: Callable[[list[str]], list[tuple[list[int], list[tuple[int, int]]]]],
    train_on_prompt: bool = False,
) -> Iterator[tuple[list[int], list[int]]]:
    """``(token ids, loss mask)`` of each record, in order: rendered, tokenized in one batch by
    ``encode_offsets`` (texts -> ids and character offsets, no special tokens added: the template
    writes them), the mask 1 on assistant tokens (on every token with ``train_on_prompt``).
    ChatError for a record that cannot be rendered."""
    rendered = [template.target_spans(chat_messages(r)) for r in records]
    for (_, spans), (ids, offsets) in zip(rendered, encode_offsets([t for t, _ in rendered]), strict=True):
        yield ids, [1] * len(ids) if train_on_prompt else target_mask(offsets, spans)
