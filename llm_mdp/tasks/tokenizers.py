"""Character-level tokenizers built locally, so built-in tasks need no download.

They are real :class:`transformers.PreTrainedTokenizerFast` objects, so built-in tasks
and Hugging Face models share one interface (``encode``, ``batch_decode``, special ids).
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<eos>"


def char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per character of ``alphabet``.

    Ids: ``0 = <eos>``, then the characters in the order given. EOS doubles as the pad
    token (GPT-2 style), so the only special token is EOS and *every* id is a legal
    action: the action space ``Discrete(len(tok))`` holds no token that the reward's
    decoding would silently drop (see :func:`llm_mdp.tasks.legal_action_mask`).
    Characters outside the alphabet raise on encoding (there is no unknown token), so a
    prompt the task cannot express fails loudly instead of silently dropping text.

    >>> tok = char_tokenizer("ab")
    >>> tok("ba").input_ids, tok.decode([1, 2, 0], skip_special_tokens=True)
    ([2, 1], 'ab')
    """
    chars = list(dict.fromkeys(alphabet))
    if len(chars) != len(alphabet):
        raise ValueError(f"alphabet {alphabet!r} repeats a character")
    if not chars:
        raise ValueError("alphabet is empty")
    vocab = {EOS_TOKEN: 0}
    for ch in chars:
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=EOS_TOKEN, eos_token=EOS_TOKEN)
    tok.padding_side = "left"
    return tok
