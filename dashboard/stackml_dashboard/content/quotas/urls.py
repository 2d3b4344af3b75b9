from django.urls import re_path

from stackml_dashboard.content.quotas import views

urlpatterns = [
    re_path(r"^$", views.IndexView.as_view(), name="index"),
]
