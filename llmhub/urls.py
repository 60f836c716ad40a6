from __future__ import annotations

from django.contrib import admin
from django.contrib.auth.views import LoginView, PasswordResetView
from django.urls import include, path
from drf_spectacular.views import SpectacularRedocView, SpectacularSwaggerSplitView

from accounts.reset_throttle import ThrottledPasswordResetForm
from accounts.signin_throttle import AdminSignInForm, SignInForm
from core.csp import csp_extend
from llmhub.metrics import metrics_view
from llmhub.probes import healthz, readyz
from llmhub.schema_view import SchemaApi

urlpatterns = [
    # Probes for the orchestrator (llmhub/probes.py), served by the lean handler like /v1/.
    path("healthz", healthz, name="healthz"),
    path("readyz", readyz, name="readyz"),
    # Prometheus (llmhub/metrics.py): every worker's metrics, for a bearer token or an allowed address.
    path("metrics", metrics_view, name="metrics"),
    path("v1/", include("chat.urls_openai")),
    path("admin/", admin.site.urls),
    # The sign-in forms hold back password guessing (accounts.signin_throttle), the password reset form
    # mailbox flooding (accounts.reset_throttle); the rest is Django's.
    path("accounts/login/", LoginView.as_view(authentication_form=SignInForm), name="login"),
    path(
        "accounts/password_reset/",
        PasswordResetView.as_view(form_class=ThrottledPasswordResetForm),
        name="password_reset",
    ),
    path("accounts/", include("django.contrib.auth.urls")),
    path("api/schema/", SchemaApi.as_view(), name="schema"),
    # The split view serves the page's script at ?script instead of inline, which the CSP would refuse (core/csp.py).
    path(
        "api/docs/",
        SpectacularSwaggerSplitView.as_view(url_name="schema", template_name="api_docs/swagger_ui.html"),
        name="swagger-ui",
    ),
    # Our template: drf-spectacular's without the Google Fonts stylesheet, which offline delays the page. ReDoc
    # styles itself with <style> elements it writes at run time (styled-components), runs its search in a worker
    # made from a blob: URL and shows Redocly's logo from its CDN: allowed on this page only, which shows the
    # API's schema and nothing of a user's.
    path(
        "api/redoc/",
        csp_extend(style_src=["'unsafe-inline'"], worker_src=["blob:"], img_src=["https://cdn.redoc.ly"])(
            SpectacularRedocView.as_view(url_name="schema", template_name="api_docs/redoc.html")
        ),
        name="redoc",
    ),
    path("api/provider-keys/", include("providers.urls_credentials")),
    path("api/audit/", include("audit.urls")),
    path("api/experiments/", include("experiments.urls")),
    path("api/prompts/", include("chat.urls_prompts")),
    path("api/", include("billing.urls")),
    path("provider-keys/", include("providers.urls_pages")),
    path("usage/", include("billing.urls_dashboard")),
    path("ops/", include("billing.urls_ops")),
    path("experiments/", include("experiments.urls_pages")),
    path("", include("chat.urls")),
]

admin.site.login_form = AdminSignInForm

# /api/ paths that match no route answer JSON like the rest of the API.
handler400 = "core.exception_handlers.bad_request"
handler404 = "core.exception_handlers.page_not_found"
