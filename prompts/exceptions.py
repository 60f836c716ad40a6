"""Errors of the prompts layer (subclasses of ``core.exceptions.ApplicationError``): each is a clear 4xx,
never a 500, and none ever quotes anything but the template's own text and the caller's own values."""

from __future__ import annotations

from core.exceptions import ApplicationError


class PromptNotFoundError(ApplicationError):
    """An unknown template slug, version number or label."""

    status_code = 404
    code = "prompt_not_found"

    def __init__(self, message: str, *, param: str | None = "prompt", **kwargs) -> None:
        super().__init__(message, param=param, **kwargs)


class BrandNotFoundError(ApplicationError):
    status_code = 404
    code = "brand_not_found"

    def __init__(self, message: str, *, param: str | None = "brand", **kwargs) -> None:
        super().__init__(message, param=param, **kwargs)


class PromptVariablesError(ApplicationError):
    """A variable is missing, unknown or of the wrong type (``param`` is ``variables.<name>``)."""

    code = "invalid_prompt_variables"


class PromptTemplateError(ApplicationError):
    """The template itself does not render: a syntax error, an undefined name, or something the sandbox
    refuses (attribute access to internals)."""

    code = "prompt_template_error"


class OutputParseError(ApplicationError):
    """The model's reply holds no JSON that parses."""

    status_code = 422
    code = "output_not_json"


class PromptVersionInvalidError(ApplicationError):
    """A new version's messages, variables, schema or limits do not hold together (``param`` names which)."""

    code = "invalid_prompt_version"
