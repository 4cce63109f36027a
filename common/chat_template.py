"""Chat templates: a conversation rendered into the prompt text a chat model was trained on.

Rendered as transformers' ``apply_chat_template`` renders it, without torch or transformers: a
sandboxed jinja2 environment (chat templates come with models, so they are untrusted code)
with the same options, globals and filters, and the tokenizer's named special tokens as
variables. The rendered text already holds the special tokens the model expects: tokenize it
without adding any (transformers encodes it with ``add_special_tokens=False``).

The template of a model directory is its ``chat_template.jinja``, else ``tokenizer_config.json``'s
``chat_template`` (a string, or a list of named templates of which "default" is used).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# The special tokens a template sees by name: transformers' SPECIAL_TOKENS_ATTRIBUTES.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A template that cannot be read or compiled, or a conversation it refuses to render."""


class ChatTemplate:
    """A compiled chat template and the special tokens it reads (``bos_token``, ...)."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _ENVIRONMENT.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"the chat template does not compile: {exc.message} "
                                    f"(line {exc.lineno})") from None

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages`` (dicts with "role" and "content"); with
        ``add_generation_prompt`` it ends with the header of the assistant's turn."""
        if not messages:
            raise ChatTemplateError("the conversation is empty: give at least one message")
        chat = [_message(i, m) for i, m in enumerate(messages)]
        try:
            return self._template.render(**self.special_tokens, messages=chat, tools=None,
                                         documents=None,
                                         add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as exc:  # raise_exception(...) in the template, among others
            raise ChatTemplateError(f"the chat template refused the conversation: {exc}") from None


def read_chat_template(model_dir: str | Path, override: str | Path | None = None) -> str | None:
    """The template source of the model directory ``model_dir``, or of the file ``override``
    when given; None when the model has none."""
    if override is not None:
        path = Path(override)
        if not path.is_file():
            raise ChatTemplateError(f"chat template file {path} does not exist")
        return path.read_text(encoding="utf-8")
    path = Path(model_dir) / TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = _tokenizer_config(model_dir).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ChatTemplateError(f"{Path(model_dir) / TOKENIZER_CONFIG_FILE} has chat "
                                    f"templates {sorted(map(str, named))} but none named "
                                    f"'default': pass one with --chat-template FILE")
        template = named["default"]
    return template


def read_special_tokens(model_dir: str | Path) -> dict[str, str]:
    """The named special tokens of ``tokenizer_config.json`` (bos_token, eos_token, ...) as
    text: the variables a chat template may read."""
    config = _tokenizer_config(model_dir)
    tokens = {name: _token_content(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
    return {name: token for name, token in tokens.items() if token is not None}


def _tokenizer_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / TOKENIZER_CONFIG_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(token) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    return token.get("content") if isinstance(token, dict) else token


def _message(index: int, message) -> dict:
    """A message as the template sees it: a plain dict, without keys whose value is None
    (OpenAI clients send ``"content": null``; templates expect the key to be absent)."""
    if not isinstance(message, Mapping):
        raise ChatTemplateError(f"message {index} must be a dict with 'role' and 'content', "
                                f"got {type(message).__name__}")
    return {key: value for key, value in message.items() if value is not None}


# ---------------------------------------------------------------- the environment, as transformers'

def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters, which a prompt must keep as they are
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` in templates, without the type itself (whose
    attributes would reach past the sandbox)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja's ``namespace`` refusing underscore-prefixed attributes (a way into CPython's
    internals)."""

    def __init__(*args, **kwargs):  # jinja's signature trick: namespace(self=...) still works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore-prefixed attributes on a namespace, "
                f"got {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks the assistant's tokens
    with it (for training masks); a prompt is its body, rendered in a scope of its own."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_Dict(), namespace=_Namespace)
    return env


_ENVIRONMENT = _environment()
