"""What one request router remembers between requests: which replica served which prompt
prefix, and which requests it sent that the replicas' last load reports may not show.

Plain Python, no Ray calls: the router (deployments/router.py) owns one of each, and tests
drive them with explicit clocks.
"""

from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass


class PrefixIndex:
    """Prompt prefix → the replica that served it last, for at most `max_entries` prefixes.

    A prompt is keyed by the hashes of its first K characters for each K in
    `prefix_lengths` it is at least as long as; a lookup takes the longest K that
    matches, so a shared system prompt and a shared conversation both find their
    replica. Least recently recorded prefixes are evicted first.
    """

    def __init__(self, prefix_lengths: Sequence[int], max_entries: int):
        if not prefix_lengths or min(prefix_lengths) < 1 or max_entries < 1:
            raise ValueError("prefix_lengths must be positive and max_entries >= 1")
        self._lengths = sorted(set(prefix_lengths), reverse=True)  # longest first
        self._max_entries = max_entries
        self._replica_by_key: OrderedDict[int, Hashable] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._replica_by_key)

    def _keys(self, prompt: str) -> list[int]:
        # Python's str hash is salted per process; the index never leaves this one.
        return [hash(prompt[:k]) for k in self._lengths if len(prompt) >= k]

    def lookup(self, prompt: str) -> Hashable | None:
        """The replica that last served this prompt's longest recorded prefix."""
        for key in self._keys(prompt):
            replica_id = self._replica_by_key.get(key)
            if replica_id is not None:
                return replica_id
        return None

    def record(self, prompt: str, replica_id: Hashable) -> None:
        for key in self._keys(prompt):
            self._replica_by_key[key] = replica_id
            self._replica_by_key.move_to_end(key)
        while len(self._replica_by_key) > self._max_entries:
            self._replica_by_key.popitem(last=False)

    def forget_replicas_except(self, live_replica_ids: Iterable[Hashable]) -> None:
        live = set(live_replica_ids)
        for key in [k for k, r in self._replica_by_key.items() if r not in live]:
            del self._replica_by_key[key]


@dataclass(frozen=True)
class Unreported:
    """Work a replica's last report does not show (negative: it shows finished work)."""

    num_tokens: int
    num_requests: int


@dataclass
class _Sent:
    replica_id: Hashable
    num_tokens: int  # prompt + new tokens
    sent_at: float
    confirmed: bool  # the replica accepted it (on_request_routed); else a reservation
    num_new_tokens: int = 0


@dataclass(frozen=True)
class _Finished:
    replica_id: Hashable
    num_tokens: int
    sent_at: float
    finished_at: float


class InFlightLedger:
    """The requests this router sent, kept so a replica's load counts them before its next
    report does.

    A report taken at time t counts every request sent before t that was still running
    at t. So a replica's load now is its last report
      + the tokens of its requests sent after t and not finished,
      - the tokens of its requests sent before t and finished since.
    A replica with no report yet counts everything it was sent.

    Ranking a request reserves its tokens on the first-ranked replica at once, so a burst
    of requests ranked before any is accepted spreads out; acceptance confirms the entry
    on the replica that took it. A reservation never confirmed (the caller gave up) is
    dropped after `reservation_ttl_s`. A request whose completion never arrives counts
    only until the replica's next report. At most `max_entries` requests are kept in
    flight and as many finished ones; beyond that the oldest are dropped.
    """

    def __init__(self, reservation_ttl_s: float, max_entries: int = 100_000):
        self._reservation_ttl_s = reservation_ttl_s
        self._max_entries = max_entries
        self._sent: OrderedDict[str, _Sent] = OrderedDict()  # by request id, oldest first
        self._finished: deque[_Finished] = deque(maxlen=max_entries)

    def __len__(self) -> int:
        return len(self._sent)

    def reserve(
        self, request_id: str, replica_id: Hashable, num_tokens: int, now: float,
        num_new_tokens: int = 0,
    ) -> None:  # fmt: skip
        """`num_tokens`: prompt + new tokens, `num_new_tokens` of them new."""
        self._add(request_id, _Sent(replica_id, num_tokens, now, False, num_new_tokens))

    def confirm(
        self, request_id: str, replica_id: Hashable, num_tokens: int, now: float,
        num_new_tokens: int = 0,
    ) -> None:  # fmt: skip
        self._add(request_id, _Sent(replica_id, num_tokens, now, True, num_new_tokens))

    def _add(self, request_id: str, entry: _Sent) -> None:
        self._sent.pop(request_id, None)
        self._sent[request_id] = entry
        while len(self._sent) > self._max_entries:
            self._sent.popitem(last=False)

    def finish(self, request_id: str, now: float) -> None:
        """The request ended (any outcome). Unknown ids are ignored: Serve also reports
        requests a replica rejected."""
        entry = self._sent.pop(request_id, None)
        if entry is not None and entry.confirmed:
            self._finished.append(_Finished(entry.replica_id, entry.num_tokens, entry.sent_at, now))

    def unreported(
        self, reported_at_by_replica: dict[Hashable, float | None], now: float
    ) -> dict[Hashable, Unreported]:
        """What to add to each replica's last report, given when it was taken (None:
        never): tokens and requests, negative when more finished than started since."""
        num_tokens = dict.fromkeys(reported_at_by_replica, 0)
        num_requests = dict.fromkeys(reported_at_by_replica, 0)
        expired = now - self._reservation_ttl_s
        for request_id, entry in list(self._sent.items()):
            if not entry.confirmed and entry.sent_at < expired:
                del self._sent[request_id]
            elif entry.replica_id in num_tokens:
                reported_at = reported_at_by_replica[entry.replica_id]
                if reported_at is None or entry.sent_at > reported_at or not entry.confirmed:
                    num_tokens[entry.replica_id] += entry.num_tokens
                    num_requests[entry.replica_id] += 1
        still_relevant: deque[_Finished] = deque(maxlen=self._max_entries)
        for done in self._finished:
            reported_at = reported_at_by_replica.get(done.replica_id)
            if reported_at is not None and done.finished_at <= reported_at:
                continue  # this report, and every later one, was taken after it finished
            if reported_at is not None and done.sent_at <= reported_at:
                num_tokens[done.replica_id] -= done.num_tokens  # the report still counts it
                num_requests[done.replica_id] -= 1
            still_relevant.append(done)  # a report still in transit may count it
        self._finished = still_relevant
        return {r: Unreported(num_tokens[r], num_requests[r]) for r in num_tokens}

    def sent_since(self, replica_id: Hashable, since: float) -> list[tuple[float, int, int]]:
        """(sent at, prompt tokens, new tokens) of the requests sent to a replica after
        `since` (its last report), reservations included."""
        return [
            (e.sent_at, e.num_tokens - e.num_new_tokens, e.num_new_tokens)
            for e in self._sent.values()
            if e.replica_id == replica_id and e.sent_at > since
        ]

    def forget_replicas_except(self, live_replica_ids: Iterable[Hashable]) -> None:
        live = set(live_replica_ids)
        for request_id in [i for i, e in self._sent.items() if e.replica_id not in live]:
            del self._sent[request_id]
        self._finished = deque(
            (f for f in self._finished if f.replica_id in live), maxlen=self._max_entries
        )
