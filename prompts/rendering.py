"""Rendering a prompt version's messages: its variables resolved and type-checked, each message's content a
Jinja2 template run in one sandbox, and a brand profile carried into the system message.

The sandbox (``jinja2.sandbox``) refuses attribute access to internals (``{{ ''.__class__ }}``), and this one
is immutable (a template cannot ``append`` to a list it was given) and bounds every way a short template
can build a huge string (``_PromptSandbox``): ``*`` and ``**``, the widths and precisions of ``%`` and
``str.format`` (and the ``format`` filter), ``center``/``ljust``/``rjust``/``zfill``/``expandtabs``,
``replace``, the ``center`` and ``indent`` filters and ``lipsum``. So neither a typo in a template nor a
caller's variable that a template passes on as a width can fill the process's memory. Work that prints
nothing is bounded per render as well: loop iterations (``MAX_ITERATIONS``), the size of integers
(``MAX_INTEGER_BITS``) and what ``~``, ``+`` and ``*`` build (``MAX_BUILT``), so that no template burns the
worker's CPU for minutes. The context holds
only the caller's variables and plain dicts (never a model instance, whose methods a template could call), so
an error message has nothing secret to quote. Every failure is an ``ApplicationError`` 400, never a 500."""

from __future__ import annotations

import contextvars
import copy
import json
import operator
import re
import string
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2 import meta, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from .exceptions import PromptTemplateError, PromptVariablesError

if TYPE_CHECKING:
    from .models import BrandProfile, PromptVersion

VARIABLE_TYPES = ("string", "integer", "number", "boolean", "array", "object")
# Names the renderer itself gives every template: a version cannot declare a variable so named.
RESERVED_NAMES = frozenset({"brand", "output_schema", "field_limits"})
# The longest string or list a template's ``*`` or ``**`` may build.
MAX_PRODUCT = 100_000
# The longest a rendered message may grow (about 2 million tokens, past any model's context window): a loop
# or a join over a caller's values multiplies them, which no bound on a single operation catches.
MAX_RENDERED = 8_000_000
# The most loop iterations one render may run, all loops together (the sandbox's own ``range`` stops at this
# many): nested loops that print nothing would otherwise run for ever while no bound on the output is reached.
MAX_ITERATIONS = 100_000
# The largest integer a template's arithmetic may build (about 4,900 digits): a chain of ``**`` or ``*`` on a
# growing integer would otherwise take minutes of CPU, with no string or output to bound.
MAX_INTEGER_BITS = 16_384
# The most characters (or items) one render may build with ``~``, ``+`` and ``*`` in all: each is bounded on
# its own, but a loop repeating one would copy gigabytes without printing more than a line.
MAX_BUILT = 64_000_000


# Widths and precisions in a format string (``%`` and ``str.format``): a number, or a ``*`` that takes one
# from the arguments (refused: its value is not in the template's text).
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_NUMBERS = re.compile(r"\d+")
# String methods whose integer arguments are the length of what they build.
_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
# The keyword arguments Jinja itself adds to a call in a loop or a block: the scope's variables, not the call's.
_JINJA_SCOPES = frozenset({"_loop_vars", "_block_vars"})
_LIPSUM_MAX_PARAGRAPHS = 20
_LIPSUM_MAX_WORDS = 200


def _width_check(value: Any, what: str) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value > MAX_PRODUCT:
        raise SecurityError(f"{what} wider than {MAX_PRODUCT} characters")


def _percent_check(template: Any) -> None:
    """The widths and precisions of an old-style format string, before ``%`` builds it."""
    if not isinstance(template, str):
        return
    for width, precision in _PERCENT_SPEC.findall(template):
        for number in (width, precision):
            if number == "*":
                raise SecurityError("a width or precision taken from the arguments ('*') in a format string")
            if number:
                _width_check(int(number), "a format string's field")


def _rendered_check(length: int) -> None:
    if length > MAX_RENDERED:
        raise SecurityError(f"it renders to more than {MAX_RENDERED:,} characters")


def _format_check(template: str) -> None:
    """The format specs of a new-style format string (``str.format``), before it is built."""
    for _, _, spec, _ in string.Formatter().parse(template):
        if not spec:
            continue
        if "{" in spec:
            raise SecurityError("a format spec taken from the arguments ('{:{width}}') in a format string")
        for number in _NUMBERS.findall(spec):
            _width_check(int(number), "a format string's field")


def _integer_check(bits: int) -> None:
    if bits > MAX_INTEGER_BITS:
        raise SecurityError(f"an integer larger than {MAX_INTEGER_BITS} bits")


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# What the render running in this context (``_bounded_render``) spent: [loop iterations, characters or items
# built]; None outside one.
_spent: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("prompt_spent", default=None)
# The weights (``_weight``) of the large values the render weighed, by id, each with its value (kept alive, so
# that no other value takes its id): the sandbox lets no template change a list or a dict, so a weight holds.
_weighed: contextvars.ContextVar[dict[int, tuple[Any, int]] | None] = contextvars.ContextVar(
    "prompt_weighed", default=None
)
# A value weighing less is weighed again when met (cheaply: at most this many steps); a heavier one is kept.
_WEIGHT_KEPT = 256
_CONTAINERS = (list, tuple, dict, set, frozenset, type({}.keys()), type({}.values()), type({}.items()))
# Values that weigh what they are (``_weight``): no call, filter or literal returning one is weighed.
_SCALARS = (str, int, float, type(None))
# Filters that return a text, a number or one of the values they were given, never a list or a dict they built:
# their results are not weighed (a normal template's filters are mostly these).
_UNWEIGHED_FILTERS = frozenset(
    {
        "abs", "attr", "capitalize", "center", "count", "d", "default", "e", "escape", "filesizeformat", "first",
        "float", "forceescape", "format", "indent", "int", "join", "last", "length", "lower", "max", "min", "pprint",
        "random", "replace", "round", "safe", "string", "striptags", "title", "tojson", "trim", "truncate", "upper",
        "urlencode", "urlize", "wordcount", "wordwrap", "xmlattr",
    }
)  # fmt: skip


def _weight(value: Any, kept: dict[int, tuple[Any, int]], nested: bool) -> int:
    """About how many characters ``value`` prints as (its ``repr``, which ``{{ }}``, ``~``, ``string``, ``tojson``
    and the like all come close to): a list built of the same list twice (``[l, l]``) prints it twice, so a loop
    of them doubles what one item prints each round while holding a few small lists. Past ``MAX_RENDERED`` it
    stops and refuses. A namespace is a value of its own only: one inside a list, a dict or another namespace is
    refused, since what it holds can change after the weighing of what holds it."""
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, bool) or value is None:
        return 5
    if isinstance(value, int):
        return value.bit_length() // 3 + 2
    if isinstance(value, float):
        return 24
    if isinstance(value, Namespace):
        if nested:
            raise SecurityError("a namespace inside a list, a dict or another namespace")
        return _weight(object.__getattribute__(value, "_Namespace__attrs"), kept, True)
    if not isinstance(value, _CONTAINERS):
        return 1
    known = kept.get(id(value))
    if known is not None:
        return known[1]
    total = 2
    for item in value.items() if isinstance(value, dict) else value:
        total = _weight_check(total + _weight(item, kept, True) + 2)
    if total >= _WEIGHT_KEPT:
        kept[id(value)] = (value, total)
    return total


def _weighed_check(value: Any, *, nested: bool = False) -> int:
    """``value``'s weight (``_weight``), refused past ``MAX_RENDERED``."""
    kept = _weighed.get()
    return _weight_check(_weight(value, {} if kept is None else kept, nested))


def _weight_check(total: int) -> int:
    if total > MAX_RENDERED:
        raise SecurityError(f"a list, tuple or dict that prints as more than {MAX_RENDERED:,} characters")
    return total


def _built(size: int) -> None:
    """Count ``size`` characters (or items) built against the render's ``MAX_BUILT``."""
    if size > MAX_RENDERED:
        raise SecurityError(f"a string or list longer than {MAX_RENDERED:,} characters or items")
    spent = _spent.get()
    if spent is not None:
        spent[1] += size
        if spent[1] > MAX_BUILT:
            raise SecurityError(f"it builds more than {MAX_BUILT:,} characters or items in all")


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with every ``for`` loop's items counted (``_PromptSandbox.loop_bounded``), every
    ``~`` concatenation's length checked (``concat_bounded``), and every list, tuple or dict a template builds (a
    literal, a filter's or a call's result) and every value it stores in a namespace weighed (``built_bounded``,
    ``stored_bounded``): what ``call_binop`` cannot see."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        node.iter.bounded_by = "loop_bounded"  # type: ignore[attr-defined]  # Jinja allows no node types of our own
        super().visit_For(node, frame)

    def visit_Assign(self, node: nodes.Assign, frame: Frame) -> None:
        stores = isinstance(node.target, nodes.NSRef) or any(node.target.find_all(nodes.NSRef))
        if stores and not isinstance(node.node, nodes.Tuple | nodes.List):
            node.node.bounded_by = "stored_bounded"  # type: ignore[attr-defined]
        super().visit_Assign(node, frame)

    def visit(self, node: nodes.Node, *args: Any, **kwargs: Any) -> Any:
        bound = getattr(node, "bounded_by", None)
        if bound is None and (
            isinstance(node, nodes.List | nodes.Dict | nodes.Call)
            or (isinstance(node, nodes.Filter) and node.name not in _UNWEIGHED_FILTERS)
            or (isinstance(node, nodes.Tuple) and node.ctx == "load")
        ):
            bound = "built_bounded"
        if bound is None:
            return super().visit(node, *args, **kwargs)
        # Written into the compiled template: no call through the sandbox, no cost when rendering but the count.
        self.write(f"environment.{bound}(")
        node.bounded_by = None  # type: ignore[attr-defined]
        try:
            return super().visit(node, *args, **kwargs)
        finally:
            node.bounded_by = bound  # type: ignore[attr-defined]
            self.write(")")

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.concat_bounded(")
        super().visit_Concat(node, frame)
        self.write(")")


class _PromptSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%", "+"})
    code_generator_class = _BoundedCodeGenerator

    @staticmethod
    def loop_bounded(items: Any) -> Any:
        """``items``, each counted against the render's ``MAX_ITERATIONS``."""
        spent = _spent.get()
        if spent is None:
            yield from items
            return
        for item in items:
            spent[0] += 1
            if spent[0] > MAX_ITERATIONS:
                raise SecurityError(f"its loops run more than {MAX_ITERATIONS:,} times in all")
            yield item

    @staticmethod
    def concat_bounded(text: str) -> str:
        _built(len(text))
        return text

    @staticmethod
    def built_bounded(value: Any) -> Any:
        """``value``, a list, tuple or dict the template built (or anything a filter or a call returned),
        weighed (``_weight``)."""
        if not isinstance(value, _SCALARS):
            _weighed_check(value)
        return value

    @staticmethod
    def stored_bounded(value: Any) -> Any:
        """``value``, stored in a namespace (``{% set ns.x = value %}``): weighed, and never a namespace."""
        if not isinstance(value, _SCALARS):
            _weighed_check(value, nested=True)
        return value

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        center, indent, format_filter = (self.filters[name] for name in ("center", "indent", "format"))

        def bounded_center(value: Any, width: int = 80) -> str:
            _width_check(width, "center")
            return center(value, width)

        def bounded_indent(value: Any, width: Any = 4, *args: Any, **kwargs: Any) -> str:
            _width_check(width, "indent")
            return indent(value, width, *args, **kwargs)

        def bounded_format(value: Any, *args: Any, **kwargs: Any) -> str:
            _percent_check(str(value))
            return format_filter(value, *args, **kwargs)

        join_filter = self.filters["join"]

        @jinja2.pass_eval_context
        def bounded_join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
            items = list(value)
            _rendered_check(len(str(d)) * max(len(items) - 1, 0))
            _weighed_check(items)
            return join_filter(eval_ctx, items, d, attribute)

        self.filters.update(center=bounded_center, indent=bounded_indent, format=bounded_format, join=bounded_join)
        lipsum = self.globals["lipsum"]

        def bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
            if n > _LIPSUM_MAX_PARAGRAPHS or max > _LIPSUM_MAX_WORDS:
                raise SecurityError(f"lipsum beyond {_LIPSUM_MAX_PARAGRAPHS} paragraphs of {_LIPSUM_MAX_WORDS} words")
            return lipsum(n=n, html=html, min=min, max=max)

        self.globals["lipsum"] = bounded_lipsum

    def call_binop(self, context: Any, operator_name: str, left: Any, right: Any) -> Any:
        if operator_name == "%":
            _percent_check(left)
            return operator.mod(left, right)
        if operator_name == "**":
            if isinstance(right, int | float) and abs(right) > 100:
                raise SecurityError("the exponent is too large for a prompt template")
            if _is_integer(left) and _is_integer(right) and right > 0:
                _integer_check(left.bit_length() * right)
            return operator.pow(left, right)
        if operator_name == "+":
            if isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
                _built(len(left) + len(right))
                if not isinstance(left, str):
                    _weight_check(_weighed_check(left) + _weighed_check(right))
            return operator.add(left, right)
        if _is_integer(left) and _is_integer(right):
            _integer_check(left.bit_length() + right.bit_length())
        if isinstance(left, str | list | tuple) or isinstance(right, str | list | tuple):
            times = right if isinstance(left, str | list | tuple) else left
            base = left if isinstance(left, str | list | tuple) else right
            if isinstance(times, int) and len(base) * times > MAX_PRODUCT:
                raise SecurityError(f"a repeated string or list longer than {MAX_PRODUCT} items")
            if isinstance(times, int):
                _built(len(base) * times)
                if not isinstance(base, str):
                    _weight_check(_weighed_check(base) * times)
        return operator.mul(left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        # What a call may hold on to (``cycler(l, l).items``), each argument a value of its own (a namespace
        # given to a macro is), weighed together; not the scope Jinja passes a macro (``_loop_vars``).
        weighed = [
            value
            for value in (*args, *(value for name, value in kwargs.items() if name not in _JINJA_SCOPES))
            if not isinstance(value, _SCALARS)
        ]
        if weighed:
            _weight_check(sum(_weighed_check(value) for value in weighed))
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            name = getattr(__obj, "__name__", "")
            if name in _WIDTH_METHODS:
                for value in (*args, *kwargs.values()):
                    _width_check(value, name)
            elif name == "join" and len(args) == 1 and not kwargs:
                args = (list(args[0]),)
                _rendered_check(len(owner) * max(len(args[0]) - 1, 0))
                _weighed_check(args[0])
            elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
                old, new = args[0], args[1]
                count = args[2] if len(args) > 2 and isinstance(args[2], int) else -1
                found = owner.count(old) if old else len(owner) + 1
                if count >= 0:
                    found = min(found, count)
                if len(owner) + found * max(0, len(new) - len(old)) > MAX_PRODUCT:
                    raise SecurityError(f"a replace building a string longer than {MAX_PRODUCT} characters")
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Any:
        """``str.format`` and ``format_map`` as Jinja's sandbox wraps them, their specs checked first."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        template = value.__self__

        def checked(*args: Any, **kwargs: Any) -> str:
            _format_check(str(template))
            return wrapped(*args, **kwargs)

        return checked


def _printed(value: Any) -> Any:
    """What ``{{ value }}`` prints: nothing for none (an optional variable left out, no brand), never the
    word "None" in the middle of a prompt."""
    return "" if value is None else value


# Autoescape off: the output is a chat message, not HTML. StrictUndefined: a misspelt name is an error, not
# an empty string the model silently never sees. No loader: a template cannot include a file.
environment = _PromptSandbox(
    autoescape=False, undefined=jinja2.StrictUndefined, loader=None, keep_trailing_newline=True, finalize=_printed
)


def _where(index: int | None) -> str:
    return "" if index is None else f"message {index + 1}: "


@lru_cache(maxsize=2048)
def _compiled(source: str) -> jinja2.Template:
    return environment.from_string(source)


def template_compile(source: str, *, index: int | None = None) -> jinja2.Template:
    """The compiled template (cached by its text); a syntax error is a ``PromptTemplateError``."""
    try:
        return _compiled(source)
    except TemplateSyntaxError as exc:
        raise PromptTemplateError(
            f"The prompt template does not compile: {_where(index)}{exc.message} (line {exc.lineno}).",
            param="prompt",
        ) from None


@lru_cache(maxsize=2048)
def _names(source: str) -> frozenset[str]:
    return frozenset(meta.find_undeclared_variables(environment.parse(source)))


def template_names(source: str) -> frozenset[str]:
    """The names a template's text reads from its context (after compiling it)."""
    template_compile(source)
    return _names(source)


def _bounded_render(template: jinja2.Template, context: dict[str, Any]) -> str:
    """``template.render``, piece by piece, stopped once the text passes ``MAX_RENDERED``."""
    pieces: list[str] = []
    length = 0
    token = _spent.set([0, 0])
    weighed = _weighed.set({})
    try:
        for piece in template.generate(context):
            length += len(piece)
            _rendered_check(length)
            pieces.append(piece)
    finally:
        _weighed.reset(weighed)
        _spent.reset(token)
    return "".join(pieces)


def template_render(source: str, context: dict[str, Any], *, index: int | None = None) -> str:
    template = template_compile(source, index=index)
    try:
        return _bounded_render(template, context)
    except SecurityError as exc:
        raise PromptTemplateError(
            f"The prompt template does something the sandbox refuses: {_where(index)}{_short(exc)}", param="prompt"
        ) from None
    except UndefinedError as exc:
        raise PromptTemplateError(
            f"The prompt template uses a name it was not given: {_where(index)}{_short(exc)}", param="prompt"
        ) from None
    except RecursionError:
        # A macro (or a ``recursive`` loop) calling itself as often as a caller's value says: Python's stack
        # ends it, which is the template's failure like any other, not the server's.
        raise PromptTemplateError(
            f"The prompt template recurses too deep: {_where(index)}a macro or a recursive loop calls itself more "
            "times than rendering allows.",
            param="prompt",
        ) from None
    except TemplateError as exc:
        raise PromptTemplateError(
            f"The prompt template does not render: {_where(index)}{_short(exc)}", param="prompt"
        ) from None
    except (ArithmeticError, TypeError, ValueError, LookupError, AttributeError) as exc:
        raise PromptTemplateError(
            f"The prompt template does not render: {_where(index)}{type(exc).__name__}: {_short(exc)}",
            param="prompt",
        ) from None


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 300 else text[:297] + "..."


# VARIABLES


def type_ok(kind: str, value: Any) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "array":
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, dict)
    return True


_ARTICLE = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false"}


def _type_phrase(kind: str) -> str:
    return _ARTICLE.get(kind, f"an {kind}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def variable_required(declared: dict[str, Any]) -> bool:
    """Required unless it says otherwise or has a default."""
    return bool(declared.get("required", "default" not in declared))


def variables_resolve(version: PromptVersion, given: Any) -> dict[str, Any]:
    """The variables a render gets: the caller's, each of its declared type, with the declared defaults for
    those left out. A missing required variable, an unknown one or a wrong type is a ``PromptVariablesError``
    (``param`` ``variables.<name>``)."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise PromptVariablesError("`variables` must be an object of name: value.", param="variables")
    declared = {item["name"]: item for item in version.variables or []}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        names = ", ".join(f"`{name}`" for name in declared) or "none"
        raise PromptVariablesError(
            f"The prompt template has no variable `{unknown[0]}` (it declares {names}).",
            param=f"variables.{unknown[0]}",
        )
    resolved: dict[str, Any] = {}
    for name, spec in declared.items():
        kind = spec.get("type", "string")
        value = given.get(name)
        if value is None:
            if "default" in spec:
                resolved[name] = copy.deepcopy(spec["default"])
            elif variable_required(spec):
                raise PromptVariablesError(
                    f"The variable `{name}` is required ({_type_phrase(kind)}).", param=f"variables.{name}"
                )
            else:
                resolved[name] = None
            continue
        if not type_ok(kind, value):
            raise PromptVariablesError(
                f"The variable `{name}` must be {_type_phrase(kind)}, not {_json_type(value)}.",
                param=f"variables.{name}",
            )
        resolved[name] = copy.deepcopy(value)
    return resolved


# BRAND


def _lines(text: str) -> list[str]:
    return [line.strip().lstrip("-*• ").strip() for line in (text or "").splitlines() if line.strip()]


def brand_section(brand: BrandProfile) -> str:
    """The brand as a section of a system message: who to sound like, and what never to write."""
    parts = [
        f"## Brand: {brand.name}",
        "Write as this brand. Follow its voice, tone and rules in everything you write.",
    ]
    if brand.voice:
        parts.append(f"Voice: {brand.voice.strip()}")
    if brand.tone:
        parts.append(f"Tone: {brand.tone.strip()}")
    if brand.audience:
        parts.append(f"Audience: {brand.audience.strip()}")
    rules = _lines(brand.style_rules)
    if rules:
        parts.append("Style rules:\n" + "\n".join(f"- {rule}" for rule in rules))
    words = [w for w in brand.words_to_avoid or [] if isinstance(w, str) and w.strip()]
    if words:
        parts.append("Words to avoid (never use them): " + ", ".join(f'"{w.strip()}"' for w in words))
    if brand.example_copy:
        parts.append("Example copy in the brand's voice:\n" + brand.example_copy.strip())
    return "\n".join(parts)


def brand_context(brand: BrandProfile | None) -> dict[str, Any] | None:
    """What a template sees as ``brand``: plain values (never the model instance) and the ready ``section``."""
    if brand is None:
        return None
    return {
        "name": brand.name,
        "slug": brand.slug,
        "voice": brand.voice,
        "tone": brand.tone,
        "audience": brand.audience,
        "style_rules": _lines(brand.style_rules),
        "words_to_avoid": [w for w in brand.words_to_avoid or [] if isinstance(w, str)],
        "example_copy": brand.example_copy,
        "section": brand_section(brand),
    }


# MESSAGES


def _sources(message: dict[str, Any]) -> list[str]:
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)]
    return []


def _render_content(content: Any, context: dict[str, Any], index: int) -> Any:
    if isinstance(content, str):
        return template_render(content, context, index=index)
    if isinstance(content, list):
        return [
            {**part, "text": template_render(part["text"], context, index=index)}
            if isinstance(part, dict) and isinstance(part.get("text"), str)
            else part
            for part in content
        ]
    return content


def places_brand(version: PromptVersion) -> bool:
    """The template puts ``brand`` somewhere itself, so the renderer does not add its section."""
    return any("brand" in template_names(source) for message in version.messages or [] for source in _sources(message))


def names_undeclared(version: PromptVersion) -> list[tuple[int, str]]:
    """(message index, name) for each name a message reads that is neither a declared variable nor one the
    renderer gives (Jinja's own globals, ``range`` and the like, are not reads). A render with sample values
    cannot see such a name when it sits in a branch those values do not take; this finds it by reading."""
    declared = {spec.get("name") for spec in version.variables or [] if isinstance(spec, dict)} | RESERVED_NAMES
    return [
        (index, name)
        for index, message in enumerate(version.messages or [])
        for source in _sources(message)
        for name in sorted(template_names(source) - declared)
    ]


def render_context(version: PromptVersion, variables: dict[str, Any], brand: BrandProfile | None) -> dict[str, Any]:
    return {
        **variables,
        "brand": brand_context(brand),
        "output_schema": json.dumps(version.output_schema, indent=2) if version.output_schema else "",
        "field_limits": dict(version.field_limits or {}),
    }


def render_messages(version: PromptVersion, variables: dict[str, Any], brand: BrandProfile | None) -> list[dict]:
    """The chat messages of ``version`` rendered with ``variables`` (already resolved by ``variables_resolve``).

    With a brand, its section ends the first system message (or is a system message of its own, first, if the
    template has none), unless the template places ``brand`` itself."""
    context = render_context(version, variables, brand)
    rendered = [
        {**message, "content": _render_content(message.get("content"), context, index)}
        for index, message in enumerate(version.messages or [])
    ]
    if brand is None or places_brand(version):
        return rendered
    section = context["brand"]["section"]
    for message in rendered:
        if message.get("role") == "system":
            content = message.get("content")
            if isinstance(content, str):
                message["content"] = f"{content.rstrip()}\n\n{section}" if content.strip() else section
            else:
                message["content"] = [*(content or []), {"type": "text", "text": section}]
            return rendered
    return [{"role": "system", "content": section}, *rendered]
