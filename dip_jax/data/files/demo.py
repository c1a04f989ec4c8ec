"""The files task's demo: scikit-learn's handwritten digits exported as PNG files with LLaVA-style
records whose answers can only be read from the images, and the small BPE tokenizer trained on
the records' text (shipped in demo_tokenizer/, rebuilt by `write_tokenizer`).

Each record shows 1..max_images digits (the images split 80/20 as the digits task splits them,
so evaluation sees only held-out images) and asks for them; the answer names each digit in
order ("three, seven, one.").
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

TOKENIZER_DIR = pathlib.Path(__file__).with_name("demo_tokenizer")
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTIONS = ("Which digits are written here?", "Read the digits in order.", "What numbers do these images show?")
SPECIALS = ("<pad>", "<unk>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<image>", "<audio>")
TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def conversation(digits, question: str) -> list[dict]:
    return [{"from": "human", "value": "<image>" * len(digits) + "\n" + question},
            {"from": "gpt", "value": ", ".join(WORDS[int(d)] for d in digits).capitalize() + "."}]


def demo_text() -> list[str]:
    """Every word the records use (what the tokenizer is trained on)."""
    import string
    return ([q + "\n" for q in QUESTIONS] + [", ".join(WORDS[i:] + WORDS[:i]).capitalize() + ".\n" for i in range(10)]
            + [string.printable])


def write_tokenizer(directory=TOKENIZER_DIR, vocab_size: int = 192) -> pathlib.Path:
    """A byte-level BPE over printable ASCII and the demo text (other bytes map to <unk>), small
    enough for the tiny configs' 256-token vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False)
    tok.train_from_iterator(demo_text() * 20, trainer)
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "</s>", "pad_token": "<pad>", "chat_template": TEMPLATE,
         "tokenizer_class": "PreTrainedTokenizerFast"}, indent=1))
    return d


def write_dataset(directory, train_records: int = 2000, eval_records: int = 200, max_images: int = 3,
                  seed: int = 0, blank: bool = False) -> pathlib.Path:
    """DIR/images/N.png (each digit image once) + DIR/train.jsonl + DIR/eval.jsonl. `blank`:
    every image is a uniform grey (the control: no answer can be read)."""
    from PIL import Image
    from dip_jax.data.digits import _load
    images, labels, train, held_out = _load()
    d = pathlib.Path(directory)
    (d / "images").mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        pixels = np.full((8, 8), 128, np.uint8) if blank else (img[..., 0] * 255).astype(np.uint8)
        Image.fromarray(pixels, "L").save(d / "images" / f"{i}.png")
    rng = np.random.default_rng(seed)
    for name, pool, n in (("train", train, train_records), ("eval", held_out, eval_records)):
        with open(d / f"{name}.jsonl", "w") as f:
            for r in range(n):
                k = int(rng.integers(1, max_images + 1))
                idx = rng.choice(pool, size=k)
                record = {"id": f"{name}-{r}", "image": [f"images/{i}.png" for i in idx],
                          "conversations": conversation(labels[idx], QUESTIONS[int(rng.integers(len(QUESTIONS)))])}
                f.write(json.dumps(record) + "\n")
    return d


def ensure_dataset(directory, **kw) -> pathlib.Path:
    """The demo dataset in `directory`, written on first use."""
    d = pathlib.Path(directory)
    if not (d / "eval.jsonl").is_file():
        write_dataset(d, **kw)
    return d
