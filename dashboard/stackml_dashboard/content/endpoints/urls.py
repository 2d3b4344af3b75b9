from django.urls import re_path

from stackml_dashboard.content.endpoints import views

EP = r"^(?P<model>[a-z][a-z0-9_-]{0,62})/(?P<endpoint_id>[^/]+)/"

urlpatterns = [
    re_path(r"^$", views.IndexView.as_view(), name="index"),
    re_path(EP + r"$", views.DetailView.as_view(), name="detail"),
    re_path(EP + r"scale/$", views.ScaleView.as_view(), name="scale"),
    re_path(EP + r"delete/$", views.DeleteView.as_view(), name="delete"),
]
