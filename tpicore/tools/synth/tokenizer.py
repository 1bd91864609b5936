"""The synthetic tokenizer: a real byte-level BPE trained on a built-in corpus, padded to any vocab_size.

Layer: tools (imports tpicore.errors only). Owns where special tokens go in the vocabulary (llama2 or
llama3 style, which fixes the presets' bos/eos ids), tokenizer.json and tokenizer_config.json (special
tokens and chat template). Must not touch weights or write files (the writers in this package do).
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from tpicore.errors import TpiError

# ---------------------------------------------------------------------------------------------
# Vocabulary layout (which id each special token gets; needed by the presets' bos/eos ids)

LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
)

_ASCII_BYTES = [9, 10] + list(range(32, 127))  # tab, newline, printable ASCII: the tiny alphabet


class VocabLayout:
    """Where ids go: [lead specials][trained BPE][<|reserved_N|> fillers][tail specials] = vocab_size.

    llama2 style: <unk> 0, <s> 1, </s> 2 lead (as in Llama 2). llama3 style: the special tokens sit at
    the end as in Llama 3 (<|begin_of_text|> = 128000 when vocab_size is 128256): 256 of them when the
    vocabulary is large, only the 11 named ones in tiny test vocabularies.
    """

    def __init__(self, style: str, vocab_size: int) -> None:
        self.style = style
        self.lead: list[str] = []
        self.tail: list[str] = []
        if style == "llama2":
            self.lead = ["<unk>", "<s>", "</s>"]
            self.bos, self.eos, self.unk = "<s>", "</s>", "<unk>"
            self.eos_tokens = ["</s>"]
        else:
            self.tail = list(LLAMA3_NAMED_SPECIALS)
            if vocab_size >= 1024:
                self.tail += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(self.tail))]
            self.bos, self.eos, self.unk = "<|begin_of_text|>", "<|eot_id|>", None
            self.eos_tokens = ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]
        self.room = vocab_size - len(self.lead) - len(self.tail)  # ids for trained tokens + fillers
        if self.room < len(_ASCII_BYTES):
            raise TpiError(f"vocab_size {vocab_size} is too small for a synthetic {style} tokenizer "
                           f"(minimum {len(_ASCII_BYTES) + len(self.lead) + len(self.tail)})")
        self.vocab_size = vocab_size
        ids = {tok: i for i, tok in enumerate(self.lead)}
        ids.update({tok: vocab_size - len(self.tail) + i for i, tok in enumerate(self.tail)})
        self.ids = ids
        self.bos_id = ids[self.bos]
        self.eos_ids = [ids[t] for t in self.eos_tokens]


@lru_cache(maxsize=None)
def vocab_layout(style: str, vocab_size: int) -> VocabLayout:
    return VocabLayout(style, vocab_size)


def tokenizer_style(config: dict) -> str:
    """"llama3" (<|begin_of_text|>, header tokens) or "llama2" (<s>, </s>, [INST]) for a config."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}  # transformers 4 or 5
    if scaling.get("rope_type", scaling.get("type")) == "llama3" or config["vocab_size"] >= 100_000:
        return "llama3"
    return "llama2"


# ---------------------------------------------------------------------------------------------
# tokenizer_config.json and tokenizer.json

# Llama-3-Instruct's template.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Llama-2-chat's template ([INST] ... [/INST], optional <<SYS>> block in the first user turn).
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def tokenizer_config_dict(config: dict) -> dict:
    """tokenizer_config.json for our synthetic tokenizer of `config`: special tokens and chat template."""
    style = tokenizer_style(config)
    layout = vocab_layout(style, config["vocab_size"])
    tc: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": layout.bos,
                          "eos_token": layout.eos}
    if style == "llama2":
        # As in Llama 2's files (Llama 3's rely on the post-processor alone); both agree with tokenizer.json.
        tc.update(unk_token=layout.unk, add_bos_token=True, add_eos_token=False)
    tc.update(clean_up_tokenization_spaces=False, model_max_length=config["max_position_embeddings"],
              chat_template=LLAMA3_CHAT_TEMPLATE if style == "llama3" else LLAMA2_CHAT_TEMPLATE)
    return tc


def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map, as used by the ByteLevel pre-tokenizer."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_WORDS = """
the of and to in is was for on that with as by at from his her they this which we you it be are have had
not but all were when there can an one their been has more if will would who so no out up about into them
than its only other some time could these two may first then do any like my now over such our man me even
most made after also did many before must through back years where much your way well down should because
each just those people how too little state good very make world still own see men work long get here
between both life being under never day same another know while last might us great old year off come
since against go came right used take three small large house water light city river mountain garden
window table paper letter story music number word question answer school family friend morning evening
night summer winter spring autumn road bridge train ship engine machine model token layer device network
memory disk speed time second minute hour computer program system data file value matrix vector weight
tensor parallel inference edge laptop phone cluster server message reply signal channel bandwidth latency
green blue red yellow white black bright dark quiet loud warm cold happy careful simple clever strange
open close read write send receive build carry follow find keep leave begin start finish stop travel
walk run think learn teach speak listen watch wait hope try help show tell ask call move play sing
""".split()
_CHAT_LINES = [
    "Hello! How can I help you today?",
    "What is the capital of France? The capital of France is Paris.",
    "Please write a short story about a robot who learns to paint.",
    "Sure, here is a list: 1. apples, 2. bread, 3. milk.",
    "def add(a, b):\n    return a + b",
    "The answer is 42; see section 3.1 (page 7) for details.",
    "I don't know, but I'll try my best to find out.",
    "Thanks a lot - that's exactly what I needed!",
]


@lru_cache(maxsize=1)
def corpus_lines() -> tuple[str, ...]:
    """A few hundred KB of English-ish ASCII text, the same on every run (no downloads)."""
    rng = random.Random(1234)
    lines = list(_CHAT_LINES) * 20
    for _ in range(4000):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 16))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        text = " ".join(words)
        text = text[0].upper() + text[1:] + rng.choice(".....?!,;:")
        if rng.random() < 0.15:
            text = f"\"{text}\" she said."
        lines.append(text)
    return tuple(lines)


@lru_cache(maxsize=None)
def build_tokenizer_json(style: str, vocab_size: int) -> str:
    """tokenizer.json text of a trained BPE with exactly `vocab_size` ids (cached per process).

    Byte-level BPE (like Llama 3) trained on `corpus_lines()`. Vocabularies too small for the 256-byte
    alphabet (the tiny test models) get a BPE over the byte-level characters of printable ASCII,
    tab and newline only: ASCII text round-trips, other characters become <unk> (llama2 style) or
    are dropped (llama3 style, which has no <unk>). A tiny corpus yields a few thousand merges at
    most; the rest of the vocabulary is `<|reserved_N|>` filler in the BPE vocab, which never
    appears when encoding but decodes to visible text (so random-weight output is not empty).
    """
    layout = vocab_layout(style, vocab_size)
    full_bytes = layout.room >= 256 + 32
    byte_chars = _byte_level_chars()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if full_bytes else [byte_chars[b] for b in _ASCII_BYTES]
    tok = Tokenizer(models.BPE(unk_token=layout.unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=len(layout.lead) + layout.room, special_tokens=layout.lead,
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(corpus_lines(), trainer)

    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    n_filler = len(layout.lead) + layout.room - len(vocab)
    for i in range(n_filler):
        vocab[f"<|reserved_{i}|>"] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(data))
    if layout.tail:
        tok.add_special_tokens(layout.tail)  # ids continue after the fillers: the tail of the vocab
    bos_id = layout.bos_id
    tok.post_processor = processors.TemplateProcessing(
        single=f"{layout.bos}:0 $A:0", pair=f"{layout.bos}:0 $A:0 {layout.bos}:1 $B:1",
        special_tokens=[(layout.bos, bos_id)])
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size or any(tok.token_to_id(t) != i for t, i in layout.ids.items()):
        raise AssertionError(f"synthetic tokenizer layout is off: {got} ids for vocab_size {vocab_size}")
    return tok.to_str()
