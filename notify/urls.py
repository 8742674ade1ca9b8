"""Dashboard paths of notifications, included in the dashboard's namespace ("dash")
by dashboard/urls.py."""

from django.urls import path

from . import views

urlpatterns = [
    path("notifications", views.notifications_page, name="notifications"),  # R20
    path("notifications/channels/<int:pk>/test", views.channel_test,
         name="notification-test"),
]
