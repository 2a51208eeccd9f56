"""Personal data out of the texts before anything is written: e-mails, phones, payment cards,
IBANs, IP addresses and @handles, replaced by typed placeholders (``<EMAIL>``).

What decides, per kind (a candidate is only replaced when its check passes):

* ``email``: local@domain with a top-level domain of letters (no deliverability look-up: a
  false positive costs a placeholder, a look-up would cost the network);
* ``phone``: Google's libphonenumber (``phonenumbers.PhoneNumberMatcher``, leniency VALID:
  the number must be a valid number of its region) for each of ``phone_regions``; numbers
  written with ``+`` are found whatever the region;
* ``credit_card``: 13 to 19 digits (spaces or dashes between) passing the Luhn checksum
  (``stdnum.luhn``);
* ``iban``: country code, check digits and BBAN passing the country's length and mod-97
  check (``stdnum.iban``);
* ``ip_address``: IPv4 and IPv6 as the standard library's ``ipaddress`` parses them;
* ``handle``: ``@name`` (not the middle of an e-mail), except the handles in ``keep_handles``
  (public accounts: the brand, the personas themselves).

Why not Presidio: its pattern recognizers are the model for these rules, but
``presidio_analyzer`` 2.2.366 cannot be imported without spaCy and its NLP engines (measured
here: 13 s of imports and +400 MiB RSS before one text is read, against collection's 150 MiB
goal), and its e-mail check asks ``tldextract``, which fetches the public suffix list over
the network on first use. The checksums come from the same well-kept libraries it relies on
(phonenumbers) or the reference one for identifiers (python-stdnum).

What this does not catch: names, street addresses, dates of birth, national ids, account
logins and anything else that needs a language model (Presidio's spaCy NER would find some
names and places); phone numbers of regions outside ``phone_regions`` written without ``+``;
obfuscated forms ("john at example dot com", digits spelled out); handles written without
``@``; card numbers that fail Luhn (typos) and IBANs with a wrong check.

Cost: most social posts have none of the trigger characters (an @, four digits, a colon
between hex digits), found by a few C-level scans; only the rest are matched, only candidates
are checked, and phonenumbers (the slow part, ~0.1 ms per region) only runs on a text with
seven digits in a row or so.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import get_args

from fine_tuning.config import PiiKind

PII_KINDS: tuple[str, ...] = get_args(PiiKind)
PLACEHOLDERS: dict[str, str] = {kind: f"<{kind.upper()}>" for kind in PII_KINDS}

# One pass over the text finds every candidate but phones. Each alternative is bounded (no
# nested unbounded repeats), so a hostile 150 KB body costs one linear scan.
_CANDIDATES = re.compile(
    r"(?P<email>(?<![\w.+-])[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){0,8}\.[A-Za-z]{2,24}\b)"
    r"|(?P<iban>\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b)"
    r"|(?P<credit_card>(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-]))"
    r"|(?P<ip_address>(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])"
    r"|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){1,7}(?::|(?::[0-9A-Fa-f]{1,4}){1,7}|[0-9A-Fa-f]{1,4})(?![\w:]))"
    r"|(?P<handle>(?<![\w.@+-])@[A-Za-z0-9_]{1,30}\b)"
)
# Seven digits with at most two separators between each: the least a phone number has.
_MAYBE_PHONE = re.compile(r"(?:\d[\s().\-/]{0,2}){6}\d")
# IPv6 needs a colon between hex digits (or "::").
_HEX_COLON = re.compile(r"[0-9A-Fa-f:]:[0-9A-Fa-f:]")
_DIGITS = "0123456789"


def _may_have_pii(text: str) -> bool:
    """The cheapest question first (a few C-level scans, no regex for most texts): e-mails and
    handles need an @, IPv6 a colon between hex digits, and every other kind at least four
    digits (1.2.3.4). A regular expression with alternatives costs ~20x more per text here."""
    if "@" in text:
        return True
    if sum(map(text.count, _DIGITS)) >= 4:
        return True
    return ":" in text and _HEX_COLON.search(text) is not None


@dataclass(frozen=True)
class Scrubbed:
    """A text with its PII replaced, the number of finds by kind, and how many characters of
    the original they covered."""

    text: str
    found: dict[str, int]
    pii_chars: int


class PiiScrubber:
    """Finds and replaces the configured kinds of PII (see the module docstring for each check)."""

    def __init__(
        self,
        kinds: Iterable[str] = PII_KINDS,
        keep_handles: Iterable[str] = (),
        phone_regions: Iterable[str] = ("US", "GB"),
    ) -> None:
        self.kinds = frozenset(kinds)
        unknown = self.kinds - set(PII_KINDS)
        if unknown:
            raise ValueError(f"unknown PII kinds {sorted(unknown)}; known: {', '.join(PII_KINDS)}")
        self._keep_handles = frozenset(handle.lstrip("@").casefold() for handle in keep_handles)
        self._phone_regions = tuple(phone_regions)
        if "phone" in self.kinds:
            import phonenumbers

            self._phonenumbers = phonenumbers
            unknown_regions = set(self._phone_regions) - phonenumbers.SUPPORTED_REGIONS
            if unknown_regions:
                raise ValueError(
                    f"data_collection.pii.phone_regions: {sorted(unknown_regions)} are not regions "
                    "phonenumbers knows"
                )

    def scrub(self, text: str) -> Scrubbed | None:
        """The text with its PII replaced, or None when it has none (the common case, cheap)."""
        if not self.kinds or not _may_have_pii(text):
            return None
        spans = self._spans(text)
        if not spans:
            return None
        found: dict[str, int] = {}
        parts: list[str] = []
        at = pii_chars = 0
        for start, end, kind in spans:
            parts.append(text[at:start])
            parts.append(PLACEHOLDERS[kind])
            found[kind] = found.get(kind, 0) + 1
            pii_chars += end - start
            at = end
        parts.append(text[at:])
        return Scrubbed("".join(parts), found, pii_chars)

    def _spans(self, text: str) -> list[tuple[int, int, str]]:
        """Non-overlapping (start, end, kind), in text order; an earlier, longer find wins."""
        spans: list[tuple[int, int, str]] = []
        for match in _CANDIDATES.finditer(text):
            kind = match.lastgroup
            assert kind is not None
            if kind not in self.kinds:
                continue
            end = self._checked_end(kind, match.group(), match.start())
            if end is not None:
                spans.append((match.start(), end, kind))
        if "phone" in self.kinds and _MAYBE_PHONE.search(text):
            spans.extend(self._phones(text))
        if len(spans) < 2:
            return spans
        spans.sort(key=lambda span: (span[0], -span[1]))
        kept: list[tuple[int, int, str]] = []
        for span in spans:
            if kept and span[0] < kept[-1][1]:
                continue  # inside (or across) a find already kept: a card's digits are not a phone too
            kept.append(span)
        return kept

    def _checked_end(self, kind: str, candidate: str, start: int) -> int | None:
        """Where the PII that starts at ``start`` ends, when the candidate passes its check."""
        if kind == "email":
            return start + len(candidate)
        if kind == "handle":
            return None if candidate[1:].casefold() in self._keep_handles else start + len(candidate)
        if kind == "credit_card":
            from stdnum import luhn

            digits = candidate.replace(" ", "").replace("-", "")
            return start + len(candidate) if 13 <= len(digits) <= 19 and luhn.is_valid(digits) else None
        if kind == "iban":
            from stdnum import iban

            # The pattern may have taken a short upper-case word after the number as a last
            # group: try the longest candidate first, then without its last group.
            groups = candidate.split(" ")
            for count in range(len(groups), 0, -1):
                prefix = " ".join(groups[:count])
                if iban.is_valid(prefix):
                    return start + len(prefix)
            return None
        if kind == "ip_address":
            try:
                ipaddress.ip_address(candidate)
            except ValueError:  # not an address (e.g. a version number): not PII, nothing to log
                return None
            return start + len(candidate)
        raise AssertionError(kind)

    def _phones(self, text: str) -> list[tuple[int, int, str]]:
        phonenumbers = self._phonenumbers
        spans: list[tuple[int, int, str]] = []
        for region in self._phone_regions:
            for match in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
                spans.append((match.start, match.end, "phone"))
        return spans
