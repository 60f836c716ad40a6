"""Everything that writes prompts: a new version (numbered under a lock on its template, checked before it is
saved, never an update), a label pointed at a version, a brand saved; each recorded in the audit log."""

from __future__ import annotations

import re
from typing import Any

from django.db import transaction
from django.db.models import Max

from audit.services import audit_record

from .exceptions import PromptTemplateError, PromptVersionInvalidError
from .models import BrandProfile, PromptLabel, PromptTemplate, PromptVersion
from .output import schema_problem
from .rendering import RESERVED_NAMES, VARIABLE_TYPES, names_undeclared, render_messages, type_ok, variables_resolve

ROLES = ("system", "developer", "user", "assistant")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_PLACEHOLDERS: dict[str, Any] = {
    "string": "example",
    "integer": 1,
    "number": 1.5,
    "boolean": True,
    "array": [],
    "object": {},
}
# Renders a template's brand-aware text against (every field filled), so a misspelt ``brand.`` name is caught.
_SAMPLE_BRAND = BrandProfile(
    name="Sample brand",
    slug="sample-brand",
    voice="a friendly expert",
    tone="warm",
    audience="everyone",
    style_rules="Short sentences.",
    words_to_avoid=["synergy"],
    example_copy="Hello.",
)


def _invalid(message: str, param: str) -> PromptVersionInvalidError:
    return PromptVersionInvalidError(message, param=param)


def _messages_checked(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise _invalid("A version has at least one message: a list of {role, content}.", "messages")
    for index, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise _invalid(f"Message {index} needs a role: one of {', '.join(ROLES)}.", "messages")
        content = message.get("content")
        parts_ok = isinstance(content, list) and all(
            isinstance(part, dict) and isinstance(part.get("text", ""), str) for part in content
        )
        if not isinstance(content, str) and not parts_ok:
            raise _invalid(f"Message {index}'s content must be text (a template).", "messages")
    return messages


def _variables_checked(variables: Any) -> list[dict[str, Any]]:
    if variables in (None, ""):
        return []
    if not isinstance(variables, list):
        raise _invalid("Variables are a list of {name, type, default?, required?, description?}.", "variables")
    seen: set[str] = set()
    for index, spec in enumerate(variables, start=1):
        if not isinstance(spec, dict):
            raise _invalid(f"Variable {index} must be an object with a name and a type.", "variables")
        name = spec.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise _invalid(f"Variable {index} needs a name made of letters, digits and _.", "variables")
        if name in RESERVED_NAMES:
            raise _invalid(f"`{name}` is given to every template by the renderer; choose another name.", "variables")
        if name in seen:
            raise _invalid(f"The variable `{name}` is declared twice.", "variables")
        seen.add(name)
        kind = spec.get("type", "string")
        if kind not in VARIABLE_TYPES:
            raise _invalid(
                f"The variable `{name}` has type `{kind}`: use one of {', '.join(VARIABLE_TYPES)}.", "variables"
            )
        for key in ("default", "example"):
            if key in spec and spec[key] is not None and not type_ok(kind, spec[key]):
                raise _invalid(f"The {key} of `{name}` is not of its type, {kind}.", "variables")
        if "required" in spec and not isinstance(spec["required"], bool):
            raise _invalid(f"`required` of `{name}` is true or false.", "variables")
    return variables


def _limits_checked(field_limits: Any) -> dict[str, int]:
    if field_limits in (None, ""):
        return {}
    if not isinstance(field_limits, dict):
        raise _invalid('Field limits are an object of "field": characters.', "field_limits")
    for path, limit in field_limits.items():
        if not isinstance(path, str) or not path.strip():
            raise _invalid("A field limit names its field (a dotted path, [] for list items).", "field_limits")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise _invalid(f"The limit of `{path}` must be a positive whole number of characters.", "field_limits")
    return field_limits


def _schema_checked(output_schema: Any) -> dict[str, Any] | None:
    if output_schema in (None, "", {}):
        return None
    if not isinstance(output_schema, dict):
        raise _invalid("The output schema is a JSON schema (an object), or empty for free text.", "output_schema")
    problem = schema_problem(output_schema)
    if problem:
        raise _invalid(f"The output schema is not a valid JSON schema (Draft 2020-12): {problem}", "output_schema")
    return output_schema


def _sample_variables(variables: list[dict[str, Any]]) -> dict[str, Any]:
    sample: dict[str, Any] = {}
    for spec in variables:
        if spec.get("default") is not None:
            continue
        if spec.get("example") is not None:
            sample[spec["name"]] = spec["example"]
        else:
            sample[spec["name"]] = _PLACEHOLDERS[spec.get("type", "string")]
    return sample


def version_draft_check(version: PromptVersion) -> None:
    """Every message renders with the declared variables (their defaults, examples or a placeholder of their
    type), with and without a brand, and reads no name that is not declared (also in a branch those values do
    not take): a syntax error, an undeclared name or a sandbox refusal is refused now, not on the first run
    that takes the branch, where the caller would get the 400 for the author's typo."""
    variables = variables_resolve(version, _sample_variables(version.variables))
    for brand in (None, _SAMPLE_BRAND):
        try:
            render_messages(version, variables, brand)
        except PromptTemplateError as exc:
            raise _invalid(exc.message, "messages") from None
    undeclared = names_undeclared(version)
    if undeclared:
        index, name = undeclared[0]
        raise _invalid(
            f"The prompt template's message {index + 1} reads `{name}`, which is not a declared variable: "
            "declare it, or correct its spelling.",
            "messages",
        )


def version_fields_checked(
    *, messages: Any, variables: Any = None, output_schema: Any = None, field_limits: Any = None, render: bool = False
) -> dict[str, Any]:
    """A version's content as it would be stored (empty parts normalised), or ``PromptVersionInvalidError``
    naming the part that is wrong; ``render``: also render every message (``version_draft_check``)."""
    content = {
        "messages": _messages_checked(messages),
        "variables": _variables_checked(variables),
        "output_schema": _schema_checked(output_schema),
        "field_limits": _limits_checked(field_limits),
    }
    if render:
        version_draft_check(PromptVersion(**content))
    return content


@transaction.atomic
def prompt_version_create(
    *,
    template: PromptTemplate,
    messages: Any,
    variables: Any = None,
    output_schema: Any = None,
    field_limits: Any = None,
    note: str = "",
    created_by: Any = None,
) -> PromptVersion:
    """The template's next version (its number taken under a row lock on the template, so two editors saving
    at once get two numbers, not a clash), after checking that it renders, that its schema is a JSON schema
    and that its limits are positive. Recorded as ``prompt.version_create``."""
    content = version_fields_checked(
        messages=messages, variables=variables, output_schema=output_schema, field_limits=field_limits, render=True
    )
    draft = PromptVersion(
        template=template,
        **content,
        note=(note or "")[:300],
        created_by=created_by if getattr(created_by, "pk", None) else None,
    )
    PromptTemplate.objects.select_for_update().filter(pk=template.pk).first()
    last = PromptVersion.objects.filter(template=template).aggregate(n=Max("number"))["n"] or 0
    draft.number = last + 1
    draft.save(force_insert=True)
    audit_record(
        "prompt.version_create",
        target=draft,
        changes={"number": [last or None, draft.number], "note": [None, draft.note]},
        actor=created_by if created_by is not None else ...,
    )
    return draft


@transaction.atomic
def prompt_label_set(*, template: PromptTemplate, name: str, version: PromptVersion, actor: Any = ...) -> PromptLabel:
    """Point the label ``name`` (``production``, ``staging``, …) at ``version`` of ``template``. Recorded as
    ``prompt.label_set`` with the version numbers before and after."""
    if version.template_id != template.pk:
        raise _invalid(f"Version {version.number} is not one of `{template.slug}`'s.", "version")
    if not isinstance(name, str) or not re.match(r"^[-a-zA-Z0-9_]{1,32}$", name):
        raise _invalid("A label is a short name such as production or staging.", "label")
    label = (
        PromptLabel.objects.select_for_update().select_related("version").filter(template=template, name=name).first()
    )
    before = label.version.number if label is not None else None
    if label is None:
        label = PromptLabel.objects.create(template=template, name=name, version=version)
    elif label.version_id != version.pk:
        label.version = version
        label.save(update_fields=["version", "updated_at"])
    else:
        return label
    audit_record("prompt.label_set", target=label, changes={"version": [before, version.number]}, actor=actor)
    return label


@transaction.atomic
def prompt_label_remove(*, label: PromptLabel, actor: Any = ...) -> None:
    number = label.version.number
    audit_record("prompt.label_remove", target=label, changes={"version": [number, None]}, actor=actor)
    label.delete()


BRAND_FIELDS = ("name", "slug", "voice", "tone", "audience", "style_rules", "words_to_avoid", "example_copy")


@transaction.atomic
def brand_save(*, brand: BrandProfile, actor: Any = ...) -> BrandProfile:
    """Create or update a brand profile, recording ``prompt.brand_create`` or ``prompt.brand_change`` with the
    fields that changed."""
    before = BrandProfile.objects.filter(pk=brand.pk).first() if brand.pk else None
    brand.full_clean()
    brand.save()
    if before is None:
        audit_record(
            "prompt.brand_create",
            target=brand,
            changes={f: [None, getattr(brand, f)] for f in BRAND_FIELDS},
            actor=actor,
        )
    else:
        changes = {
            f: [getattr(before, f), getattr(brand, f)] for f in BRAND_FIELDS if getattr(before, f) != getattr(brand, f)
        }
        if changes:
            audit_record("prompt.brand_change", target=brand, changes=changes, actor=actor)
    return brand
