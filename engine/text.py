"""Token ids to text, one token at a time, and stop-sequence matching on that text."""

from dataclasses import dataclass, field


@dataclass
class IncrementalDetokenizer:
    """Decodes a growing list of ids so each new token yields exactly the text it adds.

    Byte-level BPE tokens can hold half a UTF-8 character, and SentencePiece tokens change the
    text of their left neighbour (leading spaces), so a token's text is the difference between
    decoding a short window with and without it, as TGI's `decode_token` does. While the
    window decodes to an incomplete character (U+FFFD) the token yields "" and the text
    arrives with a later token.
    """

    tokenizer: object
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0

    def __post_init__(self) -> None:
        # A few prompt tokens give the first generated token its left context.
        self.ids = list(self.prompt_ids[-5:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token_id: int) -> str:
        """Append one token id; return the text it completes (possibly "")."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix) :]
        return ""


def find_stop(text: str, new_len: int, stop_sequences: list[str]) -> int | None:
    """End index in `text` of the first stop sequence that overlaps its last `new_len` chars."""
    for stop in stop_sequences:
        start = max(0, len(text) - new_len - len(stop) + 1)
        index = text.find(stop, start)
        if index >= 0:
            return index + len(stop)
    return None
