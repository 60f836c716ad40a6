"""``/api/experiments/``: the experiments REST API for staff (``experiments.apis``)."""

from __future__ import annotations

from django.urls import path

from . import apis

urlpatterns = [
    path("", apis.ExperimentListCreateApi.as_view(), name="api-experiments"),
    path("<int:experiment_id>/", apis.ExperimentDetailApi.as_view(), name="api-experiment"),
    path("<int:experiment_id>/start/", apis.ExperimentStartApi.as_view(), name="api-experiment-start"),
    path("<int:experiment_id>/pause/", apis.ExperimentPauseApi.as_view(), name="api-experiment-pause"),
    path("<int:experiment_id>/conclude/", apis.ExperimentConcludeApi.as_view(), name="api-experiment-conclude"),
    path("<int:experiment_id>/advance/", apis.ExperimentAdvanceApi.as_view(), name="api-experiment-advance"),
    path("<int:experiment_id>/promote/", apis.ExperimentPromoteApi.as_view(), name="api-experiment-promote"),
    path("<int:experiment_id>/results/", apis.ExperimentResultsApi.as_view(), name="api-experiment-results"),
]
