"""Regular expressions from configs, matched in bounded time.

Configs come from strangers' files and hold regexes: ``target_modules`` / ``exclude_modules`` (matched whole
against module names), LoRA's ``rank_pattern`` / ``alpha_pattern`` keys and ``layers_pattern``. Python's
backtracking ``re`` can run for minutes on a hostile one (``(a*)*b`` against a 40-character name), so those
patterns never reach it for matching. Python's own parser reads them (same syntax, same errors); the parse
tree becomes a Thompson NFA, simulated through a DFA built lazily and memoised per pattern, so that a warm
pattern costs about one dict lookup per character of a name. Whatever it accepts, it answers exactly as
``re.fullmatch`` would. It refuses, with a :class:`ConfigError`, what an automaton cannot reproduce
(backreferences, conditional and atomic groups, possessive repeats) and what grows past fixed budgets.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from peft_core.errors import ConfigError

if sys.version_info >= (3, 11):
    from re import _compiler as _sre_compile
    from re import _parser as _sre_parse
    from re._constants import MAXREPEAT
else:  # pragma: no cover - Python 3.10
    import sre_compile as _sre_compile
    import sre_parse as _sre_parse
    from sre_constants import MAXREPEAT

# A key of rank_pattern / alpha_pattern / layers_pattern names the end of a module name, at a dot: put in {}.
NAME_SUFFIX = r"(?:.*\.)?(?:{})"

# Fixed budgets, not wall clock, so a pattern is accepted or refused the same way on every machine. With them
# any pattern is refused or matched against a 7B-sized module list (~500 names) in well under a second.
MAX_PATTERN_LENGTH = 100_000  # characters; Python's parser takes about a microsecond for each
MAX_NODES = 100_000  # NFA nodes, at most one per character but for repeats (an escaped ~1,000-name UNet: ~60,000)
BUILD_BUDGET = 500_000  # NFA-node visits building DFA states and transitions, per pattern: ~0.2 s; a UNet's 85,000
STEPS_PER_CHAR = 32  # automaton steps per character of a name, lookarounds and their re-reads included

_CHAR, _SPLIT, _ASSERT, _MATCH = range(4)  # NFA node kinds
# Flags as plain ints (arithmetic on re.RegexFlag is slow): those that change what a character matches, ...
_CHAR_FLAGS = int(re.IGNORECASE | re.DOTALL | re.ASCII | re.UNICODE)
_TYPE_FLAGS = int(re.ASCII | re.LOCALE | re.UNICODE)  # ... the exclusive ones, ...
_MULTILINE, _UNICODE = int(re.MULTILINE), int(re.UNICODE)  # ... and those that change anchors
_CATEGORIES = {
    "CATEGORY_DIGIT": r"\d", "CATEGORY_NOT_DIGIT": r"\D", "CATEGORY_SPACE": r"\s",
    "CATEGORY_NOT_SPACE": r"\S", "CATEGORY_WORD": r"\w", "CATEGORY_NOT_WORD": r"\W",
}
_UNSUPPORTED = {
    "GROUPREF": "a backreference", "GROUPREF_EXISTS": "a conditional group", "ATOMIC_GROUP": "an atomic group",
    "POSSESSIVE_REPEAT": "a possessive repeat",
}
_LIST_FIX = "use a list of module names instead"


class _Refused(Exception):
    """Why a pattern is refused and how to fix it; :class:`Pattern` words it as a ConfigError."""

    def __init__(self, reason: str, fix: str = _LIST_FIX) -> None:
        super().__init__(reason, fix)
        self.reason, self.fix = reason, fix

    def error(self, what: str, pattern: str) -> ConfigError:
        shown = repr(pattern) if len(pattern) <= 300 else f"{pattern[:300]!r}... ({len(pattern)} characters)"
        return ConfigError(f"{what} {shown} {self.reason}; {self.fix}.")


class _CharSet:
    """What one character-consuming item accepts. Python's ``re`` decides it, on a one-character pattern that
    cannot backtrack, so case folding and Unicode classes are exactly Python's; answers are memoised."""

    __slots__ = ("_match", "_memo")

    def __init__(self, source: str, flags: int) -> None:
        self._match = re.compile(source, flags).fullmatch
        self._memo: dict[str, bool] = {}

    def __contains__(self, char: str) -> bool:
        found = self._memo.get(char)
        if found is None:
            found = self._memo[char] = self._match(char) is not None
        return found


@functools.lru_cache(maxsize=4096)
def _charset(op: str, av: Any, flags: int) -> _CharSet:
    """The set of a LITERAL, NOT_LITERAL, ANY or IN item, written back as a one-character pattern."""

    def one(item_op: str, value: Any) -> str:
        if item_op == "LITERAL":
            return f"\\U{value:08x}"
        if item_op == "RANGE":
            return f"\\U{value[0]:08x}-\\U{value[1]:08x}"
        if item_op == "CATEGORY" and value.name in _CATEGORIES:
            return _CATEGORIES[value.name]
        raise _Refused(f"uses a character class item this library does not support ({item_op})")

    if op == "ANY":
        return _CharSet(".", flags)
    if op in ("LITERAL", "NOT_LITERAL"):
        return _CharSet(f"[{'^' if op == 'NOT_LITERAL' else ''}{one('LITERAL', av)}]", flags)
    items = "".join("^" if item_op.name == "NEGATE" else one(item_op.name, value) for item_op, value in av)
    return _CharSet(f"[{items}]", flags)


def _word_edge(unicode: bool, edge: bool) -> Callable[[str, int], bool]:
    word = re.compile(r"\w", re.UNICODE if unicode else re.ASCII).fullmatch
    on_empty = re.fullmatch(r"\b" if edge else r"\B", "") is not None  # changed in Python 3.14

    def at(text: str, pos: int) -> bool:
        if not text:
            return on_empty
        before = pos > 0 and word(text[pos - 1]) is not None
        after = pos < len(text) and word(text[pos]) is not None
        return (before != after) == edge

    return at


# Anchors: functions of (text, position), by parse code and whether MULTILINE is on. Shared objects, so a
# closure asks each at most once per position. Python's $ also matches before a final newline.
_AT_START = lambda text, pos: pos == 0
_AT_END = lambda text, pos: pos == len(text)
_ANCHORS = {
    ("AT_BEGINNING", False): _AT_START, ("AT_BEGINNING_STRING", False): _AT_START,
    ("AT_BEGINNING", True): lambda text, pos: pos == 0 or text[pos - 1] == "\n",
    ("AT_END", False): lambda text, pos: pos == len(text) or (pos == len(text) - 1 and text[pos] == "\n"),
    ("AT_END", True): lambda text, pos: pos == len(text) or text[pos] == "\n",
    ("AT_END_STRING", False): _AT_END,
    **{(code, unicode): _word_edge(unicode, code == "AT_BOUNDARY")
       for code in ("AT_BOUNDARY", "AT_NON_BOUNDARY") for unicode in (False, True)},
}


def _anchor(code: str, flags: int) -> Callable[[str, int], bool]:
    if code in ("AT_BOUNDARY", "AT_NON_BOUNDARY"):  # \w as ASCII or Unicode
        return _ANCHORS[code, bool(flags & _UNICODE)]
    return _ANCHORS.get((code, bool(flags & _MULTILINE))) or _ANCHORS[code, False]


class _Look(NamedTuple):
    """A lookaround: its body's start (pre state), how far back it starts (a lookbehind's fixed width)."""

    start: int
    back: int
    negate: bool


class _Run:
    """One text being matched: the answers of lookarounds by (lookaround, position) and of their scans by (pre
    state, position), and the steps spent on it."""

    __slots__ = ("answers", "limit", "scans", "steps", "text")

    def __init__(self, text: str) -> None:
        self.text, self.steps, self.limit = text, 0, STEPS_PER_CHAR * (len(text) + 1)
        self.answers: dict[tuple[_Look, int], bool] = {}
        self.scans: dict[tuple[int, int], bool] = {}

    def spend(self) -> None:
        self.steps += 1
        if self.steps > self.limit:
            raise _Refused(
                f"is too complex to match in bounded time (its lookarounds re-read the {len(self.text)}-character "
                f"name {self.text!r} more than {STEPS_PER_CHAR} times per character)",
                "rewrite the lookarounds so they look only a few characters ahead or behind, or " + _LIST_FIX,
            )


def _size(items: Any) -> int:
    """How many NFA nodes :class:`_Automaton` builds for ``items`` (lookaround bodies counted at every use, so
    an upper bound): computed by multiplying, so ``(?:a{1000}){1000}`` is refused before it is expanded."""
    total = 0
    for op, av in items:
        name = op.name
        if name == "BRANCH":
            total += 1 + sum(_size(alternative) for alternative in av[1])
        elif name == "SUBPATTERN":
            total += _size(av[3])
        elif name in ("MAX_REPEAT", "MIN_REPEAT"):
            low, high, body = av[0], av[1], max(1, _size(av[2]))  # an empty body still loops
            total += low * body + (1 + body if high == MAXREPEAT else (high - low) * (1 + body))
        elif name in ("ASSERT", "ASSERT_NOT"):
            total += 2 + _size(av[1])
        else:
            total += 1
    return total


class _Automaton:
    """The NFA of one pattern, lookaround bodies included, and the DFA built from it as texts are matched.

    NFA node ``i`` is ``kind[i]`` with ``arg[i]`` (a _CharSet, an anchor or _Look, or a SPLIT's targets) and
    successor ``nxt[i]``. DFA states are interned as ints. A *pre* state: the nodes reached by reading a
    character, before epsilon moves (a sorted tuple). A *closed* state: the CHAR and MATCH nodes those reach
    without reading, given the truth of the assertions on the way, which depends on the position.
    """

    def __init__(self, source: str) -> None:
        self.kind: list[int] = []
        self.arg: list[Any] = []
        self.nxt: list[int] = []
        self._looks: dict[tuple[int, int], _Look] = {}
        self._pre_ids: dict[tuple[int, ...], int] = {}
        self._pre_sets: list[tuple[int, ...]] = []
        self._closed_ids: dict[tuple[int, ...], int] = {}
        self._readers: list[tuple[int, ...]] = []  # closed state -> its CHAR nodes
        self._accepts: list[bool] = []  # closed state -> holds a MATCH node
        self._moves: list[dict[str, int]] = []  # closed state -> {character: pre state}
        # (pre state, answers so far) -> closed state, or ~node: the assertion of that node is the next question.
        self._closures: dict[tuple[int, tuple[bool, ...]], int] = {}
        self._work = 0
        self._exhausted = False
        self._closed_id(())  # 0: the dead state
        if len(source) > MAX_PATTERN_LENGTH:
            raise _Refused(f"is {len(source)} characters long, more than the {MAX_PATTERN_LENGTH} this library matches")
        try:
            tree = _sre_parse.parse(source)
            _sre_compile.compile(tree)  # the checks re.compile makes after parsing (look-behind width, ...)
            if _size(tree) > MAX_NODES:
                raise _Refused(f"is too large: its automaton would have more than {MAX_NODES} nodes")
            self.start = self._pre_id((self._seq(tree, int(tree.state.flags), self._node(_MATCH, None, -1)),))
        except re.error as exc:
            raise _Refused(f"is not a valid regular expression ({exc.msg})",
                           f"escape special characters (re.escape) or {_LIST_FIX}") from None
        except RecursionError:
            raise _Refused("nests groups too deeply") from None

    # --- building the NFA, back to front: each item is built knowing the node that follows it ----------

    def _node(self, kind: int, arg: Any, nxt: int) -> int:
        if len(self.kind) >= MAX_NODES:  # _size said so already; a guard should the two ever disagree
            raise _Refused(f"is too large: its automaton would have more than {MAX_NODES} nodes")
        self.kind.append(kind)
        self.arg.append(arg)
        self.nxt.append(nxt)
        return len(self.kind) - 1

    def _seq(self, items: Any, flags: int, nxt: int) -> int:
        for op, av in reversed(list(items)):
            nxt = self._item(op.name, av, flags, nxt)
        return nxt

    def _item(self, op: str, av: Any, flags: int, nxt: int) -> int:
        if op in ("LITERAL", "NOT_LITERAL", "ANY", "IN"):
            return self._node(_CHAR, _charset(op, av if op != "IN" else tuple(av), flags & _CHAR_FLAGS), nxt)
        if op == "BRANCH":
            return self._node(_SPLIT, [self._seq(alternative, flags, nxt) for alternative in av[1]], -1)
        if op == "SUBPATTERN":  # (group, flags added, flags removed, body); captures do not matter here
            _, add, remove, body = av
            if add & _TYPE_FLAGS:
                flags &= ~_TYPE_FLAGS
            return self._seq(body, (flags | add) & ~remove, nxt)
        if op in ("MAX_REPEAT", "MIN_REPEAT"):  # greedy or lazy: the same strings match
            return self._repeat(*av, flags, nxt)
        if op == "AT":
            return self._node(_ASSERT, _anchor(av.name, flags), nxt)
        if op in ("ASSERT", "ASSERT_NOT"):
            return self._node(_ASSERT, self._look(av[1], flags, av[0] < 0, op == "ASSERT_NOT"), nxt)
        feature = _UNSUPPORTED.get(op, f"a construct this library does not support ({op})")
        raise _Refused(f"uses {feature}, which a finite automaton cannot match as Python does",
                       f"rewrite the pattern without it, or {_LIST_FIX}")

    def _repeat(self, low: int, high: int, body: Any, flags: int, nxt: int) -> int:
        if high == MAXREPEAT:  # loop: SPLIT -> (body -> SPLIT) | next
            tail = self._node(_SPLIT, [], -1)
            self.arg[tail] += [self._seq(body, flags, tail), nxt]
        else:  # (body (body (...)?)?)? with high - low bodies
            tail = nxt
            for _ in range(high - low):
                tail = self._node(_SPLIT, [self._seq(body, flags, tail), nxt], -1)
        for _ in range(low):
            tail = self._seq(body, flags, tail)
        return tail

    def _look(self, body: Any, flags: int, behind: bool, negate: bool) -> _Look:
        # A repeat copies its body; its lookarounds are built once, so their answers are shared too.
        key = (id(body), flags)
        if key not in self._looks:
            start = self._seq(body, flags, self._node(_MATCH, None, -1))
            back = body.getwidth()[0] if behind else 0  # Python requires a fixed width behind
            self._looks[key] = _Look(self._pre_id((start,)), back, negate)
        return self._looks[key]

    # --- the DFA, built on demand ---------------------------------------------------------------------

    def _spend(self, visits: int) -> None:
        self._work += visits
        if self._work > BUILD_BUDGET:
            self._exhausted = True
            raise self._too_complex()

    @staticmethod
    def _too_complex() -> _Refused:
        return _Refused(
            f"is too complex to match in bounded time (its automaton needed more than {BUILD_BUDGET} steps to "
            f"build)", f"simplify it, or {_LIST_FIX}",
        )

    def _pre_id(self, nodes: tuple[int, ...]) -> int:
        found = self._pre_ids.get(nodes)
        if found is None:
            found = self._pre_ids[nodes] = len(self._pre_sets)
            self._pre_sets.append(nodes)
        return found

    def _closed_id(self, nodes: tuple[int, ...]) -> int:
        found = self._closed_ids.get(nodes)
        if found is None:
            found = self._closed_ids[nodes] = len(self._readers)
            self._readers.append(tuple(node for node in nodes if self.kind[node] == _CHAR))
            self._accepts.append(any(self.kind[node] == _MATCH for node in nodes))
            self._moves.append({})
        return found

    def _closure(self, pre: int, answers: tuple[bool, ...]) -> int:
        """The closed state of ``pre`` given the answers to the first questions, or ~node to ask next.

        A depth-first walk in a fixed order, so the same answers always lead to the same next question, and
        only the assertions the walk reaches are asked (``^(?!...)`` asks its lookahead at position 0 only).
        """
        known: dict[Any, bool] = {}  # condition -> truth; a condition at several nodes is asked once
        seen: set[int] = set()
        found: list[int] = []
        stack = list(reversed(self._pre_sets[pre]))
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            kind = self.kind[node]
            if kind == _SPLIT:
                stack.extend(reversed(self.arg[node]))
            elif kind == _ASSERT:
                condition = self.arg[node]
                if condition not in known:
                    if len(known) == len(answers):
                        self._spend(len(seen))
                        return ~node
                    known[condition] = answers[len(known)]
                if known[condition]:
                    stack.append(self.nxt[node])
            else:
                found.append(node)
        self._spend(len(seen) + 1)
        return self._closed_id(tuple(sorted(found)))

    def _close(self, pre: int, pos: int, run: _Run) -> int:
        answers: tuple[bool, ...] = ()
        while True:
            found = self._closures.get((pre, answers))
            if found is None:
                found = self._closures[(pre, answers)] = self._closure(pre, answers)
            if found >= 0:
                return found
            run.spend()
            answers += (self._holds(self.arg[~found], pos, run),)

    def _move(self, closed: int, char: str) -> int:
        readers = self._readers[closed]
        self._spend(len(readers))
        found = self._moves[closed][char] = self._pre_id(
            tuple(sorted({self.nxt[node] for node in readers if char in self.arg[node]}))
        )
        return found

    # --- matching -------------------------------------------------------------------------------------

    def _holds(self, condition: Any, pos: int, run: _Run) -> bool:
        if not isinstance(condition, _Look):
            return condition(run.text, pos)
        found = run.answers.get((condition, pos))
        if found is None:
            start = pos - condition.back
            found = run.answers[(condition, pos)] = start >= 0 and self._scan(condition.start, start, run, whole=False)
        return found != condition.negate

    def _scan(self, pre: int, pos: int, run: _Run, whole: bool) -> bool:
        """Whether the automaton from ``pre`` at ``pos`` matches the rest of the text (``whole``) or a prefix of
        it (a lookaround's body; positions stay absolute, so anchors in it see the whole text)."""
        text, passed = run.text, []
        while True:
            # A lookaround asked at every position (``(?:(?!.*x).)*``) would re-read the rest of the text each
            # time, but its scans soon reach (state, position) pairs passed before, whose outcome is known.
            if not whole:
                found = run.scans.get((pre, pos))
                if found is not None:
                    break
                passed.append((pre, pos))
            run.spend()
            closed = self._close(pre, pos, run)
            if self._accepts[closed] and (not whole or pos == len(text)):
                found = True
                break
            if pos == len(text) or closed == 0:
                found = False
                break
            char = text[pos]
            pre = self._moves[closed].get(char)
            if pre is None:
                pre = self._move(closed, char)
            pos += 1
        if not whole:
            run.scans.update(dict.fromkeys(passed, found))
        return found

    def fullmatch(self, text: str) -> bool:
        if self._exhausted:
            raise self._too_complex()
        return self._scan(self.start, 0, _Run(text), whole=True)


@functools.lru_cache(maxsize=2048)
def _automaton(source: str) -> _Automaton:
    return _Automaton(source)


class Pattern:
    """A compiled config pattern: ``fullmatch`` answers as ``re.fullmatch`` would, in bounded time."""

    __slots__ = ("_automaton", "pattern", "what")

    def __init__(self, automaton: _Automaton, pattern: str, what: str) -> None:
        self._automaton, self.pattern, self.what = automaton, pattern, what

    def fullmatch(self, text: str) -> bool:
        """Whether the whole of ``text`` matches. Raises ConfigError if the pattern turns out too complex."""
        try:
            return self._automaton.fullmatch(text)
        except _Refused as exc:
            raise exc.error(self.what, self.pattern) from None

    def __repr__(self) -> str:
        return f"Pattern({self.pattern!r}, what={self.what!r})"


def compile_pattern(pattern: str, what: str = "pattern", *, used_as: str = "{}") -> Pattern:
    """``pattern`` compiled for bounded-time matching, or :class:`ConfigError` saying why it cannot be.

    ``what`` names it in messages (``"LoraConfig.target_modules"``). ``used_as`` is the regex it becomes part
    of, ``pattern`` in place of ``{}`` (e.g. :data:`NAME_SUFFIX`); messages still show ``pattern`` alone.
    Automata are cached by regex, so validating a config also warms the matcher.
    """
    try:
        return Pattern(_automaton(used_as.replace("{}", pattern)), pattern, what)
    except _Refused as exc:
        raise exc.error(what, pattern) from None


def fullmatch(pattern: str, text: str, what: str = "pattern") -> bool:
    """``re.fullmatch(pattern, text) is not None``, in bounded time (see :func:`compile_pattern`)."""
    return compile_pattern(pattern, what).fullmatch(text)


_NUMBERED = re.compile(r"\.(\d+)(?=\.)")  # ".<digits>." with the dot after left for the next occurrence


def block_index(pattern: str, name: str) -> int | None:
    """The block index of ``name`` by ``layers_pattern``, as Hugging Face PEFT reads it, or None.

    The digits of the leftmost ``.<digits>.`` whose preceding part of ``name`` ends with the pattern at a dot
    (``encoder.block.3.layer.0.q`` with ``"block"`` -> 3). Equal to HF PEFT's
    ``re.match(rf"(?:^|.*?\\.){pattern}\\.(?P<index>\\d+)\\.", name)`` for names and simple patterns.
    """
    prefix = compile_pattern(pattern, "layers_pattern", used_as=NAME_SUFFIX)
    for found in _NUMBERED.finditer(name):
        if prefix.fullmatch(name[: found.start()]):
            return int(found.group(1))
    return None
