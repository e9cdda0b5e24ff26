"""Split a model response into *attempts* at explicit restart language.

Why: the ESR protocol counts a trial as multi-attempt only when the model
EXPLICITLY abandons what it was saying and starts over ("Wait, that's not
right", "Let me try again", "Let's start over", "Actually, I made a mistake",
"I'd like to revise my answer"). Mere elaboration ("Actually, the easiest way
is ...") or instructions that happen to contain restart words ("wait 10
minutes", "if it fails, try again", "go back to step 2") are not restarts.
This module is a deterministic, judge-free approximation of that rule, used
for fast offline checks and for locating restarts in training data.

Design:
* Each restart phrase is a regex that must match at a *sentence start*: the
  start of the text, or after ``. ! ? : …``, a newline, or a dash (em/en dash,
  ``--`` or a spaced hyphen), skipping whitespace, markdown markers and quotes.
* Patterns come in two kinds. ``OPENER_PATTERNS`` are interjection-style
  repairs ("Wait, no", "Hold on, that's wrong", "Scratch that"): two of them
  with real text between them are two restarts ("Paris. Wait, no, Lyon. Wait,
  no, Paris." is three attempts). ``FOLLOWUP_PATTERNS`` are the commentary and
  first-person restart statements that usually trail an opener ("I got
  sidetracked", "Let me start over", "Back to your question"): when one comes
  in the same sentence as the previous restart phrase, or right after it with
  at most one sentence of drift commentary between, it belongs to that restart
  instead of opening an attempt of its own ("Wait, that's not what you asked
  about at all! Let me start over.").
* The restart phrase belongs to the attempt it opens; attempts without any
  alphanumeric content (e.g. before a restart at the very start) are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "Attempt",
    "FOLLOWUP_PATTERNS",
    "OPENER_PATTERNS",
    "Phrase",
    "REPAIR_PATTERNS",
    "RESTART_PATTERNS",
    "STATEMENT_PATTERN",
    "find_restarts",
    "has_restart",
    "only_commentary",
    "restart_phrases",
    "split_attempts",
]

# --------------------------------------------------------------------------
# Regex building blocks. All patterns are compiled case-insensitively.
# --------------------------------------------------------------------------

_A = r"['’]"  # apostrophe, straight or typographic
_SEP = r"[\s,.!…—–-]"  # what may follow an interjection ("Wait, " "Wait — " "Wait... ")

# Interjections that on their own signal a self-interruption.
_STRONG = r"(?:wait(?:\s+a\s+(?:sec(?:ond)?|moment|minute))?|hold\s+on|hang\s+on|h+m+|u+m+|u+h+|whoa|oops|whoops|uh-oh|ugh)"
# Discourse markers that may precede a restart but do not signal one alone ("No, that's not
# correct" answers a yes/no question; "No, wait," is handled by _C_NO).
_SOFT = r"(?:actually|oh|ah|okay|ok|so|anyway|anyhow|well|sorry|apologies|but|right|now|alright|no|nope)"
# Optional chain of leading markers: "Oh wait, ", "Actually, hold on -- ", "Anyway, ".
# Chains and separators are bounded so that degenerate steered output ("Wait... Wait...
# Wait..." hundreds of times) cannot make matching quadratic in the response length.
_PREFIX = rf"(?:(?:{_STRONG}|{_SOFT}){_SEP}{{1,10}}){{0,4}}"
# Chain that contains at least one strong interjection (needed for generic repairs).
_STRONG_PREFIX = rf"(?:{_SOFT}{_SEP}{{1,10}}){{0,3}}{_STRONG}{_SEP}{{1,10}}(?:(?:{_STRONG}|{_SOFT}){_SEP}{{1,10}}){{0,3}}"

# Up to three intensifiers: "not QUITE right", "COMPLETELY off track".
_INTENS = r"(?:(?:quite|really|exactly|entirely|completely|totally|at\s+all|even|actually|all|way|a\s+bit|a\s+little|so|very|just|getting|going)\s+){0,3}"
_NEG_BE = rf"(?:that|this|it|which)\s*(?:{_A}s\s+not|\s+is\s+not|\s+isn{_A}t|\s+was\s+not|\s+wasn{_A}t|{_A}s\s+definitely\s+not)"
_POS_BE = rf"(?:that|this|it|all\s+(?:of\s+)?(?:that|this))\s*(?:{_A}s|\s+is|\s+was|\s+has\s+been|{_A}s\s+been)"
_DO_NEG = rf"(?:that|this|it)\s+(?:doesn{_A}t|does\s+not|didn{_A}t|did\s+not)"
# The user's request: "your question", "the original topic", "what you asked".
_TOPIC = (
    r"(?:(?:your|the|my|our)\s+(?:actual\s+|original\s+|real\s+|intended\s+|initial\s+|main\s+)?"
    r"(?:question|topic|point|request|query|prompt|task|subject)"
    r"|what\s+you\s+(?:actually\s+)?(?:asked|were\s+asking|wanted|want)"
    r"|the\s+(?:matter|subject|task)\s+at\s+hand)"
)

# -- Generic repairs: only a restart when led by a strong interjection -------
# "that's not right", "this isn't relevant", "that's wrong", "that doesn't make sense".
_C_WRONG = (
    rf"(?:{_NEG_BE}\s+{_INTENS}(?:right|correct|it\b|relevant|related|accurate|helpful|what\b|the\s+(?:right|correct)|on[\s-]?topic|about\b)"
    rf"|{_POS_BE}\s+{_INTENS}(?:wrong|incorrect|irrelevant|off\b|a\s+tangent|unrelated|nonsense|going\s+nowhere|not\s+\w+\s+what)"
    rf"|{_DO_NEG}\s+{_INTENS}(?:make\s+(?:any\s+)?sense|sound\s+right|seem\s+right|answer|address|fit|belong|help)"
    rf"|(?:that|this)\s+(?:can{_A}t|cannot|couldn{_A}t)\s+be\s+right"
    rf"|I\s+(?:think\s+)?I\s*(?:{_A}m|\s+am|\s+was|{_A}ve|\s+have)\s+(?:wrong|confused|mixing|mixed))"
)
# "Wait, no" / "No, wait," -- but not "Wait, no more than 5 minutes" or "No, wait until it cools".
_C_NO = (
    rf"(?:(?:{_SOFT}{_SEP}{{1,10}}){{0,3}}(?:wait|hold\s+on|hang\s+on|h+m+){_SEP}{{1,10}}"
    r"no\b(?!\s+(?:more|longer|less|fewer|matter|one|later|earlier|sooner|need|problem)\b)"
    rf"|no{_SEP}{{1,10}}(?:wait|hold\s+on|hang\s+on)(?=\s*[,.!…—–-]))"
)

# -- Strong repairs: a restart even without an interjection ------------------
# "I made a mistake", "I was wrong", "I misspoke".
_C_MISTAKE = (
    rf"(?:I\s+(?:think\s+I\s+|seem\s+to\s+|may\s+|might\s+)?(?:{_A}ve\s+|have\s+|just\s+)?(?:made|make)\s+(?:a|an)\s+(?:\w+\s+)?(?:mistake|error)"
    rf"|I\s+(?:was|am|{_A}m)\s+(?:completely\s+|totally\s+)?wrong\b|I\s+mis(?:spoke|read|stated|understood\s+your\s+question))"
)
# "Scratch that.", "Ignore what I just said", "Disregard the above" (must end the clause).
_C_SCRATCH = (
    r"(?:scratch|strike|forget|ignore|disregard)\s+"
    r"(?:that|all\s+(?:of\s+)?that|(?:what|everything)\s+I\s+(?:just\s+)?(?:said|wrote)|my\s+(?:previous|last)\s+(?:answer|response|point)|the\s+above)"
    r"(?=\s*(?:[.,!;:…—–-]|$))"
)
# "Oops!", "My bad," -- only when punctuated like an interjection.
_C_OOPS = r"(?:oops|whoops|uh-oh|my\s+bad)(?=\s*[,.!…—–-])"
# "Where was I?", "What am I saying?" (but not "What am I doing wrong").
_C_WHERE = r"(?:where\s+was\s+I\b|what\s+(?:am|was)\s+I\s+(?:saying|talking\s+about|thinking|doing)(?=\s*[?!.,…—–-]))"

# -- Follow-ups: commentary / first-person restart statements ----------------
# "That's not what you asked", "this has nothing to do with your question", "that's off-topic".
_C_ASKED = (
    rf"(?:(?:but\s+)?{_NEG_BE}\s+{_INTENS}what\s+you\s+(?:asked|were\s+asking|wanted|need(?:ed)?|requested)"
    rf"|(?:that|this|all\s+(?:of\s+)?(?:that|this)|none\s+of\s+(?:that|this)|it)\s+(?:has|had|{_A}s\s+got)\s+(?:absolutely\s+)?nothing\s+to\s+do\s+with"
    rf"|{_POS_BE}\s+{_INTENS}(?:off[\s-]?topic|off[\s-]?track|beside\s+the\s+point|irrelevant\s+to|unrelated\s+to|not\s+related\s+to)"
    rf"|{_DO_NEG}\s+(?:answer|address)\s+{_TOPIC})"
)
# "I got sidetracked", "I completely went off on a tangent", "I drifted into baking there".
_C_DRIFT = (
    rf"(?:(?:(?:it\s+)?(?:seems|looks)\s+(?:like\s+)?)?I(?:{_A}ve|\s+have|{_A}m|\s+am|\s+was|\s+seem\s+to\s+have|\s+think\s+I)?\s+"
    r"(?:\w+\s+){0,2}?"
    r"(?:got|gotten|get|getting|went|gone|going|drifted|drifting|wandered|wandering|veered|strayed|digressed|digressing|rambled|rambling|slipped|been|started|began)\b"
    r"[^.!?\n]{0,60}?"
    r"(?:sidetracked|side-tracked|distracted|off[\s-]?(?:track|topic|course|subject)|tangent|carried\s+away|astray"
    rf"|away\s+from\s+{_TOPIC}|into\s+[^.!?\n]{{1,80}}?\s+there\b)"
    # "I was talking about coral reefs when you asked about email", "I started explaining X instead of ..."
    rf"|I(?:\s+was|\s+started|\s+began|\s+got|\s+went|{_A}ve\s+been|\s+have\s+been)\s+(?:\w+\s+)?"
    r"(?:talking|thinking|writing|going\s+on|rambling|explaining|describing|discussing|telling\s+you)\b[^.!?\n]{1,80}?"
    r"\s+(?:(?:when|while|but|even\s+though|although)\s+you\s+(?:actually\s+|had\s+|just\s+)?(?:asked|wanted|requested)"
    r"|instead\s+of|rather\s+than)\b"
    # "you asked about writing a resume, not music history"
    r"|(?:but\s+)?you\s+(?:actually\s+|had\s+|originally\s+)?(?:asked|wanted\s+to\s+know)\s+(?:about|for|me|how)\b[^.!?\n]{1,80}?,?\s+not\s+(?:about\s+)?\w)"
)
# First-person restart statements: "Let me try again", "Let's start over", "I'll start over",
# "I'd like to revise my answer", "Let me get back to your question".
_RESTART_VERB = (
    r"(?:try\s+(?:that\s+|this\s+|it\s+)?(?:again|once\s+more)(?!\s+(?:later|tomorrow|next|in\s|when|if|after)\b)"
    r"|start\s+(?:over|again|afresh|fresh|anew|from\s+scratch|from\s+the\s+(?:top|beginning))"
    r"|restart|begin\s+again|re-?start\s+(?:my|the|this)\s+answer"
    r"|give\s+(?:it|that|this)\s+another\s+(?:try|shot|go)|take\s+another\s+(?:stab|shot|crack|try)"
    r"|reconsider\b|rethink\b|redo\b|re(?:calculate|phrase|word|write|state)\s+(?:that|this|it|my|the\s+answer)"
    r"|say\s+(?:that|this|it)\s+again|(?:do|answer)\s+(?:that|this|it)\s+(?:again|over)"
    r"|correct\s+(?:that|this|myself|my)"
    r"|revise\s+(?:that|this|my)|amend\s+(?:that|this|my)|retract\s+(?:that|this|my)"
    r"|get\s+back\s+on\s+track|get\s+(?:this|things)\s+back\s+on\s+track|refocus|stay\s+on\s+topic"
    rf"|(?:get|go|come|turn|head)\s+back\s+to\s+{_TOPIC}|return\s+to\s+{_TOPIC}|focus\s+on\s+{_TOPIC}"
    rf"|(?:actually|properly|really)\s+(?:answer|address|respond\s+to|focus\s+on)"
    r"|(?:answer|address|respond\s+to)\s+(?:your|the|what\s+you)\s+(?:actual|original|real|intended)"
    r"|answer\s+what\s+you\s+(?:actually\s+)?asked)"
)
_FIRST_PERSON = (
    rf"(?:let\s+me|let{_A}s|let\s+us|I{_A}ll|I\s+will|I\s+should|I{_A}d\s+better|I\s+need\s+to|I\s+must"
    rf"|I{_A}d\s+like\s+to|I\s+would\s+like\s+to|I\s+want\s+to|allow\s+me\s+to|time\s+to|I{_A}m\s+going\s+to)"
)
_C_RESTART = rf"{_FIRST_PERSON}\s+(?:just\s+|actually\s+|now\s+|quickly\s+|please\s+|instead\s+)?{_RESTART_VERB}"
# "Back to your question", "Getting back to the topic", "Returning to what you asked".
_C_BACK = rf"(?:(?:getting|going|coming|heading)\s+)?(?:back\s+to|returning\s+to)\s+{_TOPIC}"
# "Sorry about that", "Sorry for the tangent", "Apologies for the digression".
_C_SORRY = (
    r"(?:sorry|apologies|my\s+apologies|I\s+apologi[sz]e)\s+"
    r"(?:about\s+that\b|for\s+(?:the|that|my)\s+(?:\w+\s+)?(?:confusion|tangent|digression|detour|distraction|rambling|mix-?up))"
)


def _compile(body: str) -> re.Pattern[str]:
    return re.compile(body, re.IGNORECASE)


#: Interjection-style restarts; two of them separated by real text are two restarts.
OPENER_PATTERNS: tuple[re.Pattern[str], ...] = (
    _compile(rf"{_STRONG_PREFIX}{_C_WRONG}"),
    _compile(_C_NO),
    _compile(rf"{_PREFIX}(?:{_C_MISTAKE}|{_C_SCRATCH}|{_C_WHERE})"),
    _compile(rf"(?:{_SOFT}{_SEP}{{1,10}}){{0,3}}{_C_OOPS}"),
)
#: Commentary and first-person restart statements; merge into a restart just before them.
FOLLOWUP_PATTERNS: tuple[re.Pattern[str], ...] = (
    _compile(rf"{_PREFIX}(?:{_C_ASKED}|{_C_DRIFT})"),
    _compile(rf"{_PREFIX}(?:{_C_RESTART}|{_C_BACK}|{_C_SORRY})"),
)
#: Every restart pattern; each must match at a sentence start (see module docstring).
RESTART_PATTERNS: tuple[re.Pattern[str], ...] = OPENER_PATTERNS + FOLLOWUP_PATTERNS
#: Patterns that are a repair on their own: an interjection with a correction, "I made a
#: mistake", "scratch that", "where was I", a first-person restart statement. The others
#: ("Oops,", "back to your question", "sorry about that", drift commentary) also occur as
#: style or as a turn inside an answer that is not abandoned.
STATEMENT_PATTERN: re.Pattern[str] = _compile(rf"{_PREFIX}{_C_RESTART}")
REPAIR_PATTERNS: tuple[re.Pattern[str], ...] = OPENER_PATTERNS[:3] + (STATEMENT_PATTERN,)

# End of a sentence inside the gap between two restart phrases.
_SENTENCE_END = re.compile(r"[.!?…]+(?=[\s\"'”’*_)\]]|$)|\n")

# Sentence starts: start of text, after . ! ? : … or a newline, after an em/en dash, "--" or a
# spaced hyphen; then skip whitespace, markdown markers and quotes up to the first word character.
_SENTENCE_START = re.compile(r"(?:\A|[.!?:…\n—–]|--|(?<=\s)-)[\s*_#>\"'“”‘’`(\[\]-]*(?=\w)")
# Characters glued to the front of a restart phrase that belong to it ("**Wait, no.**").
_GLUED_OPENERS = "*_\"'“‘`(["
# Characters trimmed from the end of an attempt that is cut by a restart ("... Tower —").
_TRAILING_JUNK = " \t\r\n—–-"
_ALNUM = re.compile(r"[^\W_]")
# A sentence that talks about the response itself or the user's request (first person, "you asked").
_COMMENTARY = re.compile(
    rf"\b(?:I|I{_A}(?:m|ve|d|ll)|me|my|you\s+(?:actually\s+)?(?:asked|wanted|were\s+asking|requested)|{_TOPIC})\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Attempt:
    """One attempt at answering; ``text == response[start:end]``."""

    text: str
    start: int
    end: int


@dataclass(frozen=True)
class _Match:
    start: int
    end: int
    opener: bool


def _matches(text: str) -> list[_Match]:
    """All restart phrases at sentence starts, sorted, longest first per position."""
    found: list[_Match] = []
    for boundary in _SENTENCE_START.finditer(text):
        pos = boundary.end()
        best: _Match | None = None
        for pattern in RESTART_PATTERNS:
            m = pattern.match(text, pos)
            if m and (best is None or m.end() > best.end):
                best = _Match(pos, m.end(), pattern in OPENER_PATTERNS)
        if best is not None:
            found.append(best)
    return found


def only_commentary(gap: str) -> bool:
    """True when ``gap`` between two restart phrases is part of one restart.

    The gap runs from the end of one restart phrase to the start of the next.
    Its first sentence is the rest of the restart sentence ("... about at
    all!"); at most one more sentence may follow, and only if it is commentary
    about the drift ("I was talking about butterflies when you asked about
    first aid!"). Any other complete sentence is new content: a new attempt.
    """
    end = _SENTENCE_END.search(gap)
    if end is None:
        return True
    rest = [s for s in _SENTENCE_END.split(gap[end.end() :]) if _ALNUM.search(s)]
    return not rest or (len(rest) == 1 and bool(_COMMENTARY.search(rest[0])))


def find_restarts(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of restarts, one per attempt boundary.

    Consecutive restart phrases that form one restart ("Wait, that's not right.
    I got sidetracked. Let me start over.") are merged into a single span, so
    ``len(find_restarts(t))`` is the number of restarts in ``t``.
    """
    spans: list[list[int]] = []
    for m in _matches(text):
        if spans:
            gap = text[spans[-1][1] : m.start]
            if m.start <= spans[-1][1] or not _ALNUM.search(gap) or (not m.opener and only_commentary(gap)):
                spans[-1][1] = max(spans[-1][1], m.end)
                continue
        spans.append([m.start, m.end])
    return [(s, e) for s, e in spans]


def has_restart(text: str) -> bool:
    """True when ``text`` contains explicit restart language at a sentence start."""
    return bool(_matches(text))


@dataclass(frozen=True)
class Phrase:
    """A restart phrase at ``text[start:end]``. ``repair``: a pattern of
    :data:`REPAIR_PATTERNS` matches there; ``statement``: it announces the restart itself
    ("Let me start over"), so what follows it is the new answer."""

    start: int
    end: int
    repair: bool
    statement: bool


def restart_phrases(text: str) -> list[Phrase]:
    """The restart phrases of ``text`` (each at a sentence start), in order."""
    out = []
    for m in _matches(text):
        statement = STATEMENT_PATTERN.match(text, m.start) is not None
        repair = statement or any(p.match(text, m.start) for p in REPAIR_PATTERNS if p is not STATEMENT_PATTERN)
        out.append(Phrase(m.start, m.end, repair, statement))
    return out


def split_attempts(response: str) -> list[Attempt]:
    """Split ``response`` into attempts at explicit restart language.

    Each restart phrase opens the attempt that follows it. Attempts are
    stripped of surrounding whitespace (and of a dash left dangling before a
    restart); attempts with no alphanumeric content are dropped, so a response
    that opens with a restart phrase has no empty first attempt.
    """
    cuts = [0]
    for start, _ in find_restarts(response):
        while start > 0 and response[start - 1] in _GLUED_OPENERS:
            start -= 1
        if start > cuts[-1]:
            cuts.append(start)
    cuts.append(len(response))

    attempts: list[Attempt] = []
    for i, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
        cut_by_restart = i < len(cuts) - 2
        while hi > lo and (response[hi - 1].isspace() or (cut_by_restart and response[hi - 1] in _TRAILING_JUNK)):
            hi -= 1
        while lo < hi and response[lo].isspace():
            lo += 1
        piece = response[lo:hi]
        if _ALNUM.search(piece):
            attempts.append(Attempt(piece, lo, hi))
    return attempts
