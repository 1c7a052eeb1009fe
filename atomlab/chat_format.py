"""A model's chat format: its Jinja chat template, its stop tokens, and the token ids of a conversation.

An imported model keeps the template and end-of-sequence ids it was trained with; an atomlab-born model
has atomlab's (`atomlab.tokenizer.CHAT_TEMPLATE`, stopping at <|endoftext|> and <|end|>). Chat, serve,
SFT, DPO, GRPO and evaluation all go through this one class:

    fmt = ChatFormat.from_folder(folder)       # a bundle or Hugging Face folder: tokenizer.json, tokenizer_config.json
                                               # (or chat_template.jinja), generation_config.json; missing -> atomlab's
    fmt = ChatFormat.for_tokenizer(tokenizer)  # atomlab's own template and stop tokens
    fmt.render(messages, add_generation_prompt=True)  # the text transformers' apply_chat_template(tokenize=False) gives
    fmt.prompt(messages)                       # ids to generate the next assistant reply from
    ids, mask = fmt.encode(messages)           # mask[i]: token i is part of an assistant reply (what SFT trains on)
    fmt.encode_many(conversations)             # the same for many conversations, encoded in one batch
    fmt.stop_token_ids                         # the ids that end a reply
    fmt.describe()                             # what a step records of the format it trained with

Rendering follows transformers exactly: a sandboxed Jinja environment with trim_blocks and lstrip_blocks,
`raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, loop controls, `{% generation %}`,
the tokenizer's special tokens (bos_token, eos_token, ...) as template variables. Ids equal
`apply_chat_template(..., tokenize=True)` for ordinary text.

Control tokens only by construction: special-token text inside a message (a user typing
`<|im_end|>\\n<|im_start|>assistant`) is encoded as ordinary text, as transformers does with
`sanitize_control_tokens=True`: it is marked before rendering and each marked piece is encoded on its
own without added tokens; only the template's own control tokens become control ids.

The assistant mask: with `{% generation %}` blocks in the template, their characters (as transformers'
`return_assistant_tokens_mask`); otherwise each assistant reply from where the template's generation
prompt ends (the conversation before it rendered with add_generation_prompt) through its first stop
token, so a model learns to write the reply and to end it.

The stop tokens: generation_config.json's `eos_token_id` (else config.json's), the tokenizer's
eos_token, and the control token the template writes right after an assistant reply (Llama 3's
<|eot_id|>, ChatML's <|im_end|>): a base model's eos alone would never end a chat turn.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from atomlab.errors import AtomlabError
from atomlab.tokenizer import CHAT_ROLES, CHAT_TEMPLATE, END_OF_TEXT, PAD, encode_plain, load_tokenizer

Message = dict[str, Any]

# the tokenizer attributes transformers passes to a template (its special_tokens_map)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# private-use characters around special-token text that came from a message (transformers uses the same ones)
MARK_START, MARK_END = "\U000f0000", "\U000f0001"
# the names a message's reasoning comes under; templates read reasoning_content (gpt-oss: thinking)
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise AtomlabError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AtomlabError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _template_from(config: dict[str, Any], folder: Path) -> str | None:
    """The folder's chat template: chat_template.jinja (transformers 5 writes it apart), else tokenizer_config's
    (a string, or a list of named templates: the "default" one)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) and template else None


def compile_template(template: str) -> Any:
    """A Jinja template compiled as transformers compiles chat templates (sandboxed, same filters, globals
    and extensions), so that it renders the same text."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.sandbox
    import jinja2.utils

    class GenerationTracker(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: records where each block lands in the rendered text."""

        tags = {"generation"}

        def __init__(self, environment: jinja2.Environment) -> None:
            super().__init__(environment)
            self.tracking: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar(
                "generation_tracking", default=None
            )
            environment.extend(track_generation=self.track)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation"), [], [], body).set_lineno(lineno)

        def _generation(self, caller: Any) -> str:
            text = caller()
            tracking = self.tracking.get()
            if tracking is not None:
                blocks, spans = tracking
                start = sum(len(block) for block in blocks)
                spans.append((start, start + len(text)))
            return text

        @contextmanager
        def track(self, blocks: list[str], spans: list[tuple[int, int]]) -> Iterator[None]:
            token = self.tracking.set((blocks, spans))
            try:
                yield
            finally:
                self.tracking.reset(token)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    class TemplateDict:  # dict() without attribute access to the type
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):  # no underscore attributes: no way into CPython internals
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTracker, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals.update(
        raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(), namespace=TemplateNamespace
    )
    return environment.from_string(template)


class ChatFormat:
    """A chat template with its tokenizer and stop tokens; see the module docstring for the API."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        template: str = CHAT_TEMPLATE,
        special_tokens: dict[str, str] | None = None,
        eos_token_ids: list[int] | None = None,
        where: str = "chat template",
    ) -> None:
        """`special_tokens`: template variables such as bos_token and eos_token (token texts);
        `eos_token_ids`: the ids that end a reply besides eos_token and the template's end of turn;
        `where`: how errors name the template (its file)."""
        self.tokenizer = tokenizer
        self.template = template
        self.where = where
        self.special_tokens = dict(special_tokens or {})
        self.atomlab_template = template == CHAT_TEMPLATE
        try:
            self._compiled = compile_template(template)
        except Exception as exc:  # jinja2.TemplateSyntaxError and friends
            raise AtomlabError(f"{where}: not a valid Jinja chat template ({exc})") from None
        self._globals = dict(self._compiled.globals)
        self.has_generation_blocks = re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None
        added = tokenizer.get_added_tokens_decoder()
        added_texts = {t.content for t in added.values()}
        self.control_tokens = sorted({t.content for t in added.values() if t.special}, key=len, reverse=True)
        pattern = "|".join(map(re.escape, self.control_tokens)) or "(?!)"
        self._control_re = re.compile(pattern)
        self._markers_re = re.compile(f"{MARK_START}({pattern}){MARK_END}|[{MARK_START}{MARK_END}]")
        self._newline_ids = tokenizer.encode("\n", add_special_tokens=False).ids
        self.end_of_turn = self._find_end_of_turn()
        stops = set(eos_token_ids or [])
        for text in (self.special_tokens.get("eos_token"), self.end_of_turn):
            if text is not None and tokenizer.token_to_id(text) is not None:
                stops.add(tokenizer.token_to_id(text))
        self.stop_token_ids: frozenset[int] = frozenset(stops)
        stop_texts = sorted(
            (tokenizer.id_to_token(i) for i in stops if tokenizer.id_to_token(i)), key=len, reverse=True
        )
        self._stop_re = re.compile("|".join(map(re.escape, stop_texts)) or "(?!)")
        known = [t for t in (self.end_of_turn, self.special_tokens.get("eos_token")) if t and t in added_texts]
        # the token that ends a reply (a sample during training stops there): the end of turn, else eos
        self.reply_end: str | None = known[0] if known else (stop_texts[0] if stop_texts else None)
        # an id to pad training rows with (padding is never trained on): the pad token, else a stop token
        pads = [t for t in (self.special_tokens.get("pad_token"), PAD) if t and t in added_texts]
        self.pad_token_id: int = tokenizer.token_to_id(pads[0]) if pads else min(stops, default=0)

    # ------------------------------------------------------------------ construction

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> ChatFormat:
        """atomlab's own format: CHAT_TEMPLATE, ending replies with <|end|> and text with <|endoftext|>."""
        special = {name: token for name, token in (("eos_token", END_OF_TEXT), ("pad_token", PAD))}
        special = {name: token for name, token in special.items() if tokenizer.token_to_id(token) is not None}
        return cls(tokenizer, CHAT_TEMPLATE, special, where="atomlab chat template")

    @classmethod
    def from_folder(cls, folder: str | Path, tokenizer: Tokenizer | None = None) -> ChatFormat:
        """The format of a bundle or Hugging Face model folder: its chat template (chat_template.jinja or
        tokenizer_config.json's chat_template), its special tokens, and its eos ids (generation_config.json,
        else config.json). A folder without a template gets atomlab's."""
        folder = Path(folder)
        tokenizer = tokenizer or load_tokenizer(folder / "tokenizer.json")
        config = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
        special = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        special = {name: text for name, text in special.items() if text is not None}
        template = _template_from(config, folder)
        if template is None:
            atomlab = cls.for_tokenizer(tokenizer)
            special = {**atomlab.special_tokens, **special}
            template, where = CHAT_TEMPLATE, "atomlab chat template"
        else:
            where = str(
                folder
                / ("chat_template.jinja" if (folder / "chat_template.jinja").is_file() else "tokenizer_config.json")
            )
        generation = _read_json(folder / "generation_config.json")
        eos_ids = _ids(generation.get("eos_token_id")) or _ids(_read_json(folder / "config.json").get("eos_token_id"))
        return cls(tokenizer, template, special, eos_ids, where=where)

    def describe(self) -> dict[str, Any]:
        """The format as a step records it: where the template came from, its sha256, the stop token ids."""
        return {
            "template": Path(self.where).name,  # the file's name: no path of this machine in a step's outputs
            "template_sha256": hashlib.sha256(self.template.encode("utf-8")).hexdigest(),
            "stop_token_ids": sorted(self.stop_token_ids),
        }

    # ------------------------------------------------------------------ rendering

    def _check(self, messages: list[Message]) -> list[Message]:
        """Messages as the template sees them: plain dicts without None values, reasoning under every name."""
        if not isinstance(messages, list) or not messages:
            raise AtomlabError("chat: a conversation must be a non-empty list of messages")
        checked = []
        for number, message in enumerate(messages, 1):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise AtomlabError(f"chat message {number}: must be an object with a role")
            role, content = message.get("role"), message.get("content")
            if self.atomlab_template and role not in CHAT_ROLES:
                raise AtomlabError(f"chat message {number}: role {role!r} is not one of {', '.join(CHAT_ROLES)}")
            if self.atomlab_template and not isinstance(content, str):
                raise AtomlabError(f"chat message {number}: content must be text, got {type(content).__name__}")
            message = {key: value for key, value in message.items() if value is not None}
            reasoning = next((message[key] for key in REASONING_FIELDS if key in message), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
            checked.append(message)
        return checked

    def _render(self, messages: list[Message], add_generation_prompt: bool, spans: list | None = None) -> str:
        import jinja2

        variables = {
            **self._globals,
            **self.special_tokens,
            "messages": messages,
            "tools": None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            # a shared context of the globals and variables: what Template.render does, less the merge of
            # the globals into a new context on every call (most of a short render's time)
            context = self._compiled.new_context(variables, shared=True)
            if spans is None:
                return "".join(self._compiled.root_render_func(context))
            blocks: list[str] = []
            with self._compiled.environment.track_generation(blocks, spans):
                for block in self._compiled.root_render_func(context):
                    blocks.append(block)
            return "".join(blocks)
        except jinja2.TemplateError as exc:
            raise AtomlabError(f"{self.where}: {exc}") from None

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as text, exactly as transformers' apply_chat_template(tokenize=False) renders it."""
        return self._render(self._check(messages), add_generation_prompt)

    def _mark(self, value: Any) -> Any:
        """Special-token text in every string of a message wrapped in markers (markers already there dropped,
        so none can be forged)."""
        if isinstance(value, str):
            value = value.replace(MARK_START, "").replace(MARK_END, "")
            return self._control_re.sub(f"{MARK_START}\\g<0>{MARK_END}", value)
        if isinstance(value, dict):
            return {key: self._mark(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._mark(item) for item in value]
        return value

    # ------------------------------------------------------------------ encoding

    def prompt(self, messages: list[Message]) -> list[int]:
        """Token ids of the conversation followed by the template's generation prompt: what to generate from."""
        return self.encode(messages, add_generation_prompt=True)[0]

    def encode(self, messages: list[Message], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation and, per token, whether it belongs to an assistant reply."""
        return self.encode_many([messages], add_generation_prompt)[0]

    def encode_many(
        self, conversations: list[list[Message]], add_generation_prompt: bool = False
    ) -> list[tuple[list[int], list[bool]]]:
        """`encode` of each conversation; the ones without special-token text in them are encoded in one batch."""
        rendered = []
        for messages in conversations:
            marked = self._mark(self._check(messages))
            spans: list[tuple[int, int]] = []
            text = self._render(marked, add_generation_prompt, spans if self.has_generation_blocks else None)
            if not self.has_generation_blocks:
                spans = self._reply_spans(marked, text, add_generation_prompt)
            rendered.append((text, spans))
        plain = [i for i, (text, _) in enumerate(rendered) if MARK_START not in text and MARK_END not in text]
        whole = self.tokenizer.encode_batch([rendered[i][0] for i in plain], add_special_tokens=False)
        encoded: dict[int, tuple[list[int], list[tuple[int, int]]]] = {
            i: (encoding.ids, encoding.offsets) for i, encoding in zip(plain, whole, strict=True)
        }
        results = []
        for i, (text, spans) in enumerate(rendered):
            ids, offsets = encoded[i] if i in encoded else self._encode_marked(text)
            results.append((ids, _mask(offsets, spans)))
        return results

    def _encode_piece(self, text: str, start: int, as_text: bool) -> tuple[list[int], list[tuple[int, int]]]:
        """A piece from inside a conversation, encoded after a newline (so a SentencePiece tokenizer adds
        no word-start space, as at the start of a text) that is then removed; offsets into the whole."""
        if as_text:
            ids = encode_plain(self.tokenizer, ["\n" + text])[0]
            if ids[: len(self._newline_ids)] == self._newline_ids:
                ids = ids[len(self._newline_ids) :]
            else:
                ids = encode_plain(self.tokenizer, [text])[0]
            if self.tokenizer.token_to_id(text) in ids:
                raise AtomlabError(f"{self.where}: {text!r} cannot be spelled as text by this tokenizer")
            return ids, [(start, start + len(text))] * len(ids)
        encoding = self.tokenizer.encode("\n" + text, add_special_tokens=False)
        skip = len(self._newline_ids)
        if encoding.ids[:skip] == self._newline_ids:
            return encoding.ids[skip:], [(start + a - 1, start + b - 1) for a, b in encoding.offsets[skip:]]
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, [(start + a, start + b) for a, b in encoding.offsets]

    def _encode_marked(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Rendered text with marked special-token text: the marked pieces as text, the rest as usual; a lone
        marker (a template's string method cut a marked piece) is dropped but still separates the text around it."""
        first = self.tokenizer.encode(text[: self._first_marker(text)], add_special_tokens=False)
        ids, offsets = list(first.ids), list(first.offsets)
        position = self._first_marker(text)
        for match in self._markers_re.finditer(text):
            if match.start() < position:
                continue
            if match.start() > position:
                piece_ids, piece_offsets = self._encode_piece(text[position : match.start()], position, as_text=False)
                ids += piece_ids
                offsets += piece_offsets
            if match.group(1) is not None:
                piece_ids, piece_offsets = self._encode_piece(match.group(1), match.start(1), as_text=True)
                ids += piece_ids
                offsets += piece_offsets
            position = match.end()
        if position < len(text):
            piece_ids, piece_offsets = self._encode_piece(text[position:], position, as_text=False)
            ids += piece_ids
            offsets += piece_offsets
        return ids, offsets

    def _first_marker(self, text: str) -> int:
        match = self._markers_re.search(text)
        return match.start() if match else len(text)

    # ------------------------------------------------------------------ what an assistant writes

    def _reply_spans(self, marked: list[Message], text: str, add_generation_prompt: bool) -> list[tuple[int, int]]:
        """Character spans of the assistant replies in the rendered conversation (templates without
        `{% generation %}`): from the end of the generation prompt through the reply's first stop token."""
        spans = []
        for index, message in enumerate(marked):
            if message.get("role") != "assistant":
                continue
            before = self._render(marked[:index], add_generation_prompt=True) if index else ""
            last = index + 1 == len(marked)
            through = text if last and not add_generation_prompt else self._render(marked[: index + 1], False)
            if index and not text.startswith(before):
                raise AtomlabError(
                    f"{self.where}: assistant message {index + 1} does not follow the generation prompt in the "
                    "rendered conversation, so its reply cannot be found; mark replies with {% generation %}"
                )
            start = len(before)
            bound = len(through) if text.startswith(through) else len(text)
            end = bound
            for stop in self._stop_re.finditer(text, start):
                if stop.start() > 0 and text[stop.start() - 1] == MARK_START:
                    continue  # typed in the message: text, not the end of the reply
                if stop.end() <= bound:
                    end = stop.end()
                break
            spans.append((start, end))
        return spans

    def _find_end_of_turn(self) -> str | None:
        """The control token the template writes right after an assistant reply, if any."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
        try:
            before = self._render(probe[:1], add_generation_prompt=True)
            through = self._render(probe, add_generation_prompt=False)
        except AtomlabError:
            return None
        if not through.startswith(before) or "Hello there" not in through[len(before) :]:
            return None
        after = through.index("Hello there", len(before)) + len("Hello there")
        match = self._control_re.search(through, after)
        return match.group() if match else None


def _mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Tokens overlapping a span (spans and offsets both in order), as transformers' assistant mask."""
    mask = [False] * len(offsets)
    span = 0
    for index, (start, end) in enumerate(offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        if end > spans[span][0]:
            mask[index] = True
    return mask
