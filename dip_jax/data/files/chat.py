"""A Hugging Face tokenizer directory and its chat template: conversations -> tokens + loss labels.

The template is rendered with jinja2 the way transformers renders it (sandboxed, trim_blocks,
lstrip_blocks, `raise_exception`, bos/eos tokens in the context), and the text tokenised with
`add_special_tokens=False`, as `apply_chat_template(tokenize=True)` does.

Loss labels cover the assistant turns only. Few templates carry generation markers, so each
assistant span is found by rendering turn by turn: the span of turn i is what rendering turns
[0, i] adds to rendering turns [0, i) with the generation prompt, i.e. the answer and the
template's end-of-turn text, which the model must learn to emit to stop.

Placeholders: `<image>` and `<audio>` are added as special tokens when the tokenizer lacks them,
and the ids the tokenizer gives them are the data's placeholder ids (collate finds the encoder
positions by them). Writing the specs' reserved ids instead would collide with whatever text
token a real vocabulary has at those ids.
"""
from __future__ import annotations

import functools
import hashlib
import json
import pathlib

import numpy as np

from dip_jax.data.files.records import AUDIO, IMAGE

DEFAULT_TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}"
                    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


class TemplateError(ValueError):
    pass


def _token_text(v) -> str:
    return v.get("content", "") if isinstance(v, dict) else (v or "")


class ChatTokenizer:
    def __init__(self, directory: str):
        from tokenizers import AddedToken, Tokenizer
        d = pathlib.Path(directory)
        if not (d / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{d}: no tokenizer.json in the tokenizer directory")
        self.tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        conf = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").is_file() else {}
        template = conf.get("chat_template") or DEFAULT_TEMPLATE
        if isinstance(template, list):                  # named templates: the default one
            template = next(t["template"] for t in template if t.get("name") == "default")
        self.bos, self.eos = _token_text(conf.get("bos_token")), _token_text(conf.get("eos_token"))
        # a marker must encode as one id: a vocabulary entry the pre-tokenizer splits is not one
        missing = [t for t in (IMAGE, AUDIO) if self.tok.token_to_id(t) is None
                   or self.tok.encode(t, add_special_tokens=False).ids != [self.tok.token_to_id(t)]]
        if missing:
            self.tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        self.image_id, self.audio_id = self.tok.token_to_id(IMAGE), self.tok.token_to_id(AUDIO)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = tuple(sorted(i for i, t in self.tok.get_added_tokens_decoder().items() if t.special))
        self.template = _compile(template)
        h = hashlib.sha256((d / "tokenizer.json").read_bytes())
        h.update(template.encode())
        self.fingerprint = h.hexdigest()[:16]

    def render(self, turns, add_generation_prompt: bool = False) -> str:
        messages = [{"role": r, "content": t} for r, t in turns]
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos, eos_token=self.eos)

    def assistant_spans(self, turns) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant turns."""
        full = self.render(turns)
        spans = []
        for i, (role, _) in enumerate(turns):
            if role != "assistant":
                continue
            before, upto = self.render(turns[:i], add_generation_prompt=True), self.render(turns[:i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise TemplateError("the chat template does not render a conversation as the sum of its turns")
            spans.append((len(before), len(upto)))
        return full, spans

    def encode(self, turns) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, labels): a token is a label when it starts inside an assistant span."""
        text, spans = self.assistant_spans(turns)
        enc = self.tok.encode(text, add_special_tokens=False)
        ids = np.asarray(enc.ids, np.int32)
        starts = np.asarray([a for a, _ in enc.offsets] or [0])[:len(ids)]
        labels = np.zeros(len(ids), bool)
        for a, b in spans:
            labels |= (starts >= a) & (starts < b)
        labels &= (ids != self.image_id) & (ids != self.audio_id)
        return ids, labels


@functools.lru_cache(maxsize=8)
def _compile(source: str):
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` renders its body: the spans come from turns."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", Generation])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat_template does not compile: {e}") from None


def expand(ids: np.ndarray, labels: np.ndarray, widths: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Each placeholder token -> its run of encoder positions: `widths[id]` lists, per occurrence
    in order, how many sequence tokens that media item takes (tiles x tokens per image, clips x
    tokens per clip)."""
    out_ids, out_labels, seen = [], [], {k: 0 for k in widths}
    for t, lab in zip(ids.tolist(), labels.tolist()):
        if t in widths:
            n = widths[t][seen[t]]
            seen[t] += 1
            out_ids += [t] * n
            out_labels += [False] * n
        else:
            out_ids.append(t)
            out_labels.append(lab)
    return np.asarray(out_ids, np.int32), np.asarray(out_labels, bool)
