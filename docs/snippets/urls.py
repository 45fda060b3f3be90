# mysite/urls.py
from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("runs/", include("detached_runs.urls")),  # namespace "detached_runs"
]
