from django.urls import re_path

from stackml_dashboard.content.models import views

MODEL = r"^(?P<name>[a-z][a-z0-9_-]{0,62})/"

urlpatterns = [
    re_path(r"^$", views.IndexView.as_view(), name="index"),
    re_path(r"^\+create/$", views.CreateView.as_view(), name="create"),
    re_path(MODEL + r"$", views.DetailView.as_view(), name="detail"),
    re_path(MODEL + r"register/$", views.RegisterView.as_view(), name="register"),
    re_path(MODEL + r"label/$", views.LabelView.as_view(), name="label"),
    re_path(MODEL + r"deploy/$", views.DeployView.as_view(), name="deploy"),
    re_path(MODEL + r"predict/$", views.PredictView.as_view(), name="predict"),
]
