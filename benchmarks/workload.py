"""Seeded benchmark workloads: prompt/output length distributions and prompts of exact length.

No dataset download: prompts are made of common English words drawn from a seeded generator
and cut to an exact token count with the model's tokenizer, so every engine and every run
sees the same requests.
"""

import math
import random
from dataclasses import dataclass

# Common words that are one token each in most BPE vocabularies (with a leading space).
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her it an were are which this "
    "be or has had not but first one their its new after who they have two been she he all "
    "also time other when there into more during most some only over city world year people "
    "state school many such these between high would what where made under while later four "
    "part may years three about against both before because second team used music known war "
    "early then game film since through group each called life same number well any being "
    "around season against found local five house family long days line built river place "
    "small great water government name last way another light history public work south north"
)
WORDS = tuple(dict.fromkeys(_WORD_TEXT.split()))


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution, written `fixed:N`, `uniform:LO:HI` or `chat:MEDIAN:MAX`.

    `chat` is long-tailed like real chat traffic: log-normal around MEDIAN (sigma 0.8),
    clipped to [4, MAX].
    """

    kind: str
    a: int
    b: int = 0

    @classmethod
    def parse(cls, spec: str) -> "LengthDist":
        kind, *nums = spec.split(":")
        arity = {"fixed": 1, "uniform": 2, "chat": 2}
        if kind not in arity or len(nums) != arity[kind] or not all(n.isdigit() for n in nums):
            raise ValueError(f"bad length spec {spec!r}: use fixed:N, uniform:LO:HI, chat:MED:MAX")
        dist = cls(kind, *map(int, nums))
        if dist.a < 1 or (kind != "fixed" and dist.b < dist.a):
            raise ValueError(f"bad length spec {spec!r}: need 1 <= first <= second")
        return dist

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return rng.randint(self.a, self.b)
        return min(self.b, max(4, round(rng.lognormvariate(math.log(self.a), 0.8))))

    def __str__(self) -> str:
        return ":".join([self.kind, str(self.a)] + ([str(self.b)] if self.kind != "fixed" else []))


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    num_prompt_tokens: int
    max_new_tokens: int


def make_requests(
    tokenizer, num_requests: int, input_len: LengthDist, output_len: LengthDist, seed: int
) -> list[BenchRequest]:
    """`num_requests` prompts of sampled exact token lengths, each with its output budget."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        num_tokens, max_new = input_len.sample(rng), output_len.sample(rng)
        words = " ".join(rng.choice(WORDS) for _ in range(num_tokens + 8))
        ids = tokenizer(words, add_special_tokens=False)["input_ids"][:num_tokens]
        requests.append(BenchRequest(tokenizer.decode(ids), len(ids), max_new))
    return requests
