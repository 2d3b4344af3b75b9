from django.urls import re_path

from stackml_dashboard.content.jobs import views

JOB = r"^(?P<job_id>[^/]+)/"

urlpatterns = [
    re_path(r"^$", views.IndexView.as_view(), name="index"),
    re_path(r"^submit/$", views.SubmitView.as_view(), name="submit"),
    re_path(JOB + r"$", views.DetailView.as_view(), name="detail"),
    re_path(JOB + r"log/$", views.LogView.as_view(), name="log"),
    re_path(JOB + r"cancel/$", views.CancelView.as_view(), name="cancel"),
    re_path(JOB + r"delete/$", views.DeleteView.as_view(), name="delete"),
]
