"""Hypothesis strategies for bad input, shared by the producer tests
(``tests/unit/test_bad_input_producer.py``) and the queue tests
(``tests/integration/test_bad_input_queue.py``).

A generated job is a :class:`Case`: a job (a dict, as JSON would give it) and the labelled
:class:`Mutation` that made it invalid, or no mutation for a valid job. An invalid job is a valid
one with exactly one mutation, so a test knows which field the error must name. The same holds
for command lines (:class:`ArgvCase`) and for queue entries (:class:`Entry`), which also say what
must become of them.

``FLEET_HYPOTHESIS_EXAMPLES`` sets the examples per property (default 200; ``scripts/
soak_bad_input`` runs 1,000).
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

from fleet import contract
from fleet.contract import SCHEDULERS, SEED_MODULUS, Limits, quote_name, quote_value
from worker.ops.transport import MAX_BODY_DEPTH

EXAMPLES_ENV = "FLEET_HYPOTHESIS_EXAMPLES"
REPORT_ENV = "FLEET_BAD_INPUT_REPORT"
LIMITS = Limits()
#: The model the test workers serve (tests/conftest.py: FLEET_MODEL_NAME=tiny).
SERVED_MODEL = "tiny"
#: Deepest nesting of a generated value of a field that is not text (text fields go deeper).
SAFE_DEPTH = 200
#: Deepest nesting of a generated job value sent to a worker: past the transport's limit
#: (MAX_BODY_DEPTH: such a job is dead-lettered) and the ~500 levels whose pickling for the
#: pool once stopped a worker, within what ``json.dumps`` writes under hypothesis (~900).
QUEUE_DEPTH = 600
DEEP_DEPTH = 100_000


def examples(default: int = 200) -> int:
    """Examples per property: FLEET_HYPOTHESIS_EXAMPLES, else ``default``."""
    return max(1, int(os.environ.get(EXAMPLES_ENV) or default))


def fleet_settings(max_examples: int | None = None, shrink: bool = True) -> settings:
    """Reproducible settings: derandomized (a fixed seed per test), no example database, no
    deadline; the health checks that big generated inputs trip are off."""
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.shrink] if shrink else [])
    return settings(
        max_examples=max_examples or examples(),
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        phases=phases,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
            HealthCheck.large_base_example,
        ],
    )


def uniform(options: list[Any]) -> st.SearchStrategy[Any]:
    """One of ``options``, about equally likely: ``sampled_from`` and ``one_of`` favour the
    first (the simplest, to shrink to), which would leave the last fields of a job rarely
    mutated; a wide integer taken modulo spreads evenly and still shrinks to the first."""
    return st.integers(0, 2**32).map(lambda k: options[k % len(options)])


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """One of the strategies, each ``weight`` times as likely."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return uniform(pool).flatmap(lambda strategy: strategy)


def short(value: Any) -> str:
    """A value as a failure message may show it (jobs hold megabyte strings)."""
    return repr(quote_value(value))


# ---------------------------------------------------------------------------------------------
# Text

#: Characters of real text: any code point but NUL and the surrogates (control characters,
#: private use and unassigned code points are text to the contract).
TEXT_CHARS = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
#: Characters str.strip() removes (what makes a prompt blank).
BLANKS = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2028\u3000"


def text(min_size: int = 0, max_size: int = 40) -> st.SearchStrategy[str]:
    return st.text(TEXT_CHARS, min_size=min_size, max_size=max_size)


def long_text(min_size: int, max_size: int) -> st.SearchStrategy[str]:
    """Long strings cheaply: one character repeated (ASCII, accented, CJK, emoji, a control
    character), ``min_size`` to ``max_size`` characters long."""
    chars = st.sampled_from(["a", "é", "猫", "🦊", "\x01", "\ufffd"])
    return st.builds(lambda c, n: c * n, chars, st.integers(min_size, max_size))


def non_blank(s: str) -> bool:
    return bool(s.strip())


def prompts() -> st.SearchStrategy[str]:
    """Valid prompts: not blank, at most FLEET_MAX_PROMPT_CHARS characters."""
    return st.one_of(text(1, 60).filter(non_blank), long_text(1, LIMITS.max_prompt_chars))


def blank_text() -> st.SearchStrategy[str]:
    return st.text(st.sampled_from(BLANKS), max_size=20)


def insert(at: st.SearchStrategy[str], what: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Text from ``at`` with ``what`` put in at any position."""

    @st.composite
    def build(draw: st.DrawFn) -> str:
        base, piece = draw(at), draw(what)
        i = draw(st.integers(0, len(base)))
        return base[:i] + piece + base[i:]

    return build()


NUL = st.just("\x00")
SURROGATE = re.compile("[\ud800-\udfff]")
SURROGATES = st.characters(categories=("Cs",))


def valid_job_ids() -> st.SearchStrategy[str]:
    return st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,40}", fullmatch=True)


def unique_job_id(prefix: str = "bad") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------------------------------------
# Values of any JSON type, and deep ones


def nest(depth: int, kind: str = "list", leaf: Any = "x") -> Any:
    """``leaf`` inside ``depth`` lists (or one-key objects), built without recursion."""
    value = leaf
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


def _power(base_exp: tuple[int, int]) -> int:
    base, exp = base_exp
    return base**exp if base > 0 else -((-base) ** exp)


#: Integers past every limit (built, so that strategy reprs stay short): +-2**64, +-10**400.
HUGE_INTS = st.sampled_from([(2, 64), (-2, 64), (2, 65), (10, 400), (-10, 400)]).map(_power)


def json_scalars(allow_nan: bool = True) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        HUGE_INTS,
        st.floats(allow_nan=allow_nan, allow_infinity=allow_nan),
        text(0, 20),
    )


def json_values(allow_nan: bool = True, max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Any JSON value: null, booleans, numbers (huge, NaN and infinities too), strings, arrays,
    objects, nested a few levels."""
    return st.recursive(
        json_scalars(allow_nan),
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(text(0, 8), kids, max_size=4),
        max_leaves=max_leaves,
    )


def deep_values(max_depth: int = SAFE_DEPTH) -> st.SearchStrategy[Any]:
    return st.builds(
        nest, st.integers(2, max_depth), st.sampled_from(["list", "dict"]), json_scalars(False)
    )


def wrong_types(*, none_ok: bool = False, numbers: bool = True, strings: bool = True,
                depth: int = SAFE_DEPTH) -> st.SearchStrategy[Any]:  # fmt: skip
    """Values of a JSON type other than the field's: containers always, and ``None``, numbers
    (booleans included) or strings as asked."""
    kinds: list[st.SearchStrategy[Any]] = [
        st.lists(json_values(), min_size=0, max_size=3),
        st.dictionaries(text(0, 8), json_values(), max_size=3),
        deep_values(depth),
    ]
    if not none_ok:
        kinds.append(st.none())
    if numbers:
        kinds += [st.booleans(), st.integers(-(2**70), 2**70), st.floats()]
    else:
        kinds.append(st.booleans())
    if strings:
        kinds += [text(0, 20), st.integers(0, 4096).map(str), st.sampled_from(["512", "7.5", ""])]
    return st.one_of(*kinds)


# ---------------------------------------------------------------------------------------------
# Jobs: valid ones, and labelled mutations of them


def valid_jobs(queue: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    """Valid jobs, every optional field sometimes left out. ``queue``: jobs a test worker runs
    in well under a second (64 x 64, 1-2 steps, one image, the served model or none)."""
    sides = (
        st.just(64)
        if queue
        else st.integers(LIMITS.min_side // 8, LIMITS.max_side // 8).map(lambda n: n * 8)
    )
    optional: dict[str, st.SearchStrategy[Any]] = {
        "schema_version": st.just(contract.SCHEMA_VERSION),
        "job_id": valid_job_ids(),
        "negative_prompt": st.one_of(text(0, 40), long_text(0, LIMITS.max_prompt_chars)),
        "width": sides,
        "height": sides,
        "steps": st.integers(1, 2) if queue else st.integers(LIMITS.min_steps, LIMITS.max_steps),
        "guidance": st.one_of(
            st.floats(LIMITS.min_guidance, LIMITS.max_guidance),
            st.integers(int(LIMITS.min_guidance), int(LIMITS.max_guidance)),
        ),
        "seed": st.one_of(
            st.integers(0, SEED_MODULUS - 1), st.integers(0, SEED_MODULUS - 1).map(str)
        ),
        "images": st.just(1) if queue else st.integers(1, LIMITS.max_images),
        "model": (
            st.sampled_from([None, SERVED_MODEL])
            if queue
            else st.none() | text(1, 40).filter(non_blank)
        ),
        "scheduler": st.just("default") if queue else st.sampled_from(SCHEDULERS),
        "submitted_at": st.floats(0, 4e9),
    }
    required = {"prompt": prompts()}
    if queue:  # the defaults (512 x 512, 30 steps) take minutes on a CPU
        required.update((k, optional.pop(k)) for k in ("width", "height", "steps"))
    return st.fixed_dictionaries(required, optional=optional)


@dataclass(frozen=True)
class Mutation:
    """One labelled change that makes a valid job invalid: ``field`` set to ``value`` (or
    removed), of a ``kind`` such as ``wrong-type`` or ``out-of-range``."""

    field: str
    kind: str
    value: Any = None
    remove: bool = False

    def apply(self, job: dict[str, Any]) -> dict[str, Any]:
        out = dict(job)
        if self.remove:
            out.pop(self.field, None)
        else:
            out[self.field] = self.value
        return out

    @property
    def name(self) -> str:
        """The name the error must show for this field. An empty key reads as ``job``, and so
        does a key with a lone surrogate (pydantic cannot read it; the error quotes it)."""
        if not self.field or SURROGATE.search(self.field):
            return "job"
        return quote_name(self.field)

    def __repr__(self) -> str:
        what = "removed" if self.remove else short(self.value)
        return f"Mutation({quote_name(self.field)!r}, {self.kind}, {what})"


@dataclass
class Case:
    """A generated job and, for an invalid one, the mutation that made it so."""

    job: dict[str, Any]
    mutation: Mutation | None = None

    @property
    def valid(self) -> bool:
        return self.mutation is None

    def __repr__(self) -> str:
        fields = ", ".join(f"{quote_name(str(k))}={short(v)}" for k, v in self.job.items())
        return f"Case({self.mutation!r}, {{{fields}}})"


def _int_field(name: str, lo: int, hi: int, multiple: int = 1) -> list[st.SearchStrategy]:
    def bad_float(f: float) -> bool:
        return not (math.isfinite(f) and f.is_integer() and lo <= f <= hi and f % multiple == 0)

    out_of_range = st.one_of(
        st.integers(max_value=lo - 1),
        st.integers(min_value=hi + 1),
        st.one_of(st.sampled_from([0, -1, 2**31, 2**63, 10**9]), HUGE_INTS).filter(
            lambda n: not lo <= n <= hi),
    )  # fmt: skip
    kinds = [
        st.builds(Mutation, st.just(name), st.just("out-of-range"), out_of_range),
        st.builds(Mutation, st.just(name), st.just("float"), st.floats().filter(bad_float)),
        st.builds(Mutation, st.just(name), st.just("nan-inf"),
                  st.sampled_from([math.nan, math.inf, -math.inf])),
        st.builds(Mutation, st.just(name), st.just("wrong-type"), wrong_types(numbers=False)),
    ]  # fmt: skip
    if multiple > 1:
        odd = st.integers(lo, hi).filter(lambda n: n % multiple != 0)
        kinds.append(st.builds(Mutation, st.just(name), st.just("not-a-multiple"), odd))
    return kinds


def _text_field(
    name: str, base: st.SearchStrategy[str], none_ok: bool = False, depth: int = SAFE_DEPTH
) -> list[st.SearchStrategy]:
    return [
        st.builds(Mutation, st.just(name), st.just("nul"), insert(base, NUL)),
        st.builds(Mutation, st.just(name), st.just("surrogate"), insert(base, SURROGATES)),
        st.builds(Mutation, st.just(name), st.just("wrong-type"),
                  wrong_types(none_ok=none_ok, strings=False, depth=depth)),
    ]  # fmt: skip


def _bad_job_id(s: str) -> bool:
    return contract.JOB_ID_PATTERN.match(s) is None


def _bad_seed_text(s: str) -> bool:
    t = s.strip()
    return not (t.isascii() and t.isdigit() and int(t) < SEED_MODULUS)


#: Webhooks refused before any name is resolved (no DNS in the tests).
BAD_WEBHOOKS = [
    "", "ftp://example.com/hook", "javascript:alert(1)", "http://", "https:///path", "no url",
    "http://127.0.0.1/hook", "http://10.0.0.1/hook", "http://[::1]/hook", "http://0.0.0.0/",
    "http://169.254.169.254/latest/meta-data", "file:///etc/passwd",
    "http://" + "a" * 254 + "/hook",
]  # fmt: skip

#: Keys a job must not carry (any key that is not a JobSpec field is refused).
EXTRA_KEYS = [
    "__class__", "__init__", "__dict__", "__proto__", "constructor", "job", "Prompt", "PROMPT",
    "prompt ", " prompt", "width.x", "args", "kwargs", "id", "task_id", "priority", "deadline",
    "seed_derived", "status", "images[0]", "", "\x00", "\ud800",
]  # fmt: skip


def mutations(queue: bool = False) -> st.SearchStrategy[Mutation]:
    """One labelled mutation of every kind the brief names: wrong types, out-of-range numbers,
    NaN and infinities, huge and binary strings, lone surrogates, NUL bytes, deep nesting,
    extra and missing fields. ``queue``: values JSON can carry (no huge megabyte strings in
    every example) and the worker's own rules (a model it does not serve)."""
    depth = QUEUE_DEPTH if queue else DEEP_DEPTH
    huge = 200_000 if queue else 1_000_000
    lim = LIMITS
    kinds: list[st.SearchStrategy[Mutation]] = []
    groups: list[list[st.SearchStrategy[Mutation]]] = []  # the kinds of each field

    def close_field() -> None:
        groups.append(kinds[sum(len(g) for g in groups) :])

    kinds += _int_field("width", lim.min_side, lim.max_side, 8)
    close_field()
    kinds += _int_field("height", lim.min_side, lim.max_side, 8)
    close_field()
    kinds += _int_field("steps", lim.min_steps, lim.max_steps)
    close_field()
    kinds += _int_field("images", 1, lim.max_images)
    close_field()
    kinds += _int_field("schema_version", 1, 1)
    close_field()
    # guidance: a number from 0 to 30.
    kinds += [
        st.builds(Mutation, st.just("guidance"), st.just("out-of-range"), st.one_of(
            st.floats().filter(lambda g: not lim.min_guidance <= g <= lim.max_guidance),
            st.sampled_from([-1e308, 1e308, -1, 31]), HUGE_INTS)),
        st.builds(Mutation, st.just("guidance"), st.just("nan-inf"),
                  st.sampled_from([math.nan, math.inf, -math.inf])),
        st.builds(Mutation, st.just("guidance"), st.just("wrong-type"),
                  wrong_types(numbers=False)),
    ]  # fmt: skip
    close_field()
    # seed: an unsigned 64-bit integer, or its decimal string.
    kinds += [
        st.builds(Mutation, st.just("seed"), st.just("out-of-range"), st.one_of(
            st.integers(max_value=-1), st.integers(min_value=SEED_MODULUS),
            st.sampled_from([-1, SEED_MODULUS]), HUGE_INTS.filter(lambda n: n != -1))),
        st.builds(Mutation, st.just("seed"), st.just("bad-string"), st.one_of(
            text(0, 24).filter(_bad_seed_text),
            st.sampled_from(["12abc", "-1", "+5", "0x10", "1_000", "1e5", "1.5", "١٢", "²", "",
                             " ", str(SEED_MODULUS)]),
            st.builds(lambda n: "9" * n, st.integers(21, 5000)))),
        st.builds(Mutation, st.just("seed"), st.just("float"),
                  st.floats().filter(lambda f: not (math.isfinite(f) and f.is_integer()
                                                    and 0 <= f < SEED_MODULUS))),
        st.builds(Mutation, st.just("seed"), st.just("wrong-type"),
                  wrong_types(numbers=False, strings=False)),
    ]  # fmt: skip
    close_field()
    # prompt: text, not blank, at most 2,000 characters; required.
    kinds += _text_field("prompt", prompts(), depth=depth)
    kinds += [
        st.builds(Mutation, st.just("prompt"), st.just("blank"), blank_text()),
        st.builds(Mutation, st.just("prompt"), st.just("huge"),
                  long_text(lim.max_prompt_chars + 1, huge)),
        st.builds(Mutation, st.just("prompt"), st.just("missing"), remove=st.just(True)),
    ]  # fmt: skip
    close_field()
    # negative_prompt: text of at most 2,000 characters.
    kinds += _text_field("negative_prompt", text(0, 40), depth=depth)
    kinds.append(st.builds(Mutation, st.just("negative_prompt"), st.just("huge"),
                           long_text(lim.max_prompt_chars + 1, huge)))  # fmt: skip
    close_field()
    # model: null, or text that is not blank (and, at a worker, the model it serves).
    kinds += _text_field("model", text(1, 20).filter(non_blank), none_ok=True, depth=depth)
    kinds.append(st.builds(Mutation, st.just("model"), st.just("blank"),
                           blank_text()))  # fmt: skip
    if queue:
        unserved = st.one_of(
            text(1, 40).filter(lambda s: non_blank(s) and s != SERVED_MODEL),
            st.sampled_from(["../../etc/passwd", "https://huggingface.co/x/y", "TINY", "tiny "]),
        )
        kinds.append(st.builds(Mutation, st.just("model"), st.just("not-served"), unserved))
    close_field()
    # scheduler: one of SCHEDULERS.
    kinds += _text_field("scheduler", st.sampled_from(SCHEDULERS), depth=depth)
    kinds.append(st.builds(Mutation, st.just("scheduler"), st.just("unknown"), st.one_of(
        text(0, 20).filter(lambda s: s not in SCHEDULERS),
        st.sampled_from(["DDIM", "ddim ", "euler-a", "none", "__import__('os')"]))))  # fmt: skip
    close_field()
    # job_id: 1-128 of A-Z a-z 0-9 . _ - starting with a letter or digit (null: the task id).
    kinds += _text_field("job_id", valid_job_ids(), none_ok=True, depth=depth)
    kinds.append(st.builds(Mutation, st.just("job_id"), st.just("pattern"), st.one_of(
        text(0, 40).filter(_bad_job_id),
        valid_job_ids().map(lambda s: s + "\n"),
        st.sampled_from(["", "-a", ".a", "_a", "../../etc/passwd", "a/b", "a b", "é", "abc\n"]),
        long_text(129, 100_000))))  # fmt: skip
    close_field()
    # webhook: an http(s) URL of a public host.
    too_long = st.builds(lambda n: "https://example.com/" + "a" * n, st.integers(2030, 10_000))
    kinds.append(st.builds(Mutation, st.just("webhook"), st.just("bad-url"),
                           st.sampled_from(BAD_WEBHOOKS) | too_long))  # fmt: skip
    kinds += _text_field("webhook", st.just("https://example.com/hook"), none_ok=True, depth=depth)
    close_field()
    # submitted_at: a finite number.
    kinds.append(st.builds(Mutation, st.just("submitted_at"), st.just("not-a-time"), st.one_of(
        st.sampled_from([math.nan, math.inf, -math.inf]),
        wrong_types(none_ok=True, numbers=False))))  # fmt: skip
    close_field()
    # Extra fields, of any name and value.
    field_names = set(contract.JobSpec.model_fields)
    extra_key = st.one_of(st.sampled_from(EXTRA_KEYS), text(1, 30), long_text(81, 10_000)).filter(
        lambda k: k not in field_names
    )
    kinds.append(st.builds(Mutation, extra_key, st.just("extra"), json_values()))  # fmt: skip
    close_field()
    # A field first, then one of its kinds: each field about as often as another.
    return uniform([g for g in groups if g]).flatmap(
        lambda group: uniform(group).flatmap(lambda kind: kind)
    )


def bad_jobs(queue: bool = False) -> st.SearchStrategy[Case]:
    """Invalid jobs: a valid job with one labelled mutation."""
    return st.builds(lambda job, m: Case(m.apply(job), m), valid_jobs(queue), mutations(queue))


def cases(queue: bool = False) -> st.SearchStrategy[Case]:
    """Valid and invalid jobs, about one in three valid; ``case.valid`` says which."""
    return weighted((1, st.builds(Case, valid_jobs(queue))), (2, bad_jobs(queue)))


def names_field(message: str, name: str) -> bool:
    """Whether an error message names ``name`` as a problem: ``name=...`` at the start of one
    (``invalid job: width=100: ...; steps=0: ...``), or as a word (``schema_version 2 is
    newer``; ``argument --width: invalid int value``)."""
    if name.startswith("-"):
        return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", message) is not None
    at_start = re.search(rf"(?:^|invalid job: |; ){re.escape(name)}=", message)
    as_word = re.search(rf"(?<![\w.]){re.escape(name)}(?![\w=])", message)
    return at_start is not None or as_word is not None


# ---------------------------------------------------------------------------------------------
# Command lines of `python -m producer submit`


@dataclass
class ArgvCase:
    """``python -m producer submit`` arguments; ``names`` (an option or a field, any one will
    do) when invalid, with the ``kind`` of mutation; ``jobs``: how many a valid one enqueues."""

    argv: list[str]
    names: tuple[str, ...] = ()
    kind: str = ""
    jobs: int = 1

    @property
    def valid(self) -> bool:
        return not self.names

    def __repr__(self) -> str:
        argv = [short(a) for a in self.argv]
        return f"ArgvCase({self.kind or 'valid'}, names={self.names}, {argv})"


def _not_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return True
    return False


def _not_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return True
    return False


#: Option, field, valid values.
_CLI_OPTIONS: dict[str, tuple[str, st.SearchStrategy[str]]] = {
    "--width": ("width", st.integers(8, 256).map(lambda n: str(n * 8))),
    "--height": ("height", st.integers(8, 256).map(lambda n: str(n * 8))),
    "--steps": ("steps", st.integers(1, 150).map(str)),
    "--guidance": ("guidance", st.floats(0, 30).map(repr)),
    "--seed": ("seed", st.integers(0, SEED_MODULUS - 1).map(str)),
    "--images-per-prompt": ("images", st.integers(1, 8).map(str)),
    "--model": ("model", text(1, 20).filter(non_blank)),
    "--scheduler": ("scheduler", st.sampled_from(SCHEDULERS)),
    "--negative": ("negative_prompt", text(0, 40)),
    "--priority": ("priority", st.integers(0, 9).map(str)),
}
_INT_OPTIONS = {"--width": (64, 2048), "--height": (64, 2048), "--steps": (1, 150),
                "--images-per-prompt": (1, 8), "--priority": (0, 9)}  # fmt: skip
#: Options no parser knows (and that abbreviate none it knows).
UNKNOWN_OPTIONS = ["--bogus", "--prompt", "--size", "--count", "--queue", "--webhook"]


@st.composite
def valid_argv(draw: st.DrawFn) -> ArgvCase:
    prompt_list = draw(st.lists(prompts(), min_size=1, max_size=3))
    options = draw(st.dictionaries(st.sampled_from(sorted(_CLI_OPTIONS)), st.none(), max_size=6))
    argv = ["submit"]
    for option in options:
        argv.append(f"{option}={draw(_CLI_OPTIONS[option][1])}")
    if len(prompt_list) == 1 and draw(st.booleans()):
        argv.append(f"--job-id={draw(valid_job_ids())}")
    return ArgvCase([*argv, "--", *prompt_list], jobs=len(prompt_list))


@st.composite
def bad_argv(draw: st.DrawFn) -> ArgvCase:
    """A valid command line with one labelled mutation."""
    base = draw(valid_argv())
    cut = base.argv.index("--")
    options, prompt_list = base.argv[1:cut], base.argv[cut + 1 :]
    options = [o for o in options if not o.startswith("--job-id=")]
    kind = draw(uniform(["int-option", "range", "guidance", "seed", "scheduler",
                                 "model", "negative", "prompt", "no-prompt", "job-id",
                                 "job-id-many", "unknown-option", "file"]))  # fmt: skip

    def with_option(option: str, value: str) -> list[str]:
        return [o for o in options if not o.startswith(option + "=")] + [f"{option}={value}"]

    names: tuple[str, ...]
    if kind == "int-option":
        option = draw(st.sampled_from(sorted(_INT_OPTIONS)))
        value = draw(st.one_of(text(0, 12), st.sampled_from(["1.5", "0x10", "1e3", "", "nan"]))
                     .filter(_not_int))  # fmt: skip
        options, names = with_option(option, value), (option,)
    elif kind == "range":
        option = draw(st.sampled_from(sorted(_INT_OPTIONS)))
        lo, hi = _INT_OPTIONS[option]
        wrong = st.integers(max_value=lo - 1) | st.integers(min_value=hi + 1)
        if option in ("--width", "--height"):
            wrong |= st.integers(lo, hi).filter(lambda n: n % 8 != 0)
        value_i = draw(wrong)
        field_name = "priority" if option == "--priority" else _CLI_OPTIONS[option][0]
        options, names = with_option(option, str(value_i)), (field_name,)
    elif kind == "guidance":
        value = draw(st.one_of(
            st.sampled_from(["nan", "inf", "-inf", "-1e308", "1e308", "30.5", "-0.1"]),
            st.floats().filter(lambda g: not 0 <= g <= 30).map(repr),
            text(0, 10).filter(_not_float)))  # fmt: skip
        options = with_option("--guidance", value)
        names = ("--guidance",) if _not_float(value) else ("guidance",)
    elif kind == "seed":
        value = draw(st.one_of(text(0, 24).filter(_bad_seed_text), st.sampled_from(
            ["12abc", "-1", "1.5", "0x10", "١٢", str(SEED_MODULUS)]),
            st.builds(lambda n: "9" * n, st.integers(21, 5000))))  # fmt: skip
        options, names = with_option("--seed", value), ("seed",)
    elif kind == "scheduler":
        value = draw(text(0, 20).filter(lambda s: s not in SCHEDULERS))
        options, names = with_option("--scheduler", value), ("scheduler",)
    elif kind == "model":
        value = draw(st.one_of(blank_text(), insert(text(1, 10), NUL | SURROGATES)))
        options, names = with_option("--model", value), ("model",)
    elif kind == "negative":
        value = draw(st.one_of(insert(text(0, 20), NUL | SURROGATES),
                               long_text(LIMITS.max_prompt_chars + 1, 100_000)))  # fmt: skip
        options, names = with_option("--negative", value), ("negative_prompt",)
    elif kind == "prompt":
        bad = draw(st.one_of(blank_text(), insert(text(0, 20), NUL | SURROGATES),
                             long_text(LIMITS.max_prompt_chars + 1, 100_000)))  # fmt: skip
        prompt_list = list(prompt_list)
        prompt_list.insert(draw(st.integers(0, len(prompt_list))), bad)
        names = ("prompt",)
    elif kind == "no-prompt":
        prompt_list, names = [], ("prompt",)
    elif kind == "job-id":
        value = draw(st.one_of(text(0, 30).filter(_bad_job_id), st.sampled_from(
            ["abc\n", "../x", "-a", "a" * 129, ""])))  # fmt: skip
        options, prompt_list = with_option("--job-id", value), prompt_list[:1]
        names = ("job_id",)
    elif kind == "job-id-many":
        extra = draw(st.lists(prompts(), min_size=1, max_size=2))
        options = with_option("--job-id", draw(valid_job_ids()))
        prompt_list, names = prompt_list + extra, ("job_id",)
    elif kind == "unknown-option":
        option = draw(st.sampled_from(UNKNOWN_OPTIONS))
        # No space in it: argparse takes "--bogus= x" for a positional (a prompt), on purpose.
        value = draw(text(0, 10).filter(lambda v: " " not in v))
        options, names = [*options, f"{option}={value}"], (option,)
    else:  # a --file that cannot be read
        missing = f"/nonexistent-{draw(valid_job_ids())}/prompts.txt"
        options, names = [*options, f"--file={missing}"], ("--file",)
    return ArgvCase(["submit", *options, "--", *prompt_list], names, kind)


def argv_cases() -> st.SearchStrategy[ArgvCase]:
    return weighted((1, valid_argv()), (2, bad_argv()))


# ---------------------------------------------------------------------------------------------
# Queue entries: jobs sent every way, and entries that are not jobs at all


def envelope(body: bytes | str, queue: str, task_id: str | None = None,
             content_type: str = "application/json", task: str = contract.TASK_GENERATE,
             base64_body: bool = True) -> dict[str, Any]:  # fmt: skip
    """A Celery protocol-2 message as kombu's Redis transport stores it (docs/contract.md)."""
    task_id = task_id or str(uuid.uuid4())
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    message: dict[str, Any] = {
        "body": base64.b64encode(raw).decode() if base64_body else raw.decode("utf-8", "replace"),
        "content-encoding": "utf-8" if content_type.endswith("json") else "binary",
        "content-type": content_type,
        "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id,
                    "parent_id": None, "group": None, "retries": 0, "eta": None,
                    "expires": None, "timelimit": [None, None], "argsrepr": "()",
                    "kwargsrepr": "{}", "origin": "bad-input-tests"},
        "properties": {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    }  # fmt: skip
    if not base64_body:
        del message["properties"]["body_encoding"]
    return message


def dumps(value: Any) -> bytes:
    """JSON as a sender in Python writes it (NaN and infinities as NaN, Infinity)."""
    return json.dumps(value).encode()


#: The three parts of a protocol-2 body, as Celery itself writes the third.
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


@dataclass
class Entry:
    """One queue entry to send, and what must become of it.

    ``how``: ``send_task`` (a stock Celery sender), ``raw`` (an LPUSH of the envelope of
    ``body``), or ``bytes`` (an LPUSH of ``data`` itself). ``expect``: ``run`` (the job's
    outcome: succeeded when valid, else failed naming the field), ``recorded`` (fails under its
    task id, with a reason), ``dead-letter`` (in fleet:dead-letters with a reason)."""

    kind: str
    how: str
    expect: str
    case: Case | None = None
    body: Any = None  # the JSON body (raw) before it is encoded
    data: bytes | None = None  # the entry itself (bytes) or the body bytes (raw)
    mutate: tuple[str, Any] | None = None  # an envelope change: (path, value or REMOVE)
    base64_body: bool = True

    def __repr__(self) -> str:
        what = self.case if self.case is not None else short(self.data if self.data is not None
                                                             else self.body)  # fmt: skip
        return f"Entry({self.kind}, {self.how}, expect={self.expect}, {what}, {self.mutate!r})"

    def render(self, queue: str, task_id: str) -> bytes:
        """The bytes to LPUSH (not for ``send_task``)."""
        if self.how == "bytes":
            assert self.data is not None
            return self.data
        body = self.data if self.data is not None else dumps(self.body)
        message = envelope(body, queue, task_id, base64_body=self.base64_body)
        if self.mutate is not None:
            set_path(message, *self.mutate)
        return dumps(message)


REMOVE = "<remove>"


def set_path(message: dict[str, Any], path: str, value: Any) -> None:
    """Set the envelope part at dotted ``path`` (``headers.timelimit``) to ``value``, or take
    it out when ``value`` is REMOVE."""
    *parents, last = path.split(".")
    target = message
    for part in parents:
        target = target[part]
    if value is REMOVE:
        del target[last]
    else:
        target[last] = value


def depth_of(value: Any) -> int:
    """How many lists and objects deep ``value`` is (a scalar 0, ``[]`` 1), level by level:
    generated values are deeper than Python's recursion limit."""
    depth, level = 0, [value]
    while True:
        containers = [v for v in level if isinstance(v, list | dict)]
        if not containers:
            return depth
        depth += 1
        level = [c for v in containers for c in (v.values() if isinstance(v, dict) else v)]


@st.composite
def job_entries(draw: st.DrawFn) -> Entry:
    """A job, valid or not, by ``send_task`` or as a raw message; a job nested deeper than the
    transport takes (MAX_BODY_DEPTH) is sent raw and must end in the dead letters."""
    case = draw(cases(queue=True))
    how = draw(st.sampled_from(["send_task", "send_task", "raw-kwargs", "raw-args"]))
    too_deep = depth_of([[], {"job": case.job}, None]) > MAX_BODY_DEPTH
    if how == "send_task" and not too_deep:
        return Entry("job", "send_task", "run", case)
    embed = draw(st.one_of(st.just(EMBED), st.just({}), st.none(),
                           st.dictionaries(st.sampled_from(["callbacks", "errbacks", "chain",
                                                            "chord", "group", "x"]),
                                           json_values(), max_size=3)))  # fmt: skip
    body = [[case.job], {}, embed] if how == "raw-args" else [[], {"job": case.job}, embed]
    expect = "dead-letter" if depth_of(body) > MAX_BODY_DEPTH else "run"
    return Entry("job", "raw", expect, case, body=body)


def _not_shaped(value: Any) -> bool:
    return not (isinstance(value, list) and len(value) == 3 and isinstance(value[0], list)
                and isinstance(value[1], dict) and isinstance(value[2], dict | None))  # fmt: skip


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except (ValueError, RecursionError):
        return False
    return True


def not_json_entries() -> st.SearchStrategy[Entry]:
    """Entries that are not JSON: binary, text, truncated envelopes, unbalanced nesting."""
    data = st.one_of(
        st.binary(max_size=64).filter(lambda b: not _is_json(b)),
        text(1, 40).map(lambda s: s.encode("utf-8")).filter(lambda b: not _is_json(b)),
        st.sampled_from([b"", b"this is not json at all", b'{"body":', b"\xff\xfe\x00",
                         b"{'single': 'quotes'}", b"[1, 2,]", b"NaNa", b"\x80abc"]),
        st.builds(lambda c, n: c * n, st.sampled_from([b"[", b"{", b'{"a":']),
                  st.integers(1, DEEP_DEPTH)),
    )  # fmt: skip
    return st.builds(lambda d: Entry("not-json", "bytes", "dead-letter", data=d), data)


def json_value_entries() -> st.SearchStrategy[Entry]:
    """JSON of every type that is not a message envelope, deep nesting included."""
    value = st.one_of(json_values(), deep_values(DEEP_DEPTH // 100))
    return st.builds(lambda v: Entry("json-value", "bytes", "dead-letter", data=dumps(v)), value)


def broken_envelope_entries() -> st.SearchStrategy[Entry]:
    """A good envelope with a part the transport needs removed or of the wrong type."""
    not_dict = json_values().filter(lambda v: not isinstance(v, dict))
    not_str = json_values().filter(lambda v: not isinstance(v, str))
    change = st.one_of(
        st.tuples(st.sampled_from(["body", "headers", "properties", "properties.delivery_info",
                                   "properties.delivery_tag"]), st.just(REMOVE)),
        st.tuples(st.just("body"), not_str),
        st.tuples(st.sampled_from(["headers", "properties", "properties.delivery_info"]),
                  not_dict),
    )  # fmt: skip
    good = valid_jobs(queue=True).map(lambda job: [[], {"job": job}, EMBED])
    return st.builds(lambda b, c: Entry("broken-envelope", "raw", "dead-letter", body=b,
                                        mutate=c), good, change)  # fmt: skip


#: The type markers kombu's JSON decoder knows (kombu/utils/json.py); any other it refuses.
KOMBU_TYPES = ("bytes", "base64", "datetime", "date", "time", "decimal", "uuid")


def undecodable_markers() -> st.SearchStrategy[dict[str, Any]]:
    """kombu type markers its JSON decoder refuses: an unknown type, or a known one whose value
    it cannot decode."""
    unknown = st.one_of(st.sampled_from(["nope", "", "pickle", "object", "set"]), text(0, 12))
    bad_value = st.sampled_from([("uuid", 5), ("uuid", "x"), ("decimal", "not a number"),
                                 ("datetime", "garbage"), ("date", 5), ("time", []),
                                 ("bytes", 5)])  # fmt: skip
    return st.one_of(
        st.builds(lambda t, v: {"__type__": t, "__value__": v},
                  unknown.filter(lambda t: t not in KOMBU_TYPES), json_values()),
        bad_value.map(lambda tv: {"__type__": tv[0], "__value__": tv[1]}),
    )  # fmt: skip


def marked_bodies() -> st.SearchStrategy[list[Any]]:
    """A valid job's body with an undecodable kombu type marker as a field's value, as the job
    or as the embed."""
    good = valid_jobs(queue=True)
    where = st.sampled_from(["prompt", "width", "seed", "model", "x", "job", "embed"])

    def body(job: dict[str, Any], at: str, marker: dict[str, Any]) -> list[Any]:
        if at == "job":
            return [[], {"job": marker}, EMBED]
        if at == "embed":
            return [[], {"job": job}, {**EMBED, "chain": [marker]}]
        return [[], {"job": {**job, at: marker}}, EMBED]

    return st.builds(body, good, where, undecodable_markers())


def bad_body_entries() -> st.SearchStrategy[Entry]:
    """A good envelope whose body is not ``[args, kwargs, embed]``: any JSON value, not JSON,
    not base64, not UTF-8, nested past what a decoder takes, or with a kombu type marker its
    decoder refuses."""
    raw_bodies = st.one_of(
        st.binary(max_size=40).filter(lambda b: not _is_json(b)),
        st.builds(lambda c, n: c * n, st.sampled_from([b"[", b"{"]), st.integers(1, DEEP_DEPTH)),
        st.builds(lambda n: b"[" * n + b"]" * n, st.integers(1000, DEEP_DEPTH)),
    )  # fmt: skip
    return st.one_of(
        st.builds(lambda v: Entry("bad-body", "raw", "dead-letter", body=v),
                  json_values().filter(_not_shaped)),
        st.builds(lambda v: Entry("bad-body", "raw", "dead-letter", body=v,
                                  base64_body=False), json_values().filter(_not_shaped)),
        st.builds(lambda d: Entry("bad-body", "raw", "dead-letter", data=d), raw_bodies),
        st.builds(lambda s: Entry("bad-body", "raw", "dead-letter", mutate=("body", s)),
                  st.sampled_from(["!!!not base64!!!", "a", "abc", "====", "\u00e9t\u00e9"])),
        st.builds(lambda b: Entry("bad-body", "raw", "dead-letter", body=b), marked_bodies()),
    )  # fmt: skip


def shaped_body_entries() -> st.SearchStrategy[Entry]:
    """Bodies shaped ``[args, kwargs, embed]`` that do not carry one job: the worker fails
    them under their task id (never a dead letter, never run)."""
    args = st.lists(json_values(), max_size=3)
    kwargs = st.dictionaries(text(0, 10), json_values(), max_size=3)
    embed = st.none() | st.just(EMBED) | st.dictionaries(text(0, 8), json_values(), max_size=2)

    def body(a: list, k: dict, e: Any) -> list:
        if not a and set(k) == {"job"}:  # the contract's form: make it not a job
            k = {**k, "job": [k["job"]]}
        if len(a) == 1 and not k:
            a = [a[0], a[0]]
        return [a, k, e]

    return st.builds(lambda a, k, e: Entry("shaped-body", "raw", "recorded", body=body(a, k, e)),
                     args, kwargs, embed)  # fmt: skip


#: Envelope parts Celery reads after the transport let the entry through.
HEADER_PATHS = [
    "headers.eta", "headers.expires", "headers.timelimit", "headers.retries", "headers.id",
    "headers.task", "headers.root_id", "headers.parent_id", "headers.group", "headers.lang",
    "headers.stamped_headers", "headers.argsrepr", "headers.kwargsrepr", "headers.origin",
    "headers.ignore_result", "headers.stamps", "headers.shadow", "headers.group_index",
    "headers.replaced_task_nesting", "headers.compression", "properties.priority",
    "properties.delivery_tag", "properties.correlation_id", "properties.reply_to",
    "properties.delivery_mode", "properties.body_encoding", "properties.delivery_info.exchange",
    "properties.delivery_info.routing_key", "content-type", "content-encoding",
]  # fmt: skip
CONTENT_TYPES = ["application/x-python-serialize", "application/x-yaml", "text/plain",
                 "application/data", "application/json; charset=utf-8", ""]  # fmt: skip
#: Values of the shapes Celery's headers take, right and wrong (no date to come: a job with a
#: future ``eta`` waits for it).
HEADER_VALUES = [
    "x", "", "garbage", "2000-01-01T00:00:00", "2000-01-01T00:00:00+00:00", "rot13", "base64",
    [1, 2, 3], ["a", "b"], [None, None], [1, None], [-1, None], [math.nan, None], ["a"], [1],
    {"a": 1}, {"__type__": "datetime", "__value__": "2000-01-01T00:00:00"}, 0, -1, 5, 2**70,
    1.5, True, None,
]  # fmt: skip


def header_value_entries() -> st.SearchStrategy[Entry]:
    """A valid job's envelope with one header or property of any value: the transport
    dead-letters what Celery cannot take. ``handled``: it may run, fail or be dead-lettered,
    but it must not stop the worker nor vanish."""
    value = st.one_of(json_values(), st.sampled_from(CONTENT_TYPES), st.sampled_from(HEADER_VALUES))
    good = valid_jobs(queue=True).map(lambda job: [[], {"job": job}, EMBED])
    change = st.tuples(st.sampled_from(HEADER_PATHS), value)
    return st.builds(lambda b, c: Entry("header-value", "raw", "handled", body=b, mutate=c),
                     good, change)  # fmt: skip


def queue_entries() -> st.SearchStrategy[Entry]:
    """Queue entries: about half jobs (valid and invalid, by send_task and as raw messages),
    half entries that are not jobs, and jobs with a header or property of any value."""
    return weighted(
        (5, job_entries()),
        (1, not_json_entries()),
        (1, json_value_entries()),
        (1, broken_envelope_entries()),
        (1, bad_body_entries()),
        (1, shaped_body_entries()),
        (1, header_value_entries()),
    )


def draw_examples(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    """``n`` examples of ``strategy`` (fewer if it has fewer), drawn by hypothesis with a fixed
    seed: the same list on every run. For live tests that send examples in batches."""
    from hypothesis import given

    drawn: list[Any] = []

    @fleet_settings(max_examples=n, shrink=False)
    @given(strategy)
    def collect(example: Any) -> None:
        drawn.append(example)

    collect()
    return drawn


# ---------------------------------------------------------------------------------------------
# Counting


@dataclass
class Tally:
    """Counts of one layer: written (merged) into a JSON report and printed at the end."""

    layer: str
    counts: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        report: dict[str, Any] = {}
        if path.exists():
            try:
                report = json.loads(path.read_text())
            except ValueError:
                report = {}
        layers = report.setdefault("layers", {})
        entry = layers.setdefault(self.layer, {})
        for key, n in self.counts.items():
            entry[key] = entry.get(key, 0) + n
        if self.notes:
            entry.setdefault("notes", []).extend(self.notes)
        report["examples_per_property"] = examples()
        report["totals"] = totals(layers)
        path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        print(f"\nbad input [{self.layer}]: {dict(sorted(self.counts.items()))} -> {path}")


def totals(layers: dict[str, dict[str, Any]]) -> dict[str, int]:
    """The report's headline: cases tried, refused with the field named, worker crashes, jobs
    lost, over every layer."""
    keys = ("tried", "refused_named", "refused_unnamed", "accepted_invalid", "refused_valid",
            "enqueued_invalid", "unexpected_errors", "worker_crashes", "lost")  # fmt: skip
    return {k: sum(int(layer.get(k, 0)) for layer in layers.values()) for k in keys}


def report_path(default_dir: Path) -> Path:
    return Path(os.environ.get(REPORT_ENV) or default_dir / "bad_input.json")


# ---------------------------------------------------------------------------------------------
# Hand-written cases, for both layers

#: The valid job each hand-written mutation changes (small enough for a test worker).
BASE_JOB: dict[str, Any] = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 2}
MEGABYTE = 1_000_000


def _m(field_name: str, kind: str, value: Any = None, remove: bool = False) -> Mutation:
    return Mutation(field_name, kind, value, remove)


#: (id, mutation): each makes BASE_JOB invalid and must be refused naming the field. The
#: ``not-served`` models are allowed by the contract where FLEET_ALLOWED_MODELS is empty (the
#: producer's default) and refused by a worker that serves another model.
HAND_WRITTEN: list[tuple[str, Mutation]] = [
    ("width-0", _m("width", "out-of-range", 0)),
    ("width-negative", _m("width", "out-of-range", -64)),
    ("width-odd", _m("width", "not-a-multiple", 65)),
    ("width-100000", _m("width", "out-of-range", 100_000)),
    ("width-string", _m("width", "wrong-type", "512")),
    ("width-float", _m("width", "float", 512.5)),
    ("width-bool", _m("width", "wrong-type", True)),
    ("height-float", _m("height", "float", 64.5)),
    ("height-bool", _m("height", "wrong-type", False)),
    ("height-string", _m("height", "wrong-type", "sixty-four")),
    ("steps-0", _m("steps", "out-of-range", 0)),
    ("steps-negative", _m("steps", "out-of-range", -1)),
    ("steps-1e9", _m("steps", "out-of-range", 10**9)),
    ("steps-bool", _m("steps", "wrong-type", True)),
    ("guidance-nan", _m("guidance", "nan-inf", math.nan)),
    ("guidance-inf", _m("guidance", "nan-inf", math.inf)),
    ("guidance--inf", _m("guidance", "nan-inf", -math.inf)),
    ("guidance--1e308", _m("guidance", "out-of-range", -1e308)),
    ("prompt-empty", _m("prompt", "blank", "")),
    ("prompt-whitespace", _m("prompt", "blank", " \t\n\u3000 ")),
    ("prompt-1mb", _m("prompt", "huge", "a" * MEGABYTE)),
    ("prompt-nul", _m("prompt", "nul", "a fox\x00in the snow")),
    ("prompt-lone-surrogate", _m("prompt", "surrogate", "a fox\ud800")),
    ("prompt-list", _m("prompt", "wrong-type", ["a fox"])),
    ("prompt-null", _m("prompt", "wrong-type", None)),
    ("prompt-missing", _m("prompt", "missing", remove=True)),
    ("seed--1", _m("seed", "out-of-range", -1)),
    ("seed--1.0", _m("seed", "out-of-range", -1.0)),
    ("seed-2**64", _m("seed", "out-of-range", 2**64)),
    ("seed-1.5", _m("seed", "float", 1.5)),
    ("seed-12abc", _m("seed", "bad-string", "12abc")),
    ("seed-arabic-digits", _m("seed", "bad-string", "١٢")),
    ("images-0", _m("images", "out-of-range", 0)),
    ("images-10000", _m("images", "out-of-range", 10_000)),
    ("model-path", _m("model", "not-served", "../../etc/passwd")),
    ("model-url", _m("model", "not-served", "https://example.com/model.safetensors")),
    ("scheduler-unknown", _m("scheduler", "unknown", "warp-drive")),
    ("field-__class__", _m("__class__", "extra", "JobSpec")),
    ("negative-prompt-1mb", _m("negative_prompt", "huge", "n" * MEGABYTE)),
    ("job-id-trailing-newline", _m("job_id", "pattern", "abc\n")),
    ("job-id-path", _m("job_id", "pattern", "../../etc/passwd")),
    ("submitted-at-nan", _m("submitted_at", "not-a-time", math.nan)),
    ("submitted-at--inf", _m("submitted_at", "not-a-time", -math.inf)),
    ("schema-version-string", _m("schema_version", "wrong-type", "1")),
]
