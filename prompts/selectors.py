"""Reading prompt versions and brands for a run: cached in-process (``core.cache.TTLCache``), cleared by
``prompts.signals`` when a template, version, label or brand changes in this process (other processes see
the change within ``LLMHUB_LOOKUP_CACHE_TTL``). A version never changes, so only which version a label or
"the latest" names can go stale, and only for that long."""

from __future__ import annotations

from django.db.models import OuterRef, Prefetch, QuerySet, Subquery

from core.cache import TTLCache
from core.exceptions import ApplicationError
from core.text import text_quoted

from .exceptions import BrandNotFoundError, PromptNotFoundError
from .models import BrandProfile, PromptLabel, PromptTemplate, PromptVersion

# Which label a run uses when it names neither a version nor a label (if the template has it).
DEFAULT_LABEL = "production"

prompt_cache: TTLCache[PromptVersion | None] = TTLCache("prompts")
brand_cache: TTLCache[BrandProfile | None] = TTLCache("brands")


def _versions() -> QuerySet[PromptVersion]:
    return PromptVersion.objects.select_related("template")


def _version_load_sync(slug: str, version: int | None, label: str | None) -> PromptVersion | None:
    if version is not None:
        return _versions().filter(template__slug=slug, number=version).first()
    if label is not None:
        row = PromptLabel.objects.select_related("version__template").filter(template__slug=slug, name=label).first()
        return None if row is None else row.version
    row = (
        PromptLabel.objects.select_related("version__template").filter(template__slug=slug, name=DEFAULT_LABEL).first()
    )
    if row is not None:
        return row.version
    return _versions().filter(template__slug=slug).order_by("-number").first()


async def _version_load(slug: str, version: int | None, label: str | None) -> PromptVersion | None:
    if version is not None:
        return await _versions().filter(template__slug=slug, number=version).afirst()
    labels = PromptLabel.objects.select_related("version__template").filter(template__slug=slug)
    if label is not None:
        row = await labels.filter(name=label).afirst()
        return None if row is None else row.version
    row = await labels.filter(name=DEFAULT_LABEL).afirst()
    if row is not None:
        return row.version
    return await _versions().filter(template__slug=slug).order_by("-number").afirst()


def _checked_args(slug: object, version: object, label: object) -> tuple[str, int | None, str | None]:
    if not isinstance(slug, str) or not slug:
        raise PromptNotFoundError("Name a prompt template by its slug.", param="prompt.slug")
    if version is not None and label is not None:
        raise ApplicationError("Give a version or a label, not both.", param="prompt.version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise ApplicationError("A version is a whole number.", param="prompt.version")
    if label is not None and (not isinstance(label, str) or not label):
        raise ApplicationError("A label is a name such as 'production'.", param="prompt.label")
    return slug, version, label


def _not_found(slug: str, version: int | None, label: str | None) -> PromptNotFoundError:
    named = f"The prompt template `{text_quoted(slug)}`"
    if version is not None:
        return PromptNotFoundError(f"{named} has no version {version}.", param="prompt.version")
    if label is not None:
        return PromptNotFoundError(f"{named} has no label `{text_quoted(label)}`.", param="prompt.label")
    return PromptNotFoundError(f"{named} does not exist or has no version yet.")


async def prompt_version_get(slug: str, *, version: int | None = None, label: str | None = None) -> PromptVersion:
    """The version a run asks for (its template selected): by number, by label, or neither: the
    ``production`` label if the template has one, else its latest version. Unknown: ``PromptNotFoundError``."""
    slug, version, label = _checked_args(slug, version, label)
    found = await prompt_cache.get_or_load(("v", slug, version, label), lambda: _version_load(slug, version, label))
    if found is None:
        raise _not_found(slug, version, label)
    return found


def prompt_version_get_sync(slug: str, *, version: int | None = None, label: str | None = None) -> PromptVersion:
    """``prompt_version_get`` for synchronous code (the admin), uncached."""
    slug, version, label = _checked_args(slug, version, label)
    found = _version_load_sync(slug, version, label)
    if found is None:
        raise _not_found(slug, version, label)
    return found


async def prompt_version_by_id(version_id: int) -> PromptVersion:
    """A version by primary key (an experiment's variant names its prompt version so), template selected."""
    found = await prompt_cache.get_or_load(("id", version_id), lambda: _versions().filter(pk=version_id).afirst())
    if found is None:
        raise PromptNotFoundError(f"The prompt version {version_id} does not exist.")
    return found


def prompt_template_list() -> QuerySet[PromptTemplate]:
    """The templates by slug, each with ``latest_versions`` (its newest version, or none: a list of at most
    one), ``default_versions`` (the version its ``DEFAULT_LABEL`` points at, without its messages, or none) and
    its labels with their versions' numbers: one version's content read per template, not every version's (a
    template edited 30 times holds 30)."""
    newest = PromptVersion.objects.filter(template_id=OuterRef("template_id")).order_by("-number").values("pk")[:1]
    labels = PromptLabel.objects.select_related("version").only("name", "template", "version__number")
    default = PromptVersion.objects.filter(labels__name=DEFAULT_LABEL).defer("messages")
    return PromptTemplate.objects.prefetch_related(
        Prefetch("versions", queryset=PromptVersion.objects.filter(pk=Subquery(newest)), to_attr="latest_versions"),
        Prefetch("versions", queryset=default, to_attr="default_versions"),
        Prefetch("labels", queryset=labels),
    ).order_by("slug")


def template_latest_version(template: PromptTemplate) -> PromptVersion | None:
    return template.versions.order_by("-number").first()


async def brand_get(slug: str) -> BrandProfile:
    """A brand profile by slug; unknown: ``BrandNotFoundError`` (404)."""
    if not isinstance(slug, str) or not slug:
        raise ApplicationError("Name a brand by its slug.", param="brand")
    found = await brand_cache.get_or_load(slug, lambda: BrandProfile.objects.filter(slug=slug).afirst())
    if found is None:
        raise BrandNotFoundError(f"The brand `{text_quoted(slug)}` does not exist.")
    return found


def brand_get_sync(slug: str) -> BrandProfile:
    found = BrandProfile.objects.filter(slug=slug).first() if isinstance(slug, str) and slug else None
    if found is None:
        raise BrandNotFoundError(f"The brand `{text_quoted(slug)}` does not exist.")
    return found
