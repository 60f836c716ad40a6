"""JWT sign-in on the management API (/api/*, DRF): which tokens are accepted and which refused, the user a
token creates, the role it maps to, and the audit events sign-ins leave. The tokens come from a local
identity provider (tests/accounts/conftest.py) whose JWKS is served over real HTTP."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime, timedelta

import jwt
import pytest
import time_machine
from cryptography.hazmat.primitives.asymmetric import rsa
from django.contrib.auth import get_user_model

from accounts.jwt import token_cache
from accounts.models import ExternalIdentity
from accounts.roles import Role, role_of
from audit.models import AuditEvent
from tests.accounts.conftest import AUDIENCE, ISSUER, unsigned_token
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def usage(client, token: str):
    return client.get("/api/usage/", HTTP_AUTHORIZATION=f"Bearer {token}")


def error_message(response) -> str:
    return response.json()["error"]["message"]


def forged_hs256(claims: dict, secret: bytes) -> str:
    """An HS256 token whose HMAC key is ``secret`` (PyJWT refuses to sign with a PEM public key, an
    attacker's own code does not)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(claims).encode())
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


@pytest.mark.parametrize("alg", ["RS256", "ES256", "HS256"])
def test_a_valid_token_signs_in_and_creates_its_user(client, jwt_on, alg):
    response = usage(client, jwt_on.token(alg, sub=f"subject-{alg}", preferred_username=f"ada-{alg}"))

    assert response.status_code == 200, response.content
    identity = ExternalIdentity.objects.select_related("user").get(issuer=ISSUER, subject=f"subject-{alg}")
    assert identity.user.username == f"ada-{alg}"
    assert identity.user.email == "ada@example.com"
    assert not identity.user.has_usable_password()
    assert role_of(identity.user) == Role.MEMBER


def test_the_same_subject_is_the_same_user_whatever_its_name_says(client, jwt_on):
    assert usage(client, jwt_on.token(sub="s-1", preferred_username="ada")).status_code == 200
    assert usage(client, jwt_on.token(sub="s-1", preferred_username="someone-else")).status_code == 200

    assert ExternalIdentity.objects.filter(subject="s-1").count() == 1
    assert list(get_user_model().objects.values_list("username", flat=True)) == ["ada"]


def test_a_taken_or_unsafe_username_is_made_unique_and_safe(client, jwt_on):
    UserFactory(username="ada")  # a local account: never handed to a token that claims its name
    assert usage(client, jwt_on.token(sub="s-1", preferred_username="ada")).status_code == 200
    assert usage(client, jwt_on.token(sub="s-2", preferred_username="Ada Lovelace <b>")).status_code == 200

    assert ExternalIdentity.objects.get(subject="s-1").user.username == "ada-2"
    assert ExternalIdentity.objects.get(subject="s-2").user.username == "AdaLovelaceb"


def _wrong_key_token(idp) -> str:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(idp.claims(), other, algorithm="RS256", headers={"kid": "rsa-1"})


REFUSED = [
    ("wrong signature", _wrong_key_token, "signature does not verify"),
    ("wrong issuer", lambda idp: idp.token(iss="https://evil.example"), "issuer (iss)"),
    ("wrong audience", lambda idp: idp.token(aud="another-service"), "audience (aud)"),
    ("no expiry", lambda idp: idp.token(exp=None), "lacks the exp claim"),
    ("alg none", lambda idp: unsigned_token(idp.claims()), "algorithm (none) is not accepted"),
    ("HS256 keyed with the RSA public key", lambda idp: forged_hs256(idp.claims(), idp.rsa_public_pem()), "signature"),
    (
        "HS256 with a wrong secret",
        lambda idp: idp.token("HS256", key="not-the-shared-secret-at-all-0123456789"),
        "signature",
    ),
    (
        "ES256 header on the RSA key",
        lambda idp: idp.token("ES256", kid="rsa-1", key=idp.ec),
        "does not match its signing key",
    ),
]


@pytest.mark.parametrize(("case", "make", "why"), REFUSED, ids=[case for case, _, _ in REFUSED])
def test_a_bad_token_is_refused_with_401_saying_why_and_never_echoing_it(client, jwt_on, case, make, why):
    token = make(jwt_on)

    response = usage(client, token)

    assert response.status_code == 401, response.content
    assert why in error_message(response)
    assert token not in response.content.decode()
    assert token.split(".")[1] not in response.content.decode()
    assert not get_user_model().objects.exists()


def test_hs256_is_refused_outright_when_only_a_jwks_is_configured(client, jwt_on, settings):
    settings.LLMHUB_JWT_HS256_SECRET = ""
    settings.LLMHUB_JWT_ALGORITHMS = []  # the default for a JWKS: RS256 and ES256

    response = usage(client, forged_hs256(jwt_on.claims(), jwt_on.rsa_public_pem()))

    assert response.status_code == 401
    assert "algorithm (HS256) is not accepted" in error_message(response)
    assert usage(client, jwt_on.token("RS256")).status_code == 200


EPOCH = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def _at(moment: datetime) -> int:
    return int(moment.timestamp())


def test_an_expired_token_is_refused_past_the_leeway_only(client, jwt_on):
    token = jwt_on.token(iat=_at(EPOCH), nbf=_at(EPOCH), exp=_at(EPOCH + timedelta(minutes=10)))

    with time_machine.travel(EPOCH + timedelta(minutes=10, seconds=20), tick=False):
        assert usage(client, token).status_code == 200  # within the 30 s allowed for clock skew
    token_cache.invalidate()
    with time_machine.travel(EPOCH + timedelta(minutes=10, seconds=31), tick=False):
        response = usage(client, token)

    assert response.status_code == 401
    assert error_message(response) == "The token has expired (exp)."


def test_a_token_not_yet_valid_is_refused(client, jwt_on):
    token = jwt_on.token(iat=_at(EPOCH), nbf=_at(EPOCH + timedelta(minutes=5)), exp=_at(EPOCH + timedelta(hours=1)))

    with time_machine.travel(EPOCH + timedelta(minutes=4), tick=False):
        response = usage(client, token)
    assert response.status_code == 401
    assert "not valid yet" in error_message(response)

    with time_machine.travel(EPOCH + timedelta(minutes=5), tick=False):
        assert usage(client, token).status_code == 200


def test_an_unknown_kid_is_refused_after_one_refresh_and_a_rotated_key_is_found(client, jwt_on, settings):
    settings.LLMHUB_JWT_JWKS_REFRESH_MIN_SECONDS = 0
    assert usage(client, jwt_on.token(kid="rsa-1")).status_code == 200
    assert jwt_on.fetches == 1
    jwt_on.add_key("rsa-unpublished", publish=False)

    response = usage(client, jwt_on.token(kid="rsa-unpublished"))

    assert response.status_code == 401
    assert "kid rsa-unpublished" in error_message(response)
    assert jwt_on.fetches == 2  # refreshed once for the unknown kid, then refused

    jwt_on.add_key("rsa-rotated", publish=True)  # the identity provider rotates its signing key
    assert usage(client, jwt_on.token(kid="rsa-rotated")).status_code == 200
    assert jwt_on.fetches == 3


def test_a_flood_of_unknown_kids_fetches_the_jwks_at_most_once_per_interval(client, jwt_on, settings):
    settings.LLMHUB_JWT_JWKS_REFRESH_MIN_SECONDS = 3600
    assert usage(client, jwt_on.token()).status_code == 200

    statuses = {usage(client, jwt_on.token(kid=f"made-up-{n}", key=jwt_on.rsa)).status_code for n in range(25)}

    assert statuses == {401}
    assert jwt_on.fetches == 1


def test_with_jwt_sign_in_off_a_jwt_is_just_a_wrong_api_key(client, idp):
    response = usage(client, idp.token())

    assert response.status_code == 401
    assert "Incorrect API key provided" in error_message(response)
    assert not get_user_model().objects.exists()


@pytest.mark.parametrize(
    ("claim", "value", "role"),
    [
        ("role", "operator", Role.OPERATOR),
        ("role", "ADMIN", Role.ADMIN),
        ("role", "viewer", Role.VIEWER),
        ("role", "superhero", Role.MEMBER),  # unknown: the default role
        ("role", ["viewer", "operator", "nonsense"], Role.OPERATOR),  # a list: the most powerful known one
        ("realm_access.roles", {"roles": ["admin"]}, Role.ADMIN),  # a dotted path into an object
    ],
)
def test_the_role_comes_from_the_configured_claim(client, jwt_on, settings, claim, value, role):
    settings.LLMHUB_JWT_ROLE_CLAIM = claim
    claims = {claim.split(".")[0]: value}

    assert usage(client, jwt_on.token(**claims)).status_code == 200

    user = get_user_model().objects.get()
    assert role_of(user) == role
    assert user.is_staff == (role in (Role.ADMIN, Role.OPERATOR))
    assert not user.is_superuser


def test_the_role_is_applied_again_at_each_sign_in(client, jwt_on):
    assert usage(client, jwt_on.token(role="operator")).status_code == 200
    assert usage(client, jwt_on.token(role="viewer")).status_code == 200

    user = get_user_model().objects.get()
    assert role_of(user) == Role.VIEWER
    assert list(user.groups.values_list("name", flat=True)) == ["viewer"]
    assert not user.is_staff


def test_the_default_role_is_configurable(client, jwt_on, settings):
    settings.LLMHUB_JWT_DEFAULT_ROLE = "viewer"

    assert usage(client, jwt_on.token()).status_code == 200

    assert role_of(get_user_model().objects.get()) == Role.VIEWER


def test_a_disabled_user_is_refused(client, jwt_on):
    assert usage(client, jwt_on.token(sub="s-1")).status_code == 200
    get_user_model().objects.update(is_active=False)

    response = usage(client, jwt_on.token(sub="s-1"))

    assert response.status_code == 401
    assert "disabled" in error_message(response)


def test_a_sign_in_is_audited_once_per_token_not_per_request(client, jwt_on):
    token = jwt_on.token(jti="token-one")
    for _ in range(3):
        assert usage(client, token).status_code == 200
        token_cache.invalidate()  # verified again each time: still one event for the token
    assert usage(client, jwt_on.token(jti="token-two")).status_code == 200

    events = AuditEvent.objects.filter(action="auth.jwt_login").order_by("seq")
    assert events.count() == 2
    user = get_user_model().objects.get()
    assert {(e.actor_id, e.target_id) for e in events} == {(str(user.pk), str(user.pk))}


def test_refused_tokens_are_audited_but_a_flood_cannot_fill_the_log(client, jwt_on):
    for _ in range(20):
        assert usage(client, jwt_on.token(aud="another-service", jti=uuid.uuid4().hex)).status_code == 401
    assert usage(client, jwt_on.token(iss="https://evil.example")).status_code == 401

    failed = AuditEvent.objects.filter(action="auth.jwt_failed").order_by("seq")
    assert [e.changes["reason"][1] for e in failed] == [
        "The token's audience (aud) is not this server.",
        "The token's issuer (iss) is not the identity provider this server trusts.",
    ]
    assert all(e.ip_address == "127.0.0.1" for e in failed)


@time_machine.travel(datetime(2026, 12, 5, 10, 0, 30, tzinfo=UTC), tick=False)
def test_refused_tokens_from_one_ipv6_network_count_as_one_address(client, jwt_on):
    """A host taking a new address of its /64 for each bad token had each refusal recorded, up to the minute's 30
    for everyone: its addresses count as one (the event keeps the address it came from)."""
    for n in range(20):
        response = client.get(
            "/api/usage/",
            HTTP_AUTHORIZATION=f"Bearer {jwt_on.token(aud='another-service', jti=uuid.uuid4().hex)}",
            REMOTE_ADDR=f"2001:db8:0:7::{n + 1:x}",
        )
        assert response.status_code == 401

    failed = AuditEvent.objects.filter(action="auth.jwt_failed").order_by("seq")
    assert [e.ip_address for e in failed] == ["2001:db8:0:7::1"]


def test_the_issuer_and_audience_must_be_configured(client, idp, settings):
    from django.core.exceptions import ImproperlyConfigured

    settings.LLMHUB_JWT_HS256_SECRET = "a-shared-secret-for-hs256-of-32+-bytes-0123456789"
    settings.LLMHUB_JWT_ISSUER = ISSUER
    settings.LLMHUB_JWT_AUDIENCE = ""

    with pytest.raises(ImproperlyConfigured):
        usage(client, idp.token("HS256", aud=AUDIENCE))


def test_a_role_and_a_user_set_by_a_token_are_recorded_as_done_by_the_tokens_user(
    client, jwt_on, django_capture_on_commit_callbacks
):
    """Nobody anonymous made ada an operator: her identity provider said so in her token. The audit log names
    her (the token's user) as the actor of her account's creation and of each role change her tokens bring,
    with the address the token came from."""
    with django_capture_on_commit_callbacks(execute=True):
        assert usage(client, jwt_on.token(sub="s-ada", preferred_username="ada", role="member")).status_code == 200
    with django_capture_on_commit_callbacks(execute=True):
        assert usage(client, jwt_on.token(sub="s-ada", preferred_username="ada", role="operator")).status_code == 200

    ada = get_user_model().objects.get(username="ada")
    acts = AuditEvent.objects.filter(action__in=["auth.user.create", "role.change"]).order_by("seq")
    assert [event.changes.get("groups", [None, None])[1] for event in acts] == [None, ["member"], ["operator"]]
    for event in acts:
        assert (event.actor_type, event.actor_id, event.actor_repr) == ("user", str(ada.pk), "ada"), event
        assert event.ip_address == "127.0.0.1"


def test_a_refused_token_while_the_cache_is_down_is_still_a_401(client, jwt_on, monkeypatch):
    """The refusals' audit throttle lives in the cache (Redis in production): when it does not answer, a bad
    token still gets its 401 saying why, not a 500, and the refusal is recorded."""
    import redis

    from audit import services

    def down(*args, **kwargs):
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(services.cache, "add", down)

    response = usage(client, jwt_on.token(aud="another-service"))

    assert response.status_code == 401
    assert "audience" in error_message(response)
    assert AuditEvent.objects.filter(action="auth.jwt_failed").count() == 1


def test_a_valid_token_signs_in_while_the_cache_is_down(client, jwt_on, monkeypatch):
    """The once-per-token sign-in event is deduplicated in the cache (Redis in production): when it does not
    answer, the token still signs its user in (the event is written, perhaps more than once)."""
    import redis
    from django.core.cache import cache

    def down(*args, **kwargs):
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(cache, "add", down)

    assert usage(client, jwt_on.token(jti="while-down")).status_code == 200
    assert AuditEvent.objects.filter(action="auth.jwt_login").count() == 1


class _Resolver:
    """DNS the test controls (``providers.outbound.resolver``): each name's addresses."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers, self.asked = answers, []

    async def resolve(self, host: str, port: int) -> list:
        import ipaddress

        self.asked.append(host)
        if host not in self.answers:
            raise OSError(f"{host} does not resolve")
        return [ipaddress.ip_address(address) for address in self.answers[host]]


def test_the_jwks_is_fetched_under_the_outbound_policy_like_every_outbound_call(client, jwt_on, settings):
    """Production's rules (no private addresses): the identity provider on 127.0.0.1 is not contacted, the
    token is refused with 401 (no 500) saying the keys could not be fetched; allowed by
    LLMHUB_OUTBOUND_ALLOWED_NETWORKS, as a provider would be, it is."""
    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = False
    settings.LLMHUB_OUTBOUND_ALLOWED_NETWORKS = []

    response = usage(client, jwt_on.token())

    assert response.status_code == 401, response.content
    assert "signing keys could not be fetched" in error_message(response)
    assert jwt_on.fetches == 0

    from accounts.jwt import jwks_cache

    jwks_cache.clear()
    settings.LLMHUB_OUTBOUND_ALLOWED_NETWORKS = ["127.0.0.1/32"]
    assert usage(client, jwt_on.token()).status_code == 200
    assert jwt_on.fetches == 1


def test_a_jwks_host_resolving_to_a_metadata_address_is_refused_at_connect_time(
    client, jwt_on, settings, monkeypatch, caplog
):
    """The JWKS host's name is resolved and judged when the connection is opened: the same name answering a
    loopback address (private addresses allowed, as in development) is fetched from; answering the cloud
    metadata address, it is refused whatever the settings, and nothing is sent there."""
    from accounts.jwt import jwks_cache
    from providers import outbound

    resolver = _Resolver({"idp.test": ["127.0.0.1"]})
    monkeypatch.setattr(outbound, "resolver", resolver)
    settings.LLMHUB_JWT_JWKS_URL = jwt_on.jwks_url.replace("127.0.0.1", "idp.test")
    settings.LLMHUB_ALLOW_PRIVATE_PROVIDER_URLS = True
    assert usage(client, jwt_on.token()).status_code == 200
    assert (jwt_on.fetches, resolver.asked) == (1, ["idp.test"])

    jwks_cache.clear()
    resolver.answers["idp.test"] = ["169.254.169.254"]
    response = usage(client, jwt_on.token())

    assert response.status_code == 401, response.content
    assert "signing keys could not be fetched" in error_message(response)
    assert jwt_on.fetches == 1
    assert "169.254.169.254" in caplog.text
