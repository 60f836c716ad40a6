from __future__ import annotations

from django.urls import path

from . import apis, views

urlpatterns = [
    path("", views.chat_page, name="chat"),
    path("c/<int:conversation_id>/", views.chat_page, name="chat-conversation"),
    path("keys/", views.keys_page, name="keys"),
    path("favicon.ico", views.favicon, name="favicon"),
    path("api/conversations/", apis.ConversationListApi.as_view(), name="conversation-list"),
    path("api/conversations/<int:pk>/", apis.ConversationDetailApi.as_view(), name="conversation-detail"),
    path("api/messages/<int:pk>/feedback/", apis.MessageFeedbackApi.as_view(), name="message-feedback"),
    path("api/models/", apis.ModelListApi.as_view(), name="model-list"),
]
