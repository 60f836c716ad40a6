"""The ready-made kinds of marketing copy: for each, default messages, declared variables, an output JSON schema
and the character limits of the platform it is written for. ``prompt_kinds_install`` creates one template per
kind (one per platform where the limits differ) with version 1 labelled ``production``.

The limits (checked 2026; platforms change them, so a version's ``field_limits`` can be edited in the admin):

- X: 280 characters a post for accounts without Premium; X weighs most CJK characters and emoji as 2 and every
  link as 23 ("Counting characters", https://docs.x.com/fundamentals/counting-characters).
- LinkedIn: 3,000 characters a post (LinkedIn Help, "Character limits for posts").
- Instagram: 2,200 characters a caption (Instagram Help Center; Meta's Ads Guide gives the same maximum).
- Facebook: 63,206 characters a post (the composer's maximum, widely documented since 2011).
- Threads: 500 characters a post (Threads Help Center, "Create a post").
- Bluesky: 300 graphemes a post (the AT Protocol lexicon ``app.bsky.feed.post``: ``maxGraphemes: 300``).
- Google Ads responsive search ads: headlines up to 30 characters (3 to 15 of them), descriptions up to 90
  (2 to 4), display paths up to 15 (Google Ads Help, "About responsive search ads",
  https://support.google.com/google-ads/answer/7684791).
- Meta ads (Facebook and Instagram feeds): primary text 125, headline 40, description 30 characters, the lengths
  Meta's Ads Guide recommends before text is cut off (https://www.facebook.com/business/ads-guide).
- Email: subject about 60 characters and preheader about 100, where desktop clients cut them off (mobile
  clients show less: put the point first).
- Landing page and campaign plan: editorial defaults of ours (a hero headline that reads at a glance), not a
  platform's rule."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction

from .models import PromptKind, PromptTemplate
from .services import prompt_label_set, prompt_version_create

SOCIAL_LIMITS: dict[str, int] = {
    "x": 280,
    "linkedin": 3_000,
    "instagram": 2_200,
    "facebook": 63_206,
    "threads": 500,
    "bluesky": 300,
}
AD_LIMITS: dict[str, dict[str, int]] = {
    "google": {"headlines[]": 30, "descriptions[]": 90, "path1": 15, "path2": 15},
    "meta": {"primary_text": 125, "headline": 40, "description": 30},
}
# Per kind and platform, the field limits a ready-made template is installed with.
PLATFORM_LIMITS: dict[str, dict[str, dict[str, int]]] = {
    PromptKind.SOCIAL_POST: {platform: {"text": limit} for platform, limit in SOCIAL_LIMITS.items()},
    PromptKind.AD_COPY: AD_LIMITS,
}
PLATFORM_NAMES = {
    "x": "X (Twitter)",
    "linkedin": "LinkedIn",
    "instagram": "Instagram",
    "facebook": "Facebook",
    "threads": "Threads",
    "bluesky": "Bluesky",
    "google": "Google Ads (responsive search ad)",
    "meta": "Meta ads (Facebook and Instagram)",
}
EMAIL_LIMITS = {"subject": 60, "preheader": 100}
LANDING_LIMITS = {
    "hero.headline": 70,
    "hero.subheadline": 160,
    "features[].title": 50,
    "features[].description": 200,
    "call_to_action.button": 25,
}
CAMPAIGN_LIMITS = {"name": 80}

# Every kind's system message ends with this: the JSON the reply must be, and nothing else.
_JSON_ONLY = (
    "\n\nAnswer with one JSON object only, no prose and no code fences, that satisfies this JSON schema:\n"
    "{{ output_schema }}\n"
    "Character limits (count every character, spaces included):"
    "{% for field, limit in field_limits.items() %}\n- {{ field }}: at most {{ limit }}{% endfor %}"
)


def _var(name: str, kind: str = "string", description: str = "", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": kind, "description": description, **extra}


@dataclass(frozen=True)
class KindSpec:
    slug: str
    kind: str
    platform: str
    description: str
    messages: list[dict[str, Any]]
    variables: list[dict[str, Any]]
    output_schema: dict[str, Any]
    field_limits: dict[str, int] = field(default_factory=dict)


def _social(platform: str) -> KindSpec:
    name = PLATFORM_NAMES[platform]
    limit = SOCIAL_LIMITS[platform]
    return KindSpec(
        slug=f"social-post-{platform}",
        kind=PromptKind.SOCIAL_POST,
        platform=platform,
        description=f"A post for {name}, at most {limit:,} characters.",
        messages=[
            {
                "role": "system",
                "content": f"You write social media posts for {name}. A post is at most {limit} characters, "
                "hashtags and links included; it opens with a hook and sounds like a person, not an ad." + _JSON_ONLY,
            },
            {
                "role": "user",
                "content": "Write a post about: {{ topic }}\n"
                "{% if key_message %}Key message: {{ key_message }}\n{% endif %}"
                "{% if call_to_action %}Call to action: {{ call_to_action }}\n{% endif %}"
                "{% if link %}Link to include: {{ link }}\n{% endif %}"
                "Hashtags: at most {{ hashtags }}.",
            },
        ],
        variables=[
            _var("topic", description="What the post is about.", example="our spring collection"),
            _var("key_message", description="The one thing a reader should remember.", default=""),
            _var("call_to_action", description="What the reader should do next.", default=""),
            _var("link", description="A link to include.", default=""),
            _var("hashtags", "integer", "How many hashtags at most.", default=3),
        ],
        output_schema={
            "type": "object",
            "properties": {
                "text": {"type": "string", "minLength": 1, "description": "The post as published, hashtags included."},
                "hashtags": {"type": "array", "items": {"type": "string", "pattern": "^#\\w+$"}},
            },
            "required": ["text"],
            "additionalProperties": False,
        },
        field_limits={"text": limit},
    )


def _email() -> KindSpec:
    return KindSpec(
        slug="email",
        kind=PromptKind.EMAIL,
        platform="",
        description="A marketing email: subject, preheader and body.",
        messages=[
            {
                "role": "system",
                "content": "You write marketing emails people open and read. The subject line makes the point in "
                "its first 40 characters; the preheader adds to it and never repeats it; the body is short "
                "paragraphs in plain text with one clear call to action." + _JSON_ONLY,
            },
            {
                "role": "user",
                "content": "Write an email about: {{ topic }}\n"
                "{% if audience %}It goes to: {{ audience }}\n{% endif %}"
                "{% if call_to_action %}Call to action: {{ call_to_action }}\n{% endif %}"
                "Length of the body: {{ length }}.",
            },
        ],
        variables=[
            _var("topic", description="What the email is about.", example="our new plan for teams"),
            _var("audience", description="Who receives it.", default=""),
            _var("call_to_action", description="What the reader should do.", default=""),
            _var("length", description="short, medium or long.", default="short"),
        ],
        output_schema={
            "type": "object",
            "properties": {
                "subject": {"type": "string", "minLength": 1},
                "preheader": {"type": "string"},
                "body": {"type": "string", "minLength": 1},
                "call_to_action": {"type": "string"},
            },
            "required": ["subject", "preheader", "body"],
            "additionalProperties": False,
        },
        field_limits=dict(EMAIL_LIMITS),
    )


def _ad(platform: str) -> KindSpec:
    name = PLATFORM_NAMES[platform]
    limits = AD_LIMITS[platform]
    if platform == "google":
        schema = {
            "type": "object",
            "properties": {
                "headlines": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "minItems": 3,
                    "maxItems": 15,
                },
                "descriptions": {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "minItems": 2,
                    "maxItems": 4,
                },
                "path1": {"type": "string"},
                "path2": {"type": "string"},
            },
            "required": ["headlines", "descriptions"],
            "additionalProperties": False,
        }
        ask = (
            "Write {{ headline_count }} headlines and {{ description_count }} descriptions for a responsive search ad."
        )
        variables = [
            _var("headline_count", "integer", "How many headlines (3 to 15).", default=10),
            _var("description_count", "integer", "How many descriptions (2 to 4).", default=4),
        ]
        rules = (
            "Every headline must make sense alone and in any order with the others; at least one holds the main "
            "keyword. path1 and path2 are the display URL's two path parts."
        )
    else:
        schema = {
            "type": "object",
            "properties": {
                "primary_text": {"type": "string", "minLength": 1},
                "headline": {"type": "string", "minLength": 1},
                "description": {"type": "string"},
            },
            "required": ["primary_text", "headline"],
            "additionalProperties": False,
        }
        ask = "Write the primary text, headline and description of a feed ad."
        variables = []
        rules = "The primary text's hook is in its first line; the headline names the offer."
    return KindSpec(
        slug=f"ad-copy-{platform}",
        kind=PromptKind.AD_COPY,
        platform=platform,
        description=f"Ad copy for {name}, within its character limits.",
        messages=[
            {"role": "system", "content": f"You write ad copy for {name}. {rules}" + _JSON_ONLY},
            {
                "role": "user",
                "content": ask + "\nProduct: {{ product }}\n"
                "{% if offer %}Offer: {{ offer }}\n{% endif %}"
                "{% if keywords %}Keywords: {{ keywords | join(', ') }}\n{% endif %}"
                "{% if landing_page %}Landing page: {{ landing_page }}\n{% endif %}",
            },
        ],
        variables=[
            _var("product", description="What is advertised.", example="a project planning app"),
            _var("offer", description="The offer, if any.", default=""),
            _var("keywords", "array", "Search keywords to work in.", default=[]),
            _var("landing_page", description="Where the ad leads.", default=""),
            *variables,
        ],
        output_schema=schema,
        field_limits=dict(limits),
    )


def _landing_page() -> KindSpec:
    text = {"type": "string", "minLength": 1}
    return KindSpec(
        slug="landing-page",
        kind=PromptKind.LANDING_PAGE,
        platform="",
        description="A landing page: hero, features and call to action.",
        messages=[
            {
                "role": "system",
                "content": "You write landing pages that convert. The hero says what the product does for the "
                "reader in one line; each feature is a benefit first; one call to action." + _JSON_ONLY,
            },
            {
                "role": "user",
                "content": "Write the landing page for: {{ product }}\n"
                "{% if audience %}Audience: {{ audience }}\n{% endif %}"
                "{% if goal %}The page's goal: {{ goal }}\n{% endif %}"
                "Features: {{ feature_count }}.",
            },
        ],
        variables=[
            _var("product", description="What the page sells.", example="a project planning app"),
            _var("audience", description="Who the page is for.", default=""),
            _var("goal", description="What a visitor should do, e.g. start a trial.", default=""),
            _var("feature_count", "integer", "How many features.", default=3),
        ],
        output_schema={
            "type": "object",
            "properties": {
                "hero": {
                    "type": "object",
                    "properties": {"headline": text, "subheadline": text},
                    "required": ["headline", "subheadline"],
                },
                "features": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {"title": text, "description": text},
                        "required": ["title", "description"],
                    },
                },
                "call_to_action": {
                    "type": "object",
                    "properties": {"text": text, "button": text},
                    "required": ["text", "button"],
                },
            },
            "required": ["hero", "features", "call_to_action"],
        },
        field_limits=dict(LANDING_LIMITS),
    )


def _campaign_plan() -> KindSpec:
    date = {"type": "string", "pattern": "^\\d{4}-\\d{2}-\\d{2}$"}
    return KindSpec(
        slug="campaign-plan",
        kind=PromptKind.CAMPAIGN_PLAN,
        platform="",
        description="A campaign plan: a timeline of phases with dates and channels, and the assets to make.",
        messages=[
            {
                "role": "system",
                "content": "You plan marketing campaigns. Phases follow each other within the campaign's dates "
                "(YYYY-MM-DD); every asset belongs to a channel the plan uses and is due before its phase "
                "starts." + _JSON_ONLY,
            },
            {
                "role": "user",
                "content": "Plan a campaign for: {{ product }}\nGoal: {{ goal }}\n"
                "From {{ start_date }} to {{ end_date }}.\nChannels: {{ channels | join(', ') }}\n"
                "{% if budget %}Budget: {{ budget }}\n{% endif %}",
            },
        ],
        variables=[
            _var("product", description="What the campaign promotes.", example="our spring collection"),
            _var("goal", description="What the campaign should achieve.", example="1,000 sign-ups"),
            _var("start_date", description="YYYY-MM-DD", example="2027-03-01"),
            _var("end_date", description="YYYY-MM-DD", example="2027-04-30"),
            _var("channels", "array", "Channels to use.", default=["email", "social", "search"]),
            _var("budget", description="The budget, if any.", default=""),
        ],
        output_schema={
            "type": "object",
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "objective": {"type": "string"},
                "timeline": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {
                            "phase": {"type": "string"},
                            "start": date,
                            "end": date,
                            "channels": {"type": "array", "items": {"type": "string"}},
                            "goals": {"type": "string"},
                        },
                        "required": ["phase", "start", "end", "channels"],
                    },
                },
                "assets": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "type": {"type": "string"},
                            "channel": {"type": "string"},
                            "description": {"type": "string"},
                            "due": date,
                        },
                        "required": ["type", "channel", "description"],
                    },
                },
            },
            "required": ["name", "timeline", "assets"],
        },
        field_limits=dict(CAMPAIGN_LIMITS),
    )


def kind_specs(*, platforms: Iterable[str] | None = None) -> list[KindSpec]:
    """Every ready-made template: a social post per platform, an email, ad copy per ad platform, a landing page
    and a campaign plan. ``platforms``: only these social and ad platforms (None: all)."""
    wanted = None if platforms is None else set(platforms)
    unknown = (wanted or set()) - set(SOCIAL_LIMITS) - set(AD_LIMITS)
    if unknown:
        raise ValueError(f"Unknown platform(s): {', '.join(sorted(unknown))}")
    specs = [_social(p) for p in SOCIAL_LIMITS if wanted is None or p in wanted]
    specs.append(_email())
    specs.extend(_ad(p) for p in AD_LIMITS if wanted is None or p in wanted)
    specs.extend([_landing_page(), _campaign_plan()])
    return specs


@transaction.atomic
def prompt_kinds_install(*, platforms: Iterable[str] | None = None, actor: Any = None) -> list[PromptTemplate]:
    """Create the ready-made templates that do not exist yet, each with version 1 labelled ``production``.
    Idempotent: a template that exists (perhaps edited since) is left as it is."""
    templates: list[PromptTemplate] = []
    for spec in kind_specs(platforms=platforms):
        template, _ = PromptTemplate.objects.get_or_create(
            slug=spec.slug, defaults={"kind": spec.kind, "platform": spec.platform, "description": spec.description}
        )
        if not template.versions.exists():
            version = prompt_version_create(
                template=template,
                messages=spec.messages,
                variables=spec.variables,
                output_schema=spec.output_schema,
                field_limits=spec.field_limits,
                note="Ready-made version installed by llmhub.",
                created_by=actor,
            )
            prompt_label_set(template=template, name="production", version=version, actor=actor)
        templates.append(template)
    return templates
