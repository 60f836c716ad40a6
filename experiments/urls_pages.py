"""The staff pages of experiments, mounted at /experiments/."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("", views.experiments_index, name="experiments-index"),
    path("<int:pk>/results/", views.experiment_results_page, name="experiment-results-page"),
    path("<int:pk>/promote/", views.experiment_promote_page, name="experiment-promote-page"),
]
