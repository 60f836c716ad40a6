"""An experiment's results, per variant, from the ledger and the feedback: ``experiment_results``.

What is counted
---------------
Every ``billing.models.UsageRecord`` row with the experiment's ``experiment_id`` belongs to the variant
named by its ``experiment_variant_id``; ``experiments.models.Feedback`` rows are joined to them on
``request_id``. Per variant:

- ``requests``: every row (``statuses`` splits them by ledger status); ``users``: distinct users, plus
  distinct gateway keys among rows without a user.
- ``error_rate``: ``upstream_error`` rows (the provider failed or timed out: the variant's doing) over
  ``ok`` + ``upstream_error`` rows. Rows that are nobody's verdict on the variant are left out of both:
  ``rejected`` (the gateway refused before calling: budget, rate limit, moderation, validation),
  ``client_disconnected`` and ``cancelled`` (the client left), ``server_shutdown`` and ``lost`` (our
  process stopped or died).
- ``latency_ms`` (``duration_ms``) and ``ttft_ms`` (time to first token, streams only): ``ok`` rows.
- ``cost``: the request's price (``user_key_cost`` on a user's own key, else ``cost``) over every row
  but ``rejected`` ones; ``cost_per_positive``: the total price of those rows over the number of
  positive answers.
- ``positive_rate``: thumbs feedback with ``value > 0`` over the rated requests; ``mean_score``: the mean
  of ``score`` feedback.

How it is computed
------------------
Counts, sums and sums of squares are aggregated in the database (one ``values().annotate()`` per
question); the percentiles are exact order statistics read with ``ORDER BY … OFFSET`` (one short slice
per percentile: its distribution-free interval's two ranks and everything between), so no distribution
is read into Python. Intervals: Wilson for rates, Student's t for means, the binomial order-statistic
interval for percentiles, the delta method for the cost per positive answer (a ratio of two means).
Verdicts against the control: ``experiments.stats.compare`` (an anytime-valid mixture sequential
probability ratio test, Bonferroni-corrected over the treatments), so looking every hour does not
inflate the error rate; ``method`` names it.

JSON shape (every figure may be null when there is no data; money is a decimal string)
---------------------------------------------------------------------------------------
::

    {
      "experiment": {"id": 3, "name": "tone-test", "model": "gpt-4o", "status": "running",
                     "starts_at": "2026-11-01T00:00:00Z" | null, "ends_at": null,
                     "primary_metric": "positive_rate", "guardrail_metrics": ["error_rate"],
                     "alpha": "0.050", "promoted_variant": null | "b"},
      "generated_at": "2026-12-01T16:00:00Z",
      "confidence": 0.95,                        # of every interval (1 - alpha)
      "method": "…test and reference…",
      "control": "a" | null,                     # the control variant's name
      "winner": "b" | null,                      # better on the primary metric, no guardrail worse
      "winner_reason": "…one sentence…",
      "metrics": [                               # in display order; key = a Metric value
        {"key": "positive_rate", "label": "Positive-feedback rate", "higher_is_better": true,
         "money": false, "primary": true, "guardrail": false},
        … "mean_score", "error_rate", "latency_ms", "ttft_ms", "cost", "cost_per_positive"
      ],
      "variants": [                              # in position order, control first among equals
        {"id": 7, "name": "a", "is_control": true, "allocation": "50.00",
         "requests": 1200, "users": 310,
         "statuses": {"ok": 1180, "upstream_error": 12, "rejected": 8},
         "metrics": {
           "positive_rate": {"value": 0.61, "interval": [0.57, 0.65], "n": 400, "successes": 244},
           "mean_score":    {"value": 4.1, "interval": [3.9, 4.3], "n": 50},
           "error_rate":    {"value": 0.0101, "interval": [0.005, 0.017], "n": 1192, "successes": 12},
           "latency_ms":    {"value": 812.4, "interval": [790.1, 834.7], "n": 1180,
                             "p50": 700, "p50_interval": [680, 720], "p95": 1900, "p95_interval": [1800, 2050]},
           "ttft_ms":       {"value": 210.3, "interval": [200.0, 220.6], "n": 900,
                             "p50": 190, "p50_interval": [185, 196]},
           "cost":          {"value": "0.0012000000", "interval": ["0.0011000000", "0.0013000000"], "n": 1192,
                             "total": "1.4304000000"},
           "cost_per_positive": {"value": "0.0058622951", "interval": ["…", "…"], "n": 244,
                                 "total": "1.4304000000"}
         },
         "comparisons": {                        # against the control; {} for the control itself
           "positive_rate": {"verdict": "better" | "worse" | "unknown",
                             "difference": 0.05,          # treatment - control (decimal string for money)
                             "interval": [0.01, 0.09],    # anytime-valid, corrected
                             "p_value": 0.004,            # anytime-valid
                             "samples_needed": 0 | 1800 | null},  # more per variant for a verdict
           …one per metric with data on both sides
         }}
      ],
      "series": {                                # per UTC day of the requests, for charts
        "days": ["2026-11-01", "2026-11-02"],
        "variants": [{"name": "a", "requests": [600, 600], "rated": [200, 200],
                      "positive_rate": [0.6, 0.62] (null on a day without ratings)}]
      }
    }
"""

from __future__ import annotations

from billing.models import UsageStatus

# Statuses that are a verdict on the variant: served, or failed upstream (errors, timeouts included).
OK_STATUSES = (UsageStatus.OK,)
ERROR_STATUSES = (UsageStatus.UPSTREAM_ERROR,)
# Every row but these counts towards cost: the gateway refused them before any upstream call.
UNSERVED_STATUSES = (UsageStatus.REJECTED,)
