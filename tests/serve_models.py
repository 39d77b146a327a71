"""Test doubles for the server with known outputs: a byte-level Hugging Face tokenizer (one token per UTF-8 byte, so an
emoji is 4 tokens and a CJK character 3) and a "successor" model whose greedy next token is a fixed function of the
current token (attention and MLP outputs zeroed, one-hot embeddings, ``lm_head`` maps token ``s`` to ``next(s)``).
The model still runs real attention and a real cache (full or compressed); only its answers are predictable."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PAD, BOS, EOS = 0, 1, 2
OFFSET = 3  # byte b is token b + 3
VOCAB = 256 + OFFSET

EMOJI = "\U0001F600"  # 4 bytes: F0 9F 98 80
CJK = "\u4e2d"  # 3 bytes: E4 B8 AD
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_tokenizer():
    """A real ``PreTrainedTokenizerFast``: byte-level BPE without merges, a chat template, pad/bos/eos 0/1/2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _byte_to_unicode()
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{b2u[b]: b + OFFSET for b in range(256)}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=TEMPLATE)


def _tok(ch: str | int) -> int:
    return (ch if isinstance(ch, int) else ord(ch)) + OFFSET


def successor_map() -> dict[int, int]:
    """Token -> greedy next token: 'a'..'y' -> the next letter, 'z' -> EOS; ' ' starts an endless run of EMOJI,
    '=' an endless run of CJK; every other token -> EOS."""
    nxt = {t: EOS for t in range(VOCAB)}
    for c in range(ord("a"), ord("z")):
        nxt[_tok(c)] = _tok(c + 1)
    for start, text in ((" ", EMOJI), ("=", CJK)):
        b = [_tok(x) for x in text.encode()]
        nxt[_tok(start)] = b[0]
        for x, y in zip(b, b[1:] + b[:1]):
            nxt[x] = y
    return nxt


def successor_model(max_position_embeddings: int = 1024, layers: int = 2) -> LlamaForCausalLM:
    """A Llama whose greedy continuation of any text is ``successor_map`` applied to its last token, over and over."""
    hidden = 272  # >= VOCAB: one-hot embeddings; 4 heads of 68
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
                         pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        emb = torch.zeros(VOCAB, hidden)  # [V, hidden]
        emb[:, :VOCAB] = torch.eye(VOCAB)
        model.model.embed_tokens.weight.copy_(emb)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()  # the residual stream stays the current token's one-hot
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(VOCAB, hidden)  # [V, hidden]: logit of j = [next(s) == j] * sqrt(hidden)
        for s, j in successor_map().items():
            head[j, s] = 1.0
        model.lm_head.weight.copy_(head)
    return model


def expected(prompt: str, n: int) -> str:
    """The successor model's greedy text after ``prompt`` (tokens, up to ``n`` of them or EOS), decoded."""
    nxt = successor_map()
    tok = list(prompt.encode())[-1] + OFFSET
    out = []
    for _ in range(n):
        tok = nxt[tok]
        if tok == EOS:
            break
        out.append(tok - OFFSET)
    return bytes(out).decode("utf-8", errors="replace")
